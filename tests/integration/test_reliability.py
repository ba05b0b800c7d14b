"""Nothing lost, nothing doubled: every committed request ends in exactly one response row,
under killed workers, database restarts, network drops, bad targets and big backlogs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from helpers import wait_until
from serve_process import ServeProcess
from tcp_proxy import TcpProxy

from pgnet_curl import schema
from pgnet_curl.embedded import EmbeddedPostgres

HTTP_SERVER = Path(__file__).resolve().parent.parent / "http_server.py"


def counts(conn) -> tuple[int, int, int]:
    """(response rows, distinct ids among them, requests still queued)."""
    rows, distinct = conn.execute("select count(*), count(distinct id) from net._http_response").fetchone()
    queued = conn.execute("select count(*) from net.http_request_queue").fetchone()[0]
    return rows, distinct, queued


def wait_all_answered(dsn: str, total: int, timeout_s: float = 90) -> tuple[int, int, int]:
    def done():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
                result = counts(conn)
        except psycopg.OperationalError:
            return None
        return result if result[0] >= total and result[2] == 0 else None

    return wait_until(done, timeout_s, interval_s=0.1, message=f"{total} responses and an empty queue")


def leased(conn, owner_suffix: str = "") -> int:
    return conn.execute("select count(*) from net.http_request_queue where lease_owner like %s",
                        (f"%{owner_suffix}",)).fetchone()[0]


@pytest.fixture
def target():
    """A loopback HTTP server in its own process, so heavy load does not share the test's GIL."""
    proc = subprocess.Popen([sys.executable, str(HTTP_SERVER), "--port", "0"], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def private_pg(embedded_data_dir):
    """A PostgreSQL server of the test's own, which it may restart or crash."""
    # fsync and synchronous_commit on: what a durable install relies on.
    server = EmbeddedPostgres(embedded_data_dir, port=0)
    yield server
    server.stop("immediate")


def test_sigkilled_worker_is_restarted_and_its_requests_answered_once(db_dsn, serve, target):
    process = serve(db_dsn, workers=2)
    total = 3000
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get(%s || '/delay/400?n=' || n, timeout_milliseconds => 20000) "
                     "from generate_series(1, %s) n", (target, total))
        victim = process.worker_pids()[0]
        wait_until(lambda: leased(conn, f":{victim}") >= 500, message="the victim worker to hold 500 leases")
        held = leased(conn, f":{victim}")
        os.kill(victim, signal.SIGKILL)
    rows, distinct, queued = wait_all_answered(db_dsn, total)
    assert (rows, distinct, queued) == (total, total, 0)
    released = wait_until(lambda: re.search(rf"released (\d+) requests claimed by dead worker pid {victim}",
                                            process.log), message="the release log line")
    assert 0 < int(released.group(1)) <= held
    assert "was killed by signal 9" in process.log
    process.wait_ready(expected_workers=2)


