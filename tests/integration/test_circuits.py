"""The circuit breaker per destination host: a host that keeps failing gets its circuit opened,
its requests are held in the queue (not sent, not failed, no attempt counted), one probe goes
after each cool-down, and its success lets the held requests go. Real serve, real sockets."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
from http_server import HttpTestServer
from switch_server import SwitchServer

from helpers import wait_until
from pgnet_curl.model import Response
from pgnet_curl.queue import Queue
from pgnet_curl.url_host import url_host


@pytest.fixture(scope="module")
def other_host_server():
    with HttpTestServer("127.0.0.2") as server:
        yield server


@pytest.fixture
def down_host():
    with SwitchServer("127.0.0.3", delay_s=0.5) as server:
        yield server


def circuit(db, host: str) -> dict | None:
    cur = db.execute("select * from net.destination_status where host = %s", (host,))
    row = cur.fetchone()
    return dict(zip([c.name for c in cur.description], row)) if row else None


def answered(db, ids: list[int]) -> int:
    return db.execute("select count(*) from net._http_response where id = any(%s)", (ids,)).fetchone()[0]


def test_a_circuit_opens_holds_probes_and_closes(db, db_dsn, serve, down_host, other_host_server):
    threshold = 4
    process = serve(db_dsn, "--circuit-failures", str(threshold), "--circuit-cooldown", "1", workers=2)
    # The host goes down with 20 requests in flight (each is answered after 0.5 s)...
    ids = [row[0] for row in db.execute(
        "select net.http_request('GET', %s || '/r/' || i, max_retries => 5, retry_backoff_milliseconds => 50) "
        "from generate_series(1, 20) as i", (down_host.url,)).fetchall()]
    wait_until(lambda: len(down_host.arrivals) == 20, timeout_s=10, message="20 requests in flight")
    down_host.down()

    # Their failures open the circuit (N = 4 consecutive); their retries are held, not sent.
    opened = wait_until(lambda: (c := circuit(db, "127.0.0.3")) and c["state"] == "open" and c,
                        timeout_s=30, message="the circuit open")
    assert opened["failures"] >= threshold and opened["opens"] == 1
    # 10 more made while it is down are held too: not sent, not failed.
    ids += [row[0] for row in db.execute(
        "select net.http_request('GET', %s || '/r/' || i, max_retries => 5, retry_backoff_milliseconds => 50) "
        "from generate_series(21, 30) as i", (down_host.url,)).fetchall()]
    held = wait_until(lambda: (c := circuit(db, "127.0.0.3")) and c["requests_held"] == 30 and c["requests_held"],
                      timeout_s=10, message="requests held in the queue")
    reached_when_opened = down_host.refused
    # At most N requests reach the host while it is down (here the 20 in flight made the N).
    assert reached_when_opened <= threshold, reached_when_opened
    assert answered(db, ids) == 0, "a held request is not failed"
    # Held: pending, no attempt counted, the timeout kept for when it is sent (retries keep theirs).
    assert db.execute("select count(*) from net._held_requests where id = any(%s) and host = '127.0.0.3'"
                      " and attempts = 0 and timeout_milliseconds = 5000", (ids,)).fetchone()[0] == held
    assert db.execute("select (net._http_collect_response(%s)).status", (ids[-1],)).fetchone()[0] == "PENDING"

    # Another host is not held meanwhile.
    others = [row[0] for row in db.execute("select net.http_get(%s) from generate_series(1, 5)",
                                           (other_host_server.url_for("/echo"),)).fetchall()]
    wait_until(lambda: answered(db, others) == 5, timeout_s=10, message="the other host's responses")

    status = subprocess.run([sys.executable, "-m", "pgnet_curl", "status", "--dsn", db_dsn],
                            capture_output=True, text=True, timeout=60)
    assert "circuit open for 127.0.0.3" in status.stdout.splitlines()[0], status.stdout
    assert "circuit    open: 127.0.0.3" in status.stdout, status.stdout

    # After the cool-down one probe goes (half-open); it fails: open again, twice as long.
    reopened = wait_until(lambda: (c := circuit(db, "127.0.0.3")) and c["opens"] == 2 and c,
                          timeout_s=20, message="the circuit opened again after its probe")
    assert reopened["state"] == "open"
    assert down_host.refused == reached_when_opened + 1, "one probe, nothing else"
    assert (reopened["probe_at"] - reopened["opened_at"]).total_seconds() == pytest.approx(2.0, abs=0.5)

    # The host comes back: the next probe closes the circuit and the held requests go.
    down_host.up()
    wait_until(lambda: circuit(db, "127.0.0.3") is None, timeout_s=20, message="the circuit closed")
    wait_until(lambda: answered(db, ids) == 30, timeout_s=30, message="every held request answered")
    assert db.execute("select count(*) from net._http_response where id = any(%s) and status_code = 200",
                      (ids,)).fetchone()[0] == 30
    assert db.execute("select count(*) from net.failed_requests").fetchone()[0] == 0, "no dead letters"
    assert down_host.refused == reached_when_opened + 1, process.log
    assert len(down_host.arrivals) == 20 + 30


def test_a_success_ends_a_run_of_failures(db, db_dsn):
    """Failures count per host only until a success: below the threshold it never opens."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        queue = Queue(conn, "worker-a")
        db.execute("select net.http_get('http://127.0.0.9:9/') from generate_series(1, 6)")
        claimed = queue.claim(10, 30.0)
        failures = [Response(r.id, error_msg="Couldn't connect to server", curl_code=7, request=r,
                             circuit_failure=True) for r in claimed[:3]]
        queue.write(failures)
        assert circuit(db, "127.0.0.9")["failures"] == 3
        queue.reset_circuits(["127.0.0.9"])
        assert circuit(db, "127.0.0.9") is None
        queue.write([Response(r.id, error_msg="Couldn't connect to server", curl_code=7, request=r,
                              circuit_failure=True) for r in claimed[3:]])
        assert circuit(db, "127.0.0.9")["failures"] == 3


