"""pg_net's worker behaviours that code and monitoring written for pg_net rely on (issue 17), run
against `pgnet-curl serve` as such code runs them: TTL passes, net.worker_restart() for any role,
a terminated worker session, direct inserts waiting for a wake, pg_net.username and
pg_net.database_name, and a `net` schema that is not ours."""

from __future__ import annotations

import itertools
import os
import time

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from helpers import wait_until
from test_lifecycle import WAITING, alter_system, restored_settings  # noqa: F401 - a fixture
from test_worker import row, wait_for_row

from pgnet_curl import schema

_numbers = itertools.count(1)
WORKERS = "application_name like 'pgnet-curl worker%%'"


def worker_pids(conn) -> set[int]:
    return {pid for (pid,) in conn.execute(
        f"select pid from pg_stat_activity where datname = current_database() and {WORKERS}").fetchall()}


def wait_new_workers(conn, old: set[int], count: int = 2, timeout_s: float = 15) -> set[int]:
    """Wait until `count` worker sessions are connected here, none of them one of `old`."""
    return wait_until(lambda: (pids := worker_pids(conn)) and len(pids) == count and not pids & old and pids,
                      timeout_s, interval_s=0.02, message=f"{count} new worker sessions")


def response_count(conn) -> int:
    return conn.execute("select count(*) from net._http_response").fetchone()[0]


# ---- 1. TTL --------------------------------------------------------------------------------

def test_a_one_second_ttl_holds_without_a_new_request(db, db_dsn, serve, http_server):
    serve(db_dsn, workers=2)
    db.execute(f"alter database \"{db.info.dbname}\" set pg_net.ttl = '1 second'")
    db.execute("select net.worker_restart()")
    db.execute("select net.wait_until_running()")
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    wait_for_row(db, request_id)
    seen_s = time.monotonic()
    age_s = db.execute("select extract(epoch from now() - created)::float8 from net._http_response where id = %s",
                       (request_id,)).fetchone()[0]
    wait_until(lambda: row(db, request_id) is None, timeout_s=8, interval_s=0.02, message="the row to expire")
    lifetime_s = age_s + time.monotonic() - seen_s
    print(f"\nTTL 1 s: the row was gone {lifetime_s * 1000:.0f} ms after it was stored, with no new request")
    assert lifetime_s < 1.0 + 1.5, "pg_net.ttl holds within about a second"


def test_expired_responses_go_at_a_wake_in_passes_of_batch_size_a_second_apart(db, db_dsn, serve):
    # One worker, as pg_net has: each worker makes its own passes (at its start too), so with two
    # the count could go 4 -> 2 -> 0 in two passes of different workers a few ms apart.
    serve(db_dsn, "--batch-size", "2", workers=1)
    db.execute("insert into net._http_response(id, status_code, created) "
               "select -n, 200, now() - interval '7 hours' from generate_series(1, 4) n")
    db.execute("select net.wake()")
    changes = [(response_count(db), time.monotonic())]

    def gone():
        count = response_count(db)
        if count != changes[-1][0]:
            changes.append((count, time.monotonic()))
        return count == 0

    wait_until(gone, timeout_s=10, interval_s=0.02, message="the expired rows to go")
    assert [count for count, _ in changes] == [4, 2, 0], changes
    between_s = changes[2][1] - changes[1][1]
    print(f"\nbatch_size 2, 4 expired: 4 -> 2 after {(changes[1][1] - changes[0][1]) * 1000:.0f} ms, "
          f"2 -> 0 {between_s * 1000:.0f} ms later")
    assert between_s > 0.5, "passes about a second apart, as pg_net's"


# ---- 2. net.worker_restart() ---------------------------------------------------------------