def unanswered(conn, ids: list[int]) -> int:
    """How many of these requests have no response row."""
    return conn.execute("select count(*) from unnest(%s::bigint[]) as q(id) "
                        "where not exists (select from net._http_response r where r.id = q.id)", (ids,)).fetchone()[0]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_crash_during_load_loses_nothing_with_the_default_install(private_pg, serve, target, mode):
    """Issue 16: 6,000 of 6,000 were lost with unlogged tables; the default install is logged now.

    The workers commit with synchronous_commit off: the crash may forget their last write-backs,
    whose requests are then sent again once their lease expires (--lease-grace 1 here).
    """
    dsn = private_pg.start()
    schema.install(dsn)
    serve(dsn, "--lease-grace", "1", workers=2)
    total = 2000
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [row[0] for row in conn.execute(
            "select net.http_get(%s || '/delay/1000?n=' || n) from generate_series(1, %s) n", (target, total))]
        wait_until(lambda: conn.execute("select count(*) from net._http_response").fetchone()[0] >= 200,
                   message="some responses before the crash")
    private_pg.restart(mode)
    with psycopg.connect(dsn, autocommit=True) as conn:
        queued, answered = conn.execute("select (select count(*) from net.http_request_queue), "
                                        "(select count(*) from net._http_response)").fetchone()
    assert queued + answered >= total, "the crash emptied the tables"
    assert wait_all_answered(dsn, total) == (total, total, 0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert unanswered(conn, ids) == 0


def test_unlogged_tables_are_emptied_by_a_crash_and_service_continues(private_pg, serve, target):
    dsn = private_pg.start()
    schema.install(dsn, durable=False)
    process = serve(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select net.http_get(%s, timeout_milliseconds => 20000) from generate_series(1, 50)",
                     (target + "/delay/10000",))
    private_pg.restart("immediate")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert counts(conn) == (0, 0, 0), "a crash restart empties unlogged tables, as with pg_net"
        process.wait_ready()
        request_id = conn.execute("select net.http_get(%s)", (target + "/echo",)).fetchone()[0]
    wait_all_answered(dsn, 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select id, status_code from net._http_response").fetchall() == [(request_id, 200)]


def test_network_drop_between_worker_and_database(db_dsn, serve, target):
    params = psycopg.conninfo.conninfo_to_dict(db_dsn)
    proxy = TcpProxy(params["host"], int(params["port"]))
    try:
        proxied = psycopg.conninfo.make_conninfo(db_dsn, port=str(proxy.port))
        process = serve(proxied, workers=2)
        total = 1000
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("select net.http_get(%s || '/delay/100?n=' || n) from generate_series(1, %s) n",
                         (target, total))
            wait_until(lambda: conn.execute("select count(*) from net._http_response").fetchone()[0] >= 100,
                       message="some responses before the cut")
        proxy.cut()
        time.sleep(1.5)  # the outage itself: how long the network stays down
        proxy.restore()
        assert wait_all_answered(db_dsn, total) == (total, total, 0)
        # The other worker may have answered everything while this one still waits to reconnect.
        wait_until(lambda: "reconnected to the database" in process.log, timeout_s=15,
                   message="the cut-off worker to reconnect")
    finally:
        proxy.close()


def test_a_silent_database_connection_does_not_stall_transfers(db_dsn, serve, http_server):
    """Packets dropped for 4 s between a worker and PostgreSQL: the answers, in 1.5 s, must not
    wait for the database and time out after 3 s (measured: every one a timeout row). Within
    those 1.5 s the worker runs its 0.5 s check, which waits for the silent database."""
    params = psycopg.conninfo.conninfo_to_dict(db_dsn)
    proxy = TcpProxy(params["host"], int(params["port"]))
    try:
        serve(psycopg.conninfo.make_conninfo(db_dsn, port=str(proxy.port)))
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("select net.http_get(%s, timeout_milliseconds => 3000) from generate_series(1, 100)",
                         (http_server.url_for("/delay/1500"),))
            wait_until(lambda: leased(conn) == 100, message="every request in flight")
            proxy.drop()
            time.sleep(4)  # the outage itself
            proxy.restore()
            wait_all_answered(db_dsn, 100)
            outcomes = dict(conn.execute("select case when timed_out then 'timeout' else coalesce(status_code::text, "
                                         "error_msg) end, count(*) from net._http_response group by 1").fetchall())
        assert outcomes == {"200": 100}
    finally:
        proxy.close()


def test_hanging_resetting_and_refusing_targets_all_end_in_rows(db_dsn, serve, target):
    # Every request fails, and on purpose: with the circuit breaker their host's would be held.
    serve(db_dsn, "--no-circuit-breaker", workers=2)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get(%s, timeout_milliseconds => 500) from generate_series(1, 300)",
                     (target + "/hang",))
        conn.execute("select net.http_get(%s) from generate_series(1, 300)", (target + "/reset",))
        conn.execute("select net.http_get('http://127.0.0.1:1/') from generate_series(1, 2000)")
    assert wait_all_answered(db_dsn, 2600) == (2600, 2600, 0)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        by_kind = dict(conn.execute(
            """select case when timed_out then 'timeout'
                           when error_msg = 'Couldn''t connect to server' then 'refused'
                           when status_code is null then 'error' else 'answered' end, count(*)
               from net._http_response group by 1""").fetchall())
    assert by_kind == {"timeout": 300, "error": 300, "refused": 2000}


def test_killed_serve_process_work_is_finished_by_another(db_dsn, serve, target):
    first = serve(db_dsn, "--lease-grace", "1", workers=2)
    serve(db_dsn, "--lease-grace", "1", workers=2, wait=False).wait_ready(expected_workers=4)
    total = 2000
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get(%s || '/delay/300?n=' || n, timeout_milliseconds => 2000) "
                     "from generate_series(1, %s) n", (target, total))
        pids = first.worker_pids()
        wait_until(lambda: sum(leased(conn, f":{pid}") for pid in pids) >= 200, message="leases on the first serve")
    first.kill()  # the whole service at once: no supervisor left to hand its work back
    assert wait_all_answered(db_dsn, total) == (total, total, 0)


