"""`pgnet-curl serve` end to end: SQL call -> real worker processes -> loopback server -> row."""

from __future__ import annotations

import json
import re
import time

import psycopg
import pytest
from psycopg import errors

from helpers import wait_until
from serve_process import ServeProcess, connected_workers

from pgnet_curl import __version__


def response_count(db) -> int:
    return db.execute("select count(*) from net._http_response").fetchone()[0]


def wait_for_responses(db, count: int, timeout_s: float = 30) -> None:
    wait_until(lambda: response_count(db) >= count, timeout_s, message=f"{count} response rows")


def row(db, request_id: int) -> dict:
    cur = db.execute("select * from net._http_response where id = %s", (request_id,))
    values = cur.fetchone()
    return dict(zip([c.name for c in cur.description], values)) if values else None


def wait_for_row(db, request_id: int, timeout_s: float = 15) -> dict:
    return wait_until(lambda: row(db, request_id), timeout_s, message=f"response of request {request_id}")


def wait_claimed(db, count: int) -> None:
    wait_until(lambda: db.execute(
        "select count(*) from net.http_request_queue where lease_owner is not null").fetchone()[0] == count,
        message=f"all {count} requests claimed")


def test_get_post_delete_round_trips(db, db_dsn, serve, http_server):
    serve(db_dsn)
    get_id = db.execute("select net.http_get(%s, '{\"q\": \"a b\"}', '{\"X-Test\": \"yes\"}')",
                        (http_server.url_for("/echo"),)).fetchone()[0]
    post_id = db.execute("select net.http_post(%s, '{\"hello\": \"wörld\"}')",
                         (http_server.url_for("/echo"),)).fetchone()[0]
    delete_id = db.execute("select net.http_delete(%s, body => '{\"id\": 7}')",
                           (http_server.url_for("/echo"),)).fetchone()[0]

    got = wait_for_row(db, get_id)
    assert got["status_code"] == 200
    assert got["content_type"] == "application/json"
    assert got["headers"]["Content-Type"] == "application/json"
    assert got["timed_out"] is False and got["error_msg"] is None
    echo = json.loads(got["content"])
    assert echo["method"] == "GET"
    assert echo["query"] == "q=a%20b"
    sent = {name.lower(): value for name, value in echo["headers"]}
    assert sent["x-test"] == "yes"
    assert sent["user-agent"] == f"pg_net/0.20 (pgnet-curl/{__version__})"

    echo = json.loads(wait_for_row(db, post_id)["content"])
    assert echo["method"] == "POST"
    assert json.loads(echo["body"]) == {"hello": "wörld"}
    assert dict((n.lower(), v) for n, v in echo["headers"])["content-type"] == "application/json"

    echo = json.loads(wait_for_row(db, delete_id)["content"])
    assert (echo["method"], json.loads(echo["body"])) == ("DELETE", {"id": 7})

    assert db.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0
    result = db.execute("select (r).status::text, ((r).response).status_code from net._http_collect_response(%s) r",
                        (get_id,)).fetchone()
    assert result == ("SUCCESS", 200)


def test_refused_connection_and_http_errors_are_rows(db, db_dsn, serve, http_server):
    serve(db_dsn)
    refused = db.execute("select net.http_get('http://127.0.0.1:1/')").fetchone()[0]
    not_found = db.execute("select net.http_get(%s)", (http_server.url_for("/status/503"),)).fetchone()[0]
    timed_out = db.execute("select net.http_get(%s, timeout_milliseconds => 200)",
                           (http_server.url_for("/delay/3000"),)).fetchone()[0]

    got = wait_for_row(db, refused)
    assert (got["status_code"], got["timed_out"], got["error_msg"]) == (None, False, "Couldn't connect to server")
    got = wait_for_row(db, not_found)
    assert (got["status_code"], got["content"], got["error_msg"]) == (503, "status 503", None)
    got = wait_for_row(db, timed_out)
    assert got["timed_out"] is True and got["status_code"] is None
    assert got["error_msg"].startswith("Timeout of 200 ms reached. Total time: ")
    collected = db.execute("select (r).status::text, (r).message from net._http_collect_response(%s) r",
                           (refused,)).fetchone()
    assert collected == ("ERROR", "Couldn't connect to server")


