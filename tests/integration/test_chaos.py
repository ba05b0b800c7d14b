"""At-least-once, proven at the receiver, through a killed worker, a PostgreSQL crash, a dropped
network and a killed serve under sustained load: tests/chaos.py's short run (the long one is
`python -m bench faults`)."""

from __future__ import annotations

import pytest

from chaos import SHORT, Chaos

from pgnet_curl import schema
from pgnet_curl.embedded import EmbeddedPostgres


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_faults_under_load_lose_nothing_and_resend_only_what_was_in_flight(embedded_data_dir, tmp_path, capsys):
    # fsync and synchronous_commit on, as in production: the crash must not take a COMMIT back.
    pg = EmbeddedPostgres(embedded_data_dir, port=0)
    try:
        dsn = pg.start()
        schema.install(dsn)
        report = Chaos(pg, dsn, tmp_path, SHORT).run()
    finally:
        pg.stop("immediate")
    with capsys.disabled():
        print("\nchaos (short): " + "\n  ".join(report.lines()))
    assert report.problems() == []
    assert report.committed >= SHORT.rate_per_s * SHORT.warmup_s, "the load ran"
    in_flight = {fault.name: fault.in_flight for fault in report.faults}
    assert all(in_flight.values()), f"every fault caught requests in flight: {in_flight}"
