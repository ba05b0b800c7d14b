"""Per-destination limits (net.destination_limits): a rate and a concurrency per host, held
across every worker of every serve process, without slowing other hosts."""

from __future__ import annotations

import time

import psycopg
import pytest
from http_server import HttpTestServer

from helpers import wait_until
from pgnet_curl.model import Response
from pgnet_curl.queue import Queue


@pytest.fixture(scope="module")
def other_host_server():
    """A second loopback server on another address: another destination host."""
    with HttpTestServer("127.0.0.2") as server:
        yield server


def responses_stored(db, ids: list[int]) -> int:
    return db.execute("select count(*) from net._http_response where id = any(%s)", (ids,)).fetchone()[0]


def queue_requests(db, url: str, count: int) -> list[int]:
    return [row[0] for row in db.execute(
        "select net.http_get(%s) from generate_series(1, %s)", (url, count)).fetchall()]


def most_in_any_window(times_s: list[float], window_s: float = 1.0) -> int:
    """The most arrivals in any half-open window [t, t + window_s) that starts at an arrival."""
    times_s = sorted(times_s)
    most, end = 0, 0
    for start, t in enumerate(times_s):
        while end < len(times_s) and times_s[end] < t + window_s:
            end += 1
        most = max(most, end - start)
    return most


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at the same moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_a_rate_limit_holds_across_workers_and_serve_processes_and_spares_other_hosts(
        db, db_dsn, worker_dsn, serve, http_server, other_host_server):
    rate, burst, count = 50, 5, 150
    first = serve(db_dsn, workers=2)
    second = serve(worker_dsn, workers=2, wait=False).wait_ready(expected_workers=4)
    # Set while serving: the workers hear of it and switch to the limited claim.
    db.execute("insert into net.destination_limits(host_pattern, max_per_second, burst) values ('127.0.0.1', %s, %s)",
               (rate, burst))
    http_server.reset()
    limited = queue_requests(db, http_server.url_for("/fast"), count)

    # While that host's requests wait for tokens, another host's go through at once.
    assert http_server.wait_for_hits(20, "/fast", timeout_s=10)
    started_s = time.monotonic()
    others = queue_requests(db, other_host_server.url_for("/fast"), 20)
    wait_until(lambda: responses_stored(db, others) == 20, timeout_s=5, message="the other host's responses")
    other_host_s = time.monotonic() - started_s
    assert responses_stored(db, limited) < count - 20, "the limited host was still waiting meanwhile"
    assert other_host_s < 1.0

    try:
        wait_until(lambda: responses_stored(db, limited) == count, timeout_s=15, message="the limited responses")
    except AssertionError as exc:
        queued = db.execute("select count(*), count(lease_owner), min(not_before) from net.http_request_queue").fetchone()
        raise AssertionError(f"{exc}\nqueue (rows, leased, not_before): {queued}\n"
                             f"first serve:\n{first.log}\nsecond serve:\n{second.log}") from None
    arrivals_s = [entry["at_s"] for entry in http_server.requests if entry["path"] == "/fast"]
    assert len(arrivals_s) == count
    # A full bucket lets `burst` through at once, then `rate` a second: no 1 s window of claims
    # holds more than `rate`. Sending adds jitter: one batch (at most `burst`) may land late.
    assert most_in_any_window(arrivals_s) <= rate + burst
    expected_s = (count - burst) / rate
    assert expected_s - 0.1 <= max(arrivals_s) - min(arrivals_s) <= expected_s * 1.3


def test_a_concurrency_limit_set_by_flag_holds_across_serve_processes(db, worker_dsn, serve, http_server):
    # Both serve processes log in as the unprivileged worker role.
    flag = ("--destination-limit", "127.0.0.1=2/")
    serve(worker_dsn, *flag)
    serve(worker_dsn, *flag, wait=False).wait_ready(expected_workers=2)
    assert db.execute("select host_pattern, max_concurrent, max_per_second, source from net.destination_limits"
                      ).fetchall() == [("127.0.0.1", 2, None, "serve")]
    http_server.reset()
    ids = queue_requests(db, http_server.url_for("/delay/300"), 8)
    wait_until(lambda: responses_stored(db, ids) == 8, timeout_s=15, message="eight delayed responses")

    entries = [entry for entry in http_server.requests if entry["path"] == "/delay/300"]
    assert len(entries) == 8
    assert most_at_once([(entry["at_s"], entry["answered_at_s"]) for entry in entries]) == 2
    # Four rounds of two: the last pair starts after three others have finished.
    assert max(entry["at_s"] for entry in entries) - min(entry["at_s"] for entry in entries) >= 0.9