def test_any_role_restarts_every_worker_and_a_loop_of_restarts_loses_nothing(db, db_dsn, serve, make_role,
                                                                            http_server):
    process = serve(db_dsn, workers=2)
    _, dsn = make_role()  # a plain `create role`: pg_net lets any role call it
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set statement_timeout = '20s'")
        before = worker_pids(db)
        started_s = time.monotonic()
        assert conn.execute("select net.worker_restart()").fetchone()[0] is True
        conn.execute("select net.wait_until_running()")
        waited_s = time.monotonic() - started_s
        after = worker_pids(db)
        print(f"\nworker_restart: wait_until_running returned after {waited_s * 1000:.0f} ms, "
              f"every worker in a new session")
        assert len(after) == 2 and not after & before, (before, after, process.log)

        before = after
        started_s = time.monotonic()
        conn.execute("select net.worker_restart()")
        wait_new_workers(db, before)
        restarted_s = time.monotonic() - started_s
        print(f"worker_restart: new pids after {restarted_s * 1000:.0f} ms")
        assert restarted_s < 3.0, process.log

        # Calls in a loop merge into pending restarts: requests in flight meanwhile are answered
        # once, and sent once.
        http_server.reset()
        ids = []
        deadline_s = time.monotonic() + 2
        for n in itertools.count():
            if time.monotonic() > deadline_s:
                break
            conn.execute("select net.worker_restart()")
            if n % 5 == 0:
                ids.append(db.execute("select net.http_get(%s)", (http_server.url_for("/delay/150"),)).fetchone()[0])
    wait_until(lambda: db.execute("select count(*) from net._http_response where id = any(%s)",
                                  (ids,)).fetchone()[0] == len(ids),
               timeout_s=30, message=f"{len(ids)} responses")
    assert db.execute("select count(*), count(distinct id), count(*) filter (where status_code = 200) "
                      "from net._http_response where id = any(%s)", (ids,)).fetchone() == (len(ids),) * 3
    sent = sum(1 for request in http_server.requests if request["path"] == "/delay/150")
    assert sent == len(ids), f"sent {sent} times for {len(ids)} requests\n{process.log}"


# ---- 3. a terminated worker session -------------------------------------------------------

def test_terminated_worker_sessions_come_back_after_pg_nets_restart_delay(db, db_dsn, serve, http_server):
    process = serve(db_dsn, workers=2)
    assert db.execute(f"select count(pg_terminate_backend(pid)) from pg_stat_activity "
                      f"where datname = current_database() and {WORKERS}").fetchone()[0] == 2
    # Queued while the workers are away: its wake reaches nobody; the reconnect is one.
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    seen = []

    def back():
        # What a monitor polling every 0.05 s sees.
        seen.append((len(worker_pids(db)), time.monotonic()))
        return seen[-1][0] == 2 and any(count == 0 for count, _ in seen)

    wait_until(back, timeout_s=15, interval_s=0.05, message="the workers to go and come back")
    down_s = seen[-1][1] - next(at for count, at in seen if count == 0)
    print(f"\nterminated: the workers were down for {down_s * 1000:.0f} ms")
    assert down_s >= 0.7, "back after about a second, as pg_net's restart delay"
    assert wait_for_row(db, request_id)["status_code"] == 200
    assert "ended its session" in process.log, process.log


# ---- 4. direct inserts ---------------------------------------------------------------------

def insert_row(db, url: str, extra_columns: str = "", extra_values: str = "") -> int:
    return db.execute(f"insert into net.http_request_queue(method, url, headers, timeout_milliseconds{extra_columns}) "
                      f"values ('GET', %s, '{{}}', 5000{extra_values}) returning id", (url,)).fetchone()[0]


@pytest.mark.parametrize("limits", [False, True], ids=["plain claim", "limited claim"])
def test_a_row_inserted_directly_waits_for_a_wake_and_the_poll_takes_only_overdue_rows(db, db_dsn, serve,
                                                                                      http_server, limits):
    if limits:
        # A limit for another host: every claim is the limited one, the poll's too. (A concurrency
        # limit would also claim after each write-back that may free a slot: see the README.)
        db.execute("insert into net.destination_limits(host_pattern, max_per_second) values ('other.invalid', 50)")
    serve(db_dsn, workers=2)  # safety poll every 0.5 s
    http_server.reset()
    # What the safety poll is for: a lease whose worker died, and a retry that is due. Answered
    # first: then both workers are past their start, which is a wake and claims everything.
    expired = insert_row(db, http_server.url_for("/status/202"), ", lease_owner, lease_expires_at, attempts",
                         ", 'gone:0:1', now() - interval '1 second', 1")
    due = insert_row(db, http_server.url_for("/status/203"), ", not_before, retries",
                     ", now() - interval '1 second', 1")
    wait_for_row(db, expired, timeout_s=5)
    wait_for_row(db, due, timeout_s=5)
    inserted_s = time.monotonic()
    direct = insert_row(db, http_server.url_for("/status/201"))
    # And the poll keeps reclaiming expired leases meanwhile, without taking the direct row.
    expired_again = insert_row(db, http_server.url_for("/status/204"), ", lease_owner, lease_expires_at, attempts",
                               ", 'gone:0:2', now() - interval '1 second', 1")
    wait_for_row(db, expired_again, timeout_s=5)
    # Not synchronisation: nothing may send it for 5 s (pg_net's users check exactly this).
    time.sleep(max(0.0, inserted_s + 5 - time.monotonic()))
    assert row(db, direct) is None and http_server.hits("/status/201") == 0
    woken_s = time.monotonic()
    db.execute("select net.wake()")
    assert wait_for_row(db, direct, timeout_s=5)["status_code"] == 201
    print(f"\ndirect insert: not sent in 5 s; sent {(time.monotonic() - woken_s) * 1000:.0f} ms after net.wake()")