def test_two_thousand_requests_in_one_transaction_all_answered_once(db_dsn, serve, http_server):
    process = serve(db_dsn, workers=2)
    http_server.reset()
    with psycopg.connect(db_dsn) as conn:
        conn.execute("select net.http_get(%s || '/echo?n=' || n) from generate_series(1, 2000) n",
                     (http_server.url,))
        conn.commit()
        conn.autocommit = True
        wait_for_responses(conn, 2000, timeout_s=60)
        assert conn.execute(
            "select count(*), count(distinct id), count(*) filter (where status_code = 200) from net._http_response"
        ).fetchone() == (2000, 2000, 2000)
        assert conn.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0
    assert http_server.hits("/echo") == 2000
    # One worker is woken per commit; with a backlog it calls the other in to share it.
    assert process.stop() == 0
    claimed = [int(n) for n in re.findall(r"worker \d stopped: \{'claimed': (\d+)", process.log)]
    assert sum(claimed) == 2000 and len(claimed) == 2 and min(claimed) > 0, claimed


def test_slow_request_does_not_delay_fast_ones(db, db_dsn, serve, http_server):
    serve(db_dsn)
    with psycopg.connect(db_dsn) as conn:
        slow_id = conn.execute("select net.http_get(%s, timeout_milliseconds => 10000)",
                               (http_server.url_for("/delay/4000"),)).fetchone()[0]
        conn.execute("select net.http_get(%s) from generate_series(1, 50)", (http_server.url_for("/echo"),))
        conn.commit()
    committed = time.monotonic()
    wait_for_responses(db, 50, timeout_s=10)
    fast_visible_s = time.monotonic() - committed
    assert row(db, slow_id) is None, "the slow request is still in flight"
    assert fast_visible_s < 3.0
    wait_for_row(db, slow_id)


def test_rollback_sends_nothing(db, db_dsn, serve, http_server):
    serve(db_dsn)
    http_server.reset()
    with psycopg.connect(db_dsn) as conn:
        conn.execute("select net.http_get(%s)", (http_server.url_for("/echo?rolled-back"),))
        conn.rollback()
    marker = db.execute("select net.http_get(%s)", (http_server.url_for("/echo?committed"),)).fetchone()[0]
    wait_for_row(db, marker)
    assert [r["query"] for r in http_server.requests] == ["committed"]
    assert response_count(db) == 1


def test_two_serve_processes_answer_each_request_exactly_once(db_dsn, serve, http_server):
    first = serve(db_dsn, workers=2)
    serve(db_dsn, workers=2, wait=False).wait_ready(expected_workers=4)
    http_server.reset()
    total = 3000
    with psycopg.connect(db_dsn) as conn:
        for _ in range(3):
            conn.execute("select net.http_get(%s || '/echo?n=' || n) from generate_series(1, 1000) n",
                         (http_server.url,))
            conn.commit()
        conn.autocommit = True
        wait_for_responses(conn, total, timeout_s=60)
        ids = conn.execute("select count(*), count(distinct id) from net._http_response").fetchone()
    assert ids == (total, total)
    assert http_server.hits("/echo") == total
    assert first.proc.poll() is None


def test_terminated_database_session_is_survived(db, db_dsn, serve, http_server):
    process = serve(db_dsn)
    terminated = db.execute(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity "
        "where datname = current_database() and application_name like 'pgnet-curl worker%'"
    ).fetchone()[0]
    assert terminated == 1
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    assert wait_for_row(db, request_id)["status_code"] == 200
    process.wait_ready()
    assert "reconnected to the database" in process.log, process.log


def test_sigterm_lets_in_flight_requests_finish(db, db_dsn, serve, http_server):
    process = serve(db_dsn)
    db.execute("select net.http_get(%s) from generate_series(1, 20)", (http_server.url_for("/delay/1500"),))
    wait_claimed(db, 20)
    assert process.stop() == 0
    assert response_count(db) == 20
    assert db.execute("select count(*) from net._http_response where status_code = 200").fetchone()[0] == 20