TRICKY_URLS = [
    "http://example.com/", "HTTP://User:Pa@ss@Example.COM.:8080/a@b?c@d#e@f", "https://[::1]:443/x",
    "http://[FE80::1%25eth0]/", "http://host.example.:80", "http://h/p://q", "https://a.b.c./?x=1",
    "http://u@[2001:DB8::1]./", "http://xn--bcher-kva.example/", "http://127.0.0.1", "http://A..",
    "http://[::ffff:127.0.0.1]:9/", "http://host?query", "http://host#frag", "http://user:pw@host",
    "http://ÉCOLE.Example/", "http://a@b@c:1@d/", "https://[::1]", "no scheme",
]


def test_the_worker_names_hosts_as_the_database_does(db):
    in_sql = dict(db.execute("select u, net._url_host(u) from unnest(%s::text[]) as u", (TRICKY_URLS,)).fetchall())
    assert {url: url_host(url) for url in TRICKY_URLS} == in_sql


def test_held_requests_come_back_when_their_circuit_goes(db, db_dsn):
    """A claim sets aside a held host's requests; when its circuit is gone (here deleted by hand, or
    closed while a claim was setting one aside) the sweep moves them back, as they were."""
    db.execute("insert into net._destination_circuits(host, state, failures, opens) values ('127.0.0.9', 'open', 9, 1)")
    ids = [row[0] for row in db.execute(
        "select net.http_request('GET', 'http://127.0.0.9:9/', max_retries => 2) from generate_series(1, 3)")]
    other = db.execute("select net.http_get('http://127.0.0.8:9/')").fetchone()[0]
    db.execute("update net.http_request_queue set retries = 1 where id = %s", (ids[0],))
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        queue = Queue(conn, "worker-a")
        assert [r.id for r in queue.claim(10, 30.0, circuits=True)] == [other]
        assert db.execute("select id, retries, attempts from net._held_requests order by id").fetchall() == [
            (ids[0], 1, 0), (ids[1], 0, 0), (ids[2], 0, 0)]
        assert db.execute("select count(*) from net.http_request_queue where id = any(%s)", (ids,)).fetchone()[0] == 0
        assert queue.unpark_requests() == 0, "still open: held"
        db.execute("delete from net._destination_circuits")
        assert queue.unpark_requests() == 3
        assert db.execute("select id, retries, attempts from net.http_request_queue where id = any(%s) order by id",
                          (ids,)).fetchall() == [(ids[0], 1, 0), (ids[1], 0, 0), (ids[2], 0, 0)]
        assert [r.id for r in queue.claim(10, 30.0)] == ids
