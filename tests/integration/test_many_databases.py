"""One `pgnet-curl serve` for several databases: each has its own workers, connections,
settings and metric labels, and one that is down or lacks the schema holds back no other."""

from __future__ import annotations

import psycopg
import pytest

from helpers import wait_until
from test_ops import free_port, scrape

from pgnet_curl import schema
from pgnet_curl.embedded import EmbeddedPostgres


@pytest.fixture
def other_server(embedded_data_dir):
    """A second PostgreSQL server with the net schema, which the test stops and starts again."""
    server = EmbeddedPostgres(embedded_data_dir, port=0, fast_unsafe=True)
    schema.install(server.start())
    yield server
    server.stop("immediate")


def answered(dsn: str, url: str, timeout_s: float = 15) -> tuple:
    with psycopg.connect(dsn, autocommit=True) as conn:
        request_id = conn.execute("select net.http_get(%s)", (url,)).fetchone()[0]
        return wait_until(lambda: conn.execute("select status_code, content from net._http_response where id = %s",
                                               (request_id,)).fetchone(), timeout_s, message=f"an answer in {dsn}")


def test_one_serve_for_two_databases_survives_one_going_away(db_dsn, empty_db_dsn, other_server, serve, http_server,
                                                            tmp_path):
    other_dsn = other_server.dsn
    # Settings are each database's own.
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute(f'alter database "{conn.info.dbname}" set pg_net.batch_size = 7')
    dsn_file = tmp_path / "databases"
    dsn_file.write_text(f"# served by one process\n{other_dsn}\n\n{empty_db_dsn}\n")
    port = free_port()
    process = serve(db_dsn, "--dsn-file", str(dsn_file), "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    process.wait_ready()
    from serve_process import connected_workers
    wait_until(lambda: connected_workers(other_dsn) == 1 and connected_workers(empty_db_dsn) == 1,
               message="a worker connected to each database")

    url = http_server.url_for("/echo")
    assert answered(db_dsn, url)[0] == 200
    assert answered(other_dsn, url)[0] == 200
    def labelled():
        samples = scrape(port)
        return {dict(labels)["database"] for name, labels in samples if name == "pgnet_curl_requests_total"}
    with psycopg.connect(db_dsn) as a, psycopg.connect(other_dsn) as b:
        names = {a.info.dbname, b.info.dbname}
    wait_until(lambda: labelled() == names, message="requests counted under each database's label")
    assert "batch_size=7" in process.log and "batch_size=200" in process.log

    # One database goes away: the other is served on, as fast as before.
    other_server.stop("fast")
    assert answered(db_dsn, url, timeout_s=5)[0] == 200
    # The one without the schema is served once it is installed.
    schema.install(empty_db_dsn)
    assert answered(empty_db_dsn, url, timeout_s=5)[0] == 200
    # The stopped one is served again when it is back (its workers reconnect with backoff).
    other_server.requested_port = other_server.port
    other_server.start()
    assert answered(other_dsn, url, timeout_s=30)[0] == 200
    assert process.proc.poll() is None
    assert process.stop() == 0


def test_the_same_database_twice_is_refused(db_dsn):
    from test_install import run_cli

    result = run_cli("serve", "--dsn", db_dsn, "--dsn", db_dsn)
    assert result.returncode == 2 and "named twice" in result.stderr
