"""What a worker's commits cost and promise: synchronous_commit in its sessions, and write-backs
the database refuses for a while (read-only after a failover, a full disk)."""

from __future__ import annotations

import json
import re
import secrets
import socket
import urllib.error
import urllib.request
from urllib.parse import parse_qs

import psycopg
import pytest

from helpers import wait_until

from pgnet_curl import db as pgnet_db
from pgnet_curl.errors import DatabaseUnavailable, PgnetCurlError, WritesRefused
from pgnet_curl.model import Response
from pgnet_curl.queue import Queue


def record_commit_setting(db) -> None:
    """A trigger on the responses records the synchronous_commit of the session that stores them."""
    db.execute("""
        create table public.seen_commit_setting(setting text);
        create function public.record_commit_setting() returns trigger language plpgsql as $$
        begin
            insert into public.seen_commit_setting values (current_setting('synchronous_commit'));
            return null;
        end $$;
        create trigger record_commit_setting after insert on net._http_response
            for each statement execute function public.record_commit_setting();
    """)


def stored_under(db, http_server) -> str:
    """Make one request and return the synchronous_commit its write-back ran under."""
    db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),))
    return wait_until(lambda: db.execute("select setting from public.seen_commit_setting").fetchone(),
                      message="a stored response")[0]


def test_worker_sessions_commit_without_waiting_for_the_wal_flush(db, db_dsn, serve, http_server):
    record_commit_setting(db)
    serve(db_dsn)
    assert stored_under(db, http_server) == "off"


def test_connect_sets_synchronous_commit_only_where_asked(db_dsn):
    with psycopg.connect(db_dsn) as conn:
        server_value = conn.execute("show synchronous_commit").fetchone()[0]
    cases = [(dict(), server_value), (dict(listen=True), "off"),
             (dict(listen=True, synchronous_commit=True), "on"), (dict(synchronous_commit=False), "off")]
    for kwargs, expected in cases:
        with pgnet_db.connect(db_dsn, "pgnet-curl test", **kwargs) as conn:
            assert conn.execute("show synchronous_commit").fetchone()[0] == expected, kwargs


def test_synchronous_commit_flag_makes_worker_commits_wait(db, db_dsn, serve, http_server):
    record_commit_setting(db)
    serve(db_dsn, "--synchronous-commit", "on")
    assert stored_under(db, http_server) == "on"


def test_a_statement_over_a_program_limit_is_no_connection_problem(db_dsn):
    """Class 54 is an OperationalError to psycopg; reconnecting would retry it forever."""
    with pgnet_db.connect(db_dsn, "pgnet-curl test") as conn:
        with pytest.raises(PgnetCurlError) as raised, pgnet_db.database_errors("writing responses"):
            conn.execute("select concat(" + ", ".join(["1"] * 101) + ")")  # 54023: over 100 arguments
        assert not isinstance(raised.value, DatabaseUnavailable)
        assert "SQLSTATE 54023" in str(raised.value)
    with pgnet_db.connect(db_dsn, "pgnet-curl test") as conn:
        pid = conn.info.backend_pid
        with psycopg.connect(db_dsn, autocommit=True) as other:
            other.execute("select pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DatabaseUnavailable), pgnet_db.database_errors("claiming requests"):
            conn.execute("select 1")


def test_a_write_back_over_jsonb_s_limit_is_a_refused_batch_not_an_outage(db_dsn):
    """Three answers near the 100 MiB cap pass jsonb's 256 MiB in one write-back (SQLSTATE 54000).
    As an outage, the worker retried that batch forever and stored none (measured); as a refused
    batch it writes them one by one (the path test_secrets covers)."""
    body = "x" * (90 * 1024 * 1024)
    with pgnet_db.connect(db_dsn, "pgnet-curl test") as conn:
        with pytest.raises(PgnetCurlError) as raised:
            Queue(conn, "test-owner").write([Response(request_id, status_code=200, content=body)
                                             for request_id in (1, 2, 3)])
    assert not isinstance(raised.value, DatabaseUnavailable)
    assert "SQLSTATE 54000" in str(raised.value)


def test_a_read_only_session_refuses_writes_for_now(db_dsn):
    """Not a refused row (the worker would store an error row instead): the work is kept."""
    with pgnet_db.connect(db_dsn, "pgnet-curl test") as conn:
        conn.execute("set default_transaction_read_only = on")
        with pytest.raises(WritesRefused) as raised, pgnet_db.database_errors("writing responses"):
            conn.execute("delete from net._http_response")
    assert isinstance(raised.value, DatabaseUnavailable)
    assert str(raised.value) == ("writing responses: cannot execute DELETE in a read-only transaction "
                                 "(SQLSTATE 25006)")


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_write_backs_a_read_only_database_refuses_are_kept_and_stored_once_writes_return(
        db, db_dsn, pg_server, serve, http_server):
    """A failover leaves the workers on a read-only server (or a disk fills up): answers are kept
    in memory and their write-back retried with backoff, on new sessions, until writes return."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = serve(db_dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1", workers=2)
    health = f"http://127.0.0.1:{port}/healthz"
    dbname, run, total = db.info.dbname, secrets.token_hex(4), 200
    ids = [row[0] for row in db.execute(
        "select net.http_get(%s || '&n=' || n, timeout_milliseconds => 30000) from generate_series(1, %s) n",
        (http_server.url_for(f"/delay/1500?run={run}"), total))]
    wait_until(lambda: db.execute("select count(*) from net.http_request_queue where lease_owner is not null")
               .fetchone()[0] == total, message="every request in flight")
    with pg_server.admin() as admin:
        admin.execute(f'alter database "{dbname}" set default_transaction_read_only = on')
        try:
            # Their new sessions are read-only: as after a failover onto a standby.
            admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                          "where datname = %s and application_name like 'pgnet-curl worker%%'", (dbname,))
            # The claims are refused first, then each answer as it comes (after 1.5 s): all kept.
            status, body = wait_until(
                lambda: (r := get(health)) and "refuses writes" in r[1].get("reason", "")
                and r[1].get("unwritten_responses") == total and r,
                timeout_s=15, message=f"/healthz to say the database refuses writes, {total} responses kept")
            assert status == 503, body
            assert re.search(r"the database refuses writes \(.*SQLSTATE 25006\)\): keeping \d+ responses", process.log)
            assert db.execute("select count(*) from net._http_response").fetchone()[0] == 0, \
                "no answer stored, and none replaced by an error row"
        finally:
            admin.execute(f'alter database "{dbname}" reset default_transaction_read_only')
    # No session is terminated now: the worker's own retry opens one that can write.
    wait_until(lambda: db.execute("select count(*) from net._http_response").fetchone()[0] >= total,
               timeout_s=30, message="every kept answer stored")
    stored = db.execute("select id, status_code from net._http_response order by id").fetchall()
    assert stored == [(request_id, 200) for request_id in sorted(ids)]
    sent = [parse_qs(entry["query"])["n"][0] for entry in http_server.requests
            if parse_qs(entry["query"]).get("run") == [run]]
    assert sorted(sent, key=int) == [str(n) for n in range(1, total + 1)], "each request sent once, not again"
    wait_until(lambda: get(health)[0] == 200, timeout_s=15, message="healthy again")
    assert "the database accepts writes again" in process.log