def test_drain_deadline_releases_unfinished_requests_for_the_next_worker(db, db_dsn, serve, http_server):
    process = serve(db_dsn, "--drain-timeout", "0.5")
    db.execute("select net.http_get(%s, timeout_milliseconds => 20000) from generate_series(1, 5)",
               (http_server.url_for("/delay/4000"),))
    wait_claimed(db, 5)
    assert process.stop() == 0
    assert "released 5 unfinished requests" in process.log
    assert db.execute("select count(*) from net.http_request_queue where lease_owner is null").fetchone()[0] == 5
    assert response_count(db) == 0

    serve(db_dsn)
    wait_for_responses(db, 5, timeout_s=30)
    assert db.execute("select count(distinct id) from net._http_response where status_code = 200").fetchone()[0] == 5


def test_batch_size_setting_and_worker_restart(db, db_dsn, serve, http_server):
    is_superuser = db.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]
    if not is_superuser:
        pytest.skip("alter system needs a superuser")
    process = serve(db_dsn)
    try:
        # PostgreSQL 12-16 accept ALTER SYSTEM for a custom setting only once the session knows
        # its name (17+ always); pg_net users get the same effect from its C extension.
        db.execute("select set_config('pg_net.batch_size', '200', false)")
        db.execute("alter system set pg_net.batch_size = 7")
        db.execute("select pg_reload_conf()")
        assert db.execute("select net.worker_restart()").fetchone()[0] is True
        wait_until(lambda: "settings: batch_size=7" in process.log, message="the worker to apply batch_size=7")
    finally:
        db.execute("alter system reset pg_net.batch_size")
        db.execute("select pg_reload_conf()")
    db.execute("select net.http_get(%s) from generate_series(1, 30)", (http_server.url_for("/echo"),))
    wait_for_responses(db, 30)


def test_alter_database_setting_applies_on_worker_restart(db, db_dsn, serve):
    process = serve(db_dsn)
    db.execute(f"alter database \"{db.info.dbname}\" set pg_net.batch_size = 11")
    db.execute("select net.worker_restart()")
    wait_until(lambda: "settings: batch_size=11" in process.log, message="the worker to apply batch_size=11")


def test_flags_override_database_settings(db, db_dsn, serve):
    db.execute(f"alter database \"{db.info.dbname}\" set pg_net.batch_size = 9")
    process = serve(db_dsn, "--batch-size", "3")
    wait_until(lambda: "batch_size=3" in process.log, message="the worker's start line")
    db.execute("select net.worker_restart()")
    wait_until(lambda: process.log.count("settings: batch_size=3") == 1, message="settings after restart")


def test_check_worker_is_up_follows_the_service(db, db_dsn, serve):
    process = serve(db_dsn)
    db.execute("select net.check_worker_is_up()")
    process.stop()
    wait_until(lambda: connected_workers(db_dsn) == 0, message="worker sessions to end")
    with pytest.raises(errors.RaiseException, match="the pg_net background worker is not up"):
        db.execute("select net.check_worker_is_up()")


def test_bad_dsn_exits_with_code_3(empty_db_dsn):
    """A missing schema is waited for (tests/integration/test_lifecycle.py); a bad DSN is an error."""
    bad = ServeProcess("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert bad.proc.wait(30) == 3
    assert "connecting to the database" in bad.log and "Traceback" not in bad.log


def test_serve_install_flag_installs_the_schema(empty_db_dsn, serve, http_server):
    serve(empty_db_dsn, "--install")
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        request_id = conn.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
        assert wait_for_row(conn, request_id)["status_code"] == 200


def test_stop_signal_to_the_whole_process_group_still_drains(db, db_dsn, serve, http_server):
    """Ctrl-C in a terminal (or systemd) signals every process; in-flight requests still finish."""
    import os
    import signal

    process = serve(db_dsn)
    db.execute("select net.http_get(%s) from generate_series(1, 10)", (http_server.url_for("/delay/1000"),))
    wait_claimed(db, 10)
    for pid in process.worker_pids():
        os.kill(pid, signal.SIGINT)
    process.proc.send_signal(signal.SIGINT)
    assert process.proc.wait(30) == 0
    assert db.execute("select count(*) from net._http_response where status_code = 200").fetchone()[0] == 10
