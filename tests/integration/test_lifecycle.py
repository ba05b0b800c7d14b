"""pg_net's lifecycle: serve before the schema exists, through drop + reinstall, and follow
`alter system` + `pg_reload_conf()` without a restart, on PostgreSQL 13 to 18."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import psycopg
import psycopg.conninfo
import pytest

from helpers import wait_until
from test_ops import free_port, get

from pgnet_curl import schema
from pgnet_curl.setting_names import PG_NET_DEFAULTS

WAITING = "waiting for the net schema: run pgnet-curl install"


def response(conn, request_id: int) -> tuple | None:
    return conn.execute("select status_code, content from net._http_response where id = %s",
                        (request_id,)).fetchone()


def wait_answered(conn, request_id: int, timeout_s: float = 10) -> tuple:
    return wait_until(lambda: response(conn, request_id), timeout_s, interval_s=0.005,
                      message=f"response of request {request_id}")


def reinstall(conn) -> None:
    """What pg_net's test suite does between tests, with our install script for `create extension`."""
    conn.execute("drop schema net cascade")
    conn.execute(schema.install_script().encode())


def status_verdict(dsn: str) -> str:
    return json.loads(subprocess.run(
        [sys.executable, "-m", "pgnet_curl", "status", "--dsn", dsn, "--json"],
        capture_output=True, text=True, timeout=60, check=True).stdout)["verdict"]