def test_a_limit_committed_just_before_requests_holds_for_them(db, db_dsn, serve, http_server):
    # The limit's NOTIFY may reach a worker only with the result of the claim that takes the
    # requests queued after it; that claim ran without the limit and must not send them.
    process = serve(db_dsn)
    for round_no in range(8):
        query = f"round={round_no}"
        db.execute("insert into net.destination_limits(host_pattern, max_concurrent) values ('127.0.0.1', 1)")
        ids = queue_requests(db, http_server.url_for(f"/delay/100?{query}"), 3)
        try:
            wait_until(lambda: responses_stored(db, ids) == 3, timeout_s=15, message=f"round {round_no}'s responses")
        except AssertionError as exc:
            queue = db.execute("select id, lease_owner, lease_expires_at, attempts from net.http_request_queue").fetchall()
            leases = db.execute("select * from net._destination_leases").fetchall()
            raise AssertionError(f"{exc}\nqueue: {queue}\nslot leases: {leases}\nserve:\n{process.log}") from None
        entries = [entry for entry in http_server.requests if entry["query"] == query]
        assert len(entries) == 3
        assert most_at_once([(e["at_s"], e["answered_at_s"]) for e in entries]) == 1, f"round {round_no}"
        # Lifted, and a request answered after that: the worker claims without limits again.
        db.execute("delete from net.destination_limits")
        plain = queue_requests(db, http_server.url_for("/echo"), 1)
        wait_until(lambda: responses_stored(db, plain) == 1, message="a request after the limit went")


def test_a_bad_limit_flag_is_refused_with_the_format(db_dsn, serve):
    process = serve(db_dsn, "--destination-limit", "127.0.0.1=two", wait=False)
    assert process.proc.wait(30) != 0
    assert "PATTERN=CONCURRENT/RATE" in process.log


def test_patterns_match_hosts_and_the_most_specific_wins(db):
    db.execute("""insert into net.destination_limits(host_pattern, max_concurrent) values
                  ('*', 1), ('*.Example.com', 2), ('*.eu.example.com', 3), ('api.eu.example.com', 4), ('::1', 5)""")
    hosts = ["api.eu.example.com", "x.eu.example.com", "eu.example.com", "example.com", "other.org", "::1"]
    found = dict(db.execute("select host, max_concurrent from net._destination_limits_for(%s)", (hosts,)).fetchall())
    assert found == {"api.eu.example.com": 4, "x.eu.example.com": 3, "eu.example.com": 2, "example.com": 1,
                     "other.org": 1, "::1": 5}
    ids = [db.execute("select net.http_get(%s)", (url,)).fetchone()[0]
           for url in ("http://User:pw@API.EU.Example.com.:8443/a?b", "https://[::1]:9/", "http://LocalHost./x")]
    assert db.execute("select net._url_host(url) from net.http_request_queue where id = any(%s) order by id", (ids,)).fetchall() == [
        ("api.eu.example.com",), ("::1",), ("localhost",)]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="host_pattern must be a host"):
        db.execute("insert into net.destination_limits(host_pattern, max_concurrent) values ('http://x/', 1)")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into net.destination_limits(host_pattern) values ('nothing.example.com')")


def test_concurrency_comes_back_on_write_back_release_and_lease_expiry(db, db_dsn):
    db.execute("insert into net.destination_limits(host_pattern, max_concurrent) values ('127.0.0.1', 1)")
    queue_requests(db, "http://127.0.0.1:9/", 3)
    with psycopg.connect(db_dsn, autocommit=True) as conn_a, psycopg.connect(db_dsn, autocommit=True) as conn_b:
        a, b = Queue(conn_a, "worker-a"), Queue(conn_b, "worker-b")
        first = a.claim(10, 30.0, limited=True)
        assert len(first) == 1
        assert b.claim(10, 30.0, limited=True) == [], "the host's one slot is taken"
        a.release([first[0].id])
        second = b.claim(10, 30.0, limited=True)
        assert [r.id for r in second] == [first[0].id], "a released request frees its slot"
        assert b.write([Response(second[0].id, status_code=200, request=second[0])]) == 1
        third = a.claim(10, 30.0, limited=True)
        assert len(third) == 1 and third[0].id != first[0].id, "a written response frees its slot"
        assert b.claim(10, 30.0, limited=True) == []
        # A dead worker's slot: its supervisor gives back everything the worker held...
        Queue(conn_b, "worker-a").release_all()
        fourth = b.claim(10, 30.0, limited=True)
        assert [r.id for r in fourth] == [third[0].id]
        assert b.write([Response(fourth[0].id, status_code=200, request=fourth[0])]) == 1

        # ... or the lease expires (here at once: a 1 ms request claimed with no grace).
        db.execute("delete from net.http_request_queue")
        db.execute("select net.http_get('http://127.0.0.1:9/', timeout_milliseconds => 1)")
        queue_requests(db, "http://127.0.0.1:9/", 1)
        assert len(a.claim(10, 0.0, limited=True)) == 1
        wait_until(lambda: b.claim(10, 30.0, limited=True), timeout_s=5, message="a claim once the lease expired")


def test_a_bucket_is_forgotten_once_full_again(db, db_dsn):
    db.execute("insert into net.destination_limits(host_pattern, max_per_second, burst) values ('127.0.0.1', 2, 1)")
    queue_requests(db, "http://127.0.0.1:9/", 2)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        queue = Queue(conn, "worker-a")
        assert len(queue.claim(10, 30.0, limited=True)) == 1
        assert queue.delete_idle_buckets() == 0, "an empty bucket is kept: it holds the host back"
        assert queue.claim(10, 30.0, limited=True) == []
        # Refilled after half a second: forgetting it changes nothing, a new bucket starts full.
        wait_until(lambda: queue.delete_idle_buckets() == 1, timeout_s=5, message="the full bucket deleted")
        assert len(queue.claim(10, 30.0, limited=True)) == 1