# ---- 5. pg_net.database_name and pg_net.username -------------------------------------------

def worker_places(pg_server) -> list[tuple[str, str]]:
    """(database, role) of each worker session; one still authenticating shows as ('', '')."""
    with pg_server.admin() as admin:
        return sorted(admin.execute(f"select coalesce(datname, ''), coalesce(usename, '') from pg_stat_activity "
                                    f"where {WORKERS}").fetchall())


def test_pg_net_database_name_and_username_are_followed_at_each_restart(db, db_dsn, serve, pg_server, make_role,
                                                                         restored_settings, http_server):
    role, _ = make_role("pgnet_worker")
    other_db = f"pgnet_other_{os.getpid()}_{next(_numbers)}"
    other_dsn = pg_server.create_database(other_db)
    try:
        home_db, home_role = db.info.dbname, conninfo_to_dict(db_dsn).get("user", "postgres")
        process = serve(db_dsn, workers=2)
        assert worker_places(pg_server) == [(home_db, home_role)] * 2
        with pg_server.admin() as admin:
            alter_system(admin, "pg_net.database_name", other_db)
            alter_system(admin, "pg_net.username", role)
        started_s = time.monotonic()
        db.execute("select net.worker_restart()")  # reloads the configuration, as pg_net's
        wait_until(lambda: worker_places(pg_server) == [(other_db, role)] * 2, interval_s=0.02,
                   message="the workers in the named database as the named role")
        print(f"\npg_net.database_name / pg_net.username: moved after {(time.monotonic() - started_s) * 1000:.0f} ms")
        with psycopg.connect(other_dsn, autocommit=True) as other:
            request_id = other.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
            assert wait_for_row(other, request_id)["status_code"] == 200

            # A role that cannot log in: said once, with the reason; the workers stay (anew).
            with pg_server.admin() as admin:
                alter_system(admin, "pg_net.username", "pgnet_no_such_role")
            before = worker_pids(other)
            other.execute("select net.worker_restart()")
            wait_new_workers(other, before)
            wait_until(lambda: "could not serve database" in process.log, message="the failure line")
            assert process.log.count("could not serve database") == 1, process.log
            assert 'role "pgnet_no_such_role" does not exist' in process.log
            assert worker_places(pg_server) == [(other_db, role)] * 2

            # pg_net's defaults (unset): the DSN decides again.
            with pg_server.admin() as admin:
                alter_system(admin, "pg_net.database_name", "postgres")
                alter_system(admin, "pg_net.username", "")
            other.execute("select net.worker_restart()")
        wait_until(lambda: worker_places(pg_server) == [(home_db, home_role)] * 2, interval_s=0.02,
                   message="the workers back where the DSN says")

        # Serving several databases, serve follows neither setting, and says so once.
        with pg_server.admin() as admin:
            alter_system(admin, "pg_net.database_name", other_db)
            admin.execute("select pg_reload_conf()")
        process.kill()
        wait_until(lambda: not worker_places(pg_server), message="the first serve's sessions to end")
        several = serve(db_dsn, "--dsn", other_dsn, workers=1)
        wait_until(lambda: worker_places(pg_server) == sorted([(home_db, home_role), (other_db, home_role)]),
                   message="a worker in each database, as its DSN says")
        assert several.log.count("not followed") == 1, several.log
    finally:
        pg_server.drop_database(other_db)


# ---- 6. a net schema that is not ours ------------------------------------------------------

def test_a_net_schema_without_our_tables_keeps_one_quiet_session(db, db_dsn, worker_dsn, serve, http_server):
    process = serve(worker_dsn, workers=2)
    db.execute("drop schema net cascade")
    db.execute("create schema net")  # empty, and the worker's role may not even use it
    wait_until(lambda: WAITING in process.log, message="the waiting line")
    before = worker_pids(db)
    db.execute(f"select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database() and {WORKERS}")
    pids = wait_new_workers(db, before)
    # Not synchronisation: the sessions must stay the same while nothing changes.
    stable_until_s = time.monotonic() + 2.5
    while time.monotonic() < stable_until_s:
        assert worker_pids(db) == pids, process.log
        time.sleep(0.1)
    assert process.log.count(WAITING) == 1 and "permission denied" not in process.log, process.log
    schema.install(db_dsn)
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    assert wait_for_row(db, request_id)["status_code"] == 200