def test_serve_waits_for_the_schema_and_serves_once_it_is_installed(empty_db_dsn, serve, http_server):
    assert status_verdict(empty_db_dsn) == "DOWN: no net schema and no worker connected: run pgnet-curl install"
    port = free_port()
    process = serve(empty_db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1", workers=2)
    health = f"http://127.0.0.1:{port}/healthz"
    dbname = psycopg.conninfo.conninfo_to_dict(empty_db_dsn)["dbname"]
    expected = {"status": "unhealthy", "workers": 2, "alive": 2, "connected": 2, "waiting_for_schema": 2,
                "durability": {dbname: None}, "reason": WAITING}
    wait_until(lambda: (r := get(health)) and r[0] == 503 and json.loads(r[1]) == expected and r,
               message="healthz to report both workers waiting")
    assert status_verdict(empty_db_dsn) == f"DOWN: {WAITING} (2 workers connected and waiting)"

    # Not synchronisation: waiting a while is how to see that nothing is logged meanwhile.
    time.sleep(1.5)
    assert process.proc.poll() is None, process.log
    assert process.log.count(WAITING) == 1, process.log
    warnings = [line for line in process.log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and WAITING in warnings[0], process.log

    schema.install(empty_db_dsn)
    installed_s = time.monotonic()
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        request_id = conn.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
        assert wait_answered(conn, request_id)[0] == 200
    took_s = time.monotonic() - installed_s
    print(f"\nfirst answer {took_s * 1000:.0f} ms after the install")
    assert took_s < 1.0
    assert request_id == 1
    wait_until(lambda: (r := get(health)) and r[0] == 200 and json.loads(r[1])["durability"] == {dbname: "durable"},
               message="healthz to turn healthy, durable")


def test_drop_and_reinstall_twenty_times_under_serve(db, db_dsn, serve, http_server):
    """The compatibility check: a request right after each reinstall is answered at once."""
    process = serve(db_dsn, workers=2)
    url = http_server.url_for("/echo")
    first = db.execute("select net.http_get(%s)", (url,)).fetchone()[0]
    wait_answered(db, first)
    answer_s = []
    for _ in range(20):
        reinstall(db)
        started_s = time.monotonic()
        request_id = db.execute("select net.http_get(%s)", (url,)).fetchone()[0]
        assert request_id == 1, "request ids restart at 1 after a reinstall, as with pg_net"
        try:
            assert wait_answered(db, request_id)[0] == 200
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nserve's log:\n{process.log}") from None
        answer_s.append(time.monotonic() - started_s)
    print(f"\nanswer after reinstall: p50 {statistics.median(answer_s) * 1000:.1f} ms, "
          f"max {max(answer_s) * 1000:.1f} ms")
    assert max(answer_s) < 1.0, answer_s
    assert process.proc.poll() is None
    assert "retrying" not in process.log, process.log


def test_a_request_in_flight_at_the_drop_does_not_answer_the_new_request_one(db, db_dsn, serve, http_server):
    serve(db_dsn)
    old = db.execute("select net.http_get(%s, timeout_milliseconds => 5000)",
                     (http_server.url_for("/delay/700"),)).fetchone()[0]
    assert http_server.wait_for_hits(1, "/delay/700")
    reinstall(db)
    new = db.execute("select net.http_get(%s, timeout_milliseconds => 5000)",
                     (http_server.url_for("/delay/1500"),)).fetchone()[0]
    assert old == new == 1
    assert wait_answered(db, new) == (200, "delayed 1500")
    assert db.execute("select count(*) from net._http_response").fetchone()[0] == 1


def test_a_drop_while_serving_waits_connected_and_logs_once(db, db_dsn, serve, http_server):
    process = serve(db_dsn, workers=2)
    db.execute("drop schema net cascade")
    wait_until(lambda: WAITING in process.log, message="the waiting line")
    time.sleep(1.5)  # not synchronisation: nothing more may be logged while waiting
    assert process.log.count(WAITING) == 1 and "retrying" not in process.log, process.log
    db.execute(schema.install_script().encode())
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    assert wait_answered(db, request_id, timeout_s=1.0)[0] == 200


@pytest.mark.parametrize("table", ["signing_keys", "destination_limits"])
def test_a_drop_while_a_worker_connects_is_logged_once(db, db_dsn, serve, http_server, table):
    """The schema goes between a starting worker's check and its first reads of it."""
    with psycopg.connect(db_dsn) as dropper:  # one transaction: the drop commits while the read waits
        dropper.execute(f"lock table net.{table}")
        process = serve(db_dsn, wait=False)
        wait_until(lambda: db.execute(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and application_name = 'pgnet-curl worker 1' and wait_event_type = 'Lock'").fetchone()[0],
            timeout_s=20, message=f"worker 1 to wait for net.{table}")
        dropper.execute("drop schema net cascade")
    wait_until(lambda: WAITING in process.log, message="the waiting line")
    time.sleep(1.5)  # not synchronisation: nothing more may be logged while waiting
    assert process.log.count(WAITING) == 1 and "retrying" not in process.log, process.log
    db.execute(schema.install_script().encode())
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    assert wait_answered(db, request_id)[0] == 200


# ---- settings reload ---------------------------------------------------------------------

AUTO_CONF_ENTRIES = ("select name, setting from pg_file_settings "
                     "where sourcefile like '%%postgresql.auto.conf' and name like 'pg_net.%%' order by seqno")


def test_an_outdated_schema_waits_for_the_upgrade(db, db_dsn, serve, http_server):
    # As an older install records itself (the objects are newer, but the worker goes by the version).
    db.execute("delete from net._schema_migrations where version > 3")
    process = serve(db_dsn)
    request_id = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    wait_until(lambda: "this pgnet-curl needs version" in process.log, message="the outdated-schema warning")
    assert response(db, request_id) is None, "nothing is sent against an outdated schema"
    schema.install(db_dsn)
    assert wait_answered(db, request_id, timeout_s=5)[0] == 200
    assert process.log.count("this pgnet-curl needs version") == 1, "said once, not at every check"


def alter_system(conn, name: str, value: str | None) -> None:
    """ALTER SYSTEM as a test admin does, knowing the name first (PostgreSQL 13-16 need it)."""
    conn.execute("select set_config(%s, '', false)", (name,))
    prefix, suffix = name.split(".")
    if value is None:
        conn.execute(f'alter system reset "{prefix}"."{suffix}"')
    else:
        conn.execute(f"alter system set \"{prefix}\".\"{suffix}\" = '{value}'")


@pytest.fixture
def restored_settings(pg_server):
    """Put postgresql.auto.conf's pg_net.* entries back as they were, whatever the test did."""
    with pg_server.admin() as admin:
        before = dict(admin.execute(AUTO_CONF_ENTRIES).fetchall())
    yield pg_server
    with pg_server.admin() as admin:
        for name in PG_NET_DEFAULTS:
            alter_system(admin, name, before.get(name))
        admin.execute("select pg_reload_conf()")


def fresh_session_setting(dsn: str, name: str) -> str | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select current_setting(%s, true)", (name,)).fetchone()[0]


def test_alter_system_reaches_the_workers_within_a_second(db_dsn, serve, restored_settings):
    admin_dsn = restored_settings.admin_dsn
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        version = admin.info.server_version
        for name in PG_NET_DEFAULTS:
            alter_system(admin, name, None)
        alter_system(admin, "pg_net.ttl", "3 hours")  # set before the install: kept
        admin.execute("select pg_reload_conf()")
    # A reset name stays known to the running server ('' then) until it restarts, so a fresh
    # session refusing ALTER SYSTEM cannot be shown here: the file entries are what lasts.
    wait_until(lambda: fresh_session_setting(admin_dsn, "pg_net.batch_size") in (None, "")
               and fresh_session_setting(admin_dsn, "pg_net.ttl") == "3 hours", message="the reset to apply")

    schema.install(db_dsn)
    expected = {**PG_NET_DEFAULTS, "pg_net.ttl": "3 hours"} if version < 170000 else {"pg_net.ttl": "3 hours"}
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        assert dict(admin.execute(AUTO_CONF_ENTRIES).fetchall()) == expected

    process = serve(db_dsn)
    wait_until(lambda: "ttl=3:00:00" in process.log, message="the worker's first settings")
    for statement, logged in (("alter system set pg_net.batch_size = 3", "batch_size=3 "),
                              ("alter system set pg_net.ttl = '2 hours'", "ttl=2:00:00")):
        # A new session each time, as a user's psql would be: no set_config() beforehand.
        with psycopg.connect(admin_dsn, autocommit=True) as fresh:
            fresh.execute(statement)
            fresh.execute("select pg_reload_conf()")
        reloaded_s = time.monotonic()
        wait_until(lambda: logged in process.log, timeout_s=5, message=f"workers to log {logged!r}")
        took_s = time.monotonic() - reloaded_s
        print(f"\n{statement}: reached the worker after {took_s * 1000:.0f} ms")
        assert took_s < 1.0, f"{statement}: the reload took too long"
    assert "restarting its database session" not in process.log


def test_a_database_setting_wins_over_the_system_one(db, db_dsn, serve, restored_settings):
    """Declared names stay at system level: alter database ... set keeps precedence, as with pg_net."""
    schema.install(db_dsn)
    with psycopg.connect(restored_settings.admin_dsn, autocommit=True) as fresh:
        fresh.execute("alter system set pg_net.batch_size = 4")
        fresh.execute("select pg_reload_conf()")
    db.execute(f'alter database "{db.info.dbname}" set pg_net.batch_size = 9')
    process = serve(db_dsn)
    wait_until(lambda: "batch_size=9" in process.log, message="the database's batch size")
    assert "batch_size=4" not in process.log


def test_follow_pg_net_settings_serves_the_named_database_as_the_named_role(
        db_dsn, empty_db_dsn, serve, restored_settings, http_server):
    target_db = psycopg.conninfo.conninfo_to_dict(db_dsn)["dbname"]
    role = "pgnet_follow_test"
    with psycopg.connect(restored_settings.admin_dsn, autocommit=True) as admin:
        admin.execute(f"drop role if exists {role}")
        admin.execute(f"create role {role} login superuser")
        alter_system(admin, "pg_net.database_name", target_db)
        alter_system(admin, "pg_net.username", role)
        admin.execute("select pg_reload_conf()")
    process = serve(empty_db_dsn, "--follow-pg-net-settings", wait=False)
    try:
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            wait_until(lambda: conn.execute(
                "select usename from pg_stat_activity where datname = current_database() "
                "and application_name = 'pgnet-curl worker 1'").fetchone(), message="a worker in the named database")
            assert conn.execute("select usename from pg_stat_activity where datname = current_database() "
                                "and application_name = 'pgnet-curl worker 1'").fetchone()[0] == role
            request_id = conn.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
            assert wait_answered(conn, request_id)[0] == 200
        with psycopg.connect(empty_db_dsn, autocommit=True) as other:
            assert other.execute("select count(*) from pg_stat_activity where datname = current_database() "
                                 "and application_name like 'pgnet-curl worker%'").fetchone()[0] == 0
        assert f"serving database {target_db} as role {role}" in process.log
    finally:
        process.kill()
        with psycopg.connect(restored_settings.admin_dsn, autocommit=True) as admin:
            admin.execute(f"drop role if exists {role}")