def test_graceful_shutdown_under_load_then_restart_loses_nothing(db_dsn, serve, target):
    process = serve(db_dsn, "--drain-timeout", "1", workers=2)
    total = 3000
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get(%s || '/delay/300?n=' || n, timeout_milliseconds => 20000) "
                     "from generate_series(1, %s) n", (target, total))
        wait_until(lambda: leased(conn) >= 1000, message="1000 requests in flight")
        started_s = time.monotonic()
        assert process.stop() == 0
        assert time.monotonic() - started_s < 8
        assert leased(conn) == 0, "every unfinished request was handed back"
    serve(db_dsn, workers=2)
    assert wait_all_answered(db_dsn, total) == (total, total, 0)


def test_idle_worker_runs_only_its_safety_poll_and_check(db_dsn, serve):
    serve(db_dsn, "--poll-interval", "1")
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        time.sleep(1)  # let start-up queries (settings, TTL sweep) pass
        seen = set()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # sample the worker's session every few ms
            seen.update(conn.execute(
                "select state_change from pg_stat_activity where datname = current_database() "
                "and application_name = 'pgnet-curl worker 1'").fetchall())
            time.sleep(0.005)
    # One poll a second, each a claim and a queue sample, and the schema/settings check every
    # 0.5 s (pg_reload_conf() reaches the worker that fast): about 16 statements in 4 s.
    assert 2 <= len(seen) <= 24, len(seen)


@pytest.mark.slow
def test_big_backlog_with_pg_net_crash_batch_size(db_dsn, serve, target):
    """pg_net's worker crash-loops with batch_size 32767 and a big backlog; ours drains it."""
    total = int(os.environ.get("PGNET_BACKLOG_REQUESTS", "50000"))
    max_inflight = 500
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("insert into net.http_request_queue(method, url, headers, timeout_milliseconds) "
                     "select 'GET', %s || '/fast', '{}', 5000 from generate_series(1, %s)", (target, total))
    process = serve(db_dsn, "--batch-size", "32767", "--max-inflight", str(max_inflight), workers=2)
    max_rss_kb, max_fds = 0, 0
    done = 0
    deadline = time.monotonic() + 240
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        while done < total:
            assert time.monotonic() < deadline, f"only {done} of {total} answered"
            for pid in process.worker_pids():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    max_fds = max(max_fds, len(os.listdir(f"/proc/{pid}/fd")))
                except (FileNotFoundError, ProcessLookupError):
                    continue
                rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
                max_rss_kb = max(max_rss_kb, rss_kb)
            done = conn.execute("select count(*) from net._http_response").fetchone()[0]
            time.sleep(0.5)
        assert counts(conn) == (total, total, 0)
    assert "was killed" not in process.log and "crashed" not in process.log
    assert max_fds <= max_inflight + 64, max_fds
    assert max_rss_kb < 300 * 1024, f"worker RSS {max_rss_kb} kB"


def test_a_reconnecting_worker_gives_back_what_it_lost_track_of(db, db_dsn, serve, http_server):
    """A claim whose reply the connection lost, or a write-back a crash undid, leaves rows leased
    to a live worker that knows nothing of them: after its reconnect they go at once, not at
    lease expiry, and what it still has in flight is not given away."""
    serve(db_dsn)
    token = os.urandom(4).hex()
    slow = db.execute("select net.http_get(%s, timeout_milliseconds => 60000)",
                      (http_server.url_for(f"/delay/2000?t={token}"),)).fetchone()[0]
    owner = wait_until(lambda: db.execute("select lease_owner from net.http_request_queue where id = %s",
                                          (slow,)).fetchone()[0], message="the slow request leased")
    lost = db.execute("""insert into net.http_request_queue(method, url, headers, timeout_milliseconds,
                                                            lease_owner, lease_expires_at, attempts)
                         values ('GET', %s, '{}', 5000, %s, now() + interval '1 hour', 1) returning id""",
                      (http_server.url_for("/echo"), owner)).fetchone()[0]
    db.execute("select pg_terminate_backend(pid) from pg_stat_activity "
               "where datname = current_database() and application_name like 'pgnet-curl worker%'")
    answered = lambda request_id: db.execute(  # noqa: E731
        "select status_code from net._http_response where id = %s", (request_id,)).fetchone()
    assert wait_until(lambda: answered(lost), timeout_s=10, message="the lost request answered") == (200,)
    assert wait_until(lambda: answered(slow), timeout_s=10, message="the slow request answered") == (200,)
    assert sum(1 for entry in http_server.requests if token in entry.get("query", "")) == 1, \
        "the request in flight was not given away and sent again"
    assert db.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0
