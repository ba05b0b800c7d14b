"""What a worker's commits cost and promise: synchronous_commit in its sessions, and write-backs
the database refuses for a while (read-only after a failover, a full disk)."""

from __future__ import annotations

import psycopg
import pytest

from helpers import wait_until

from pgnet_curl import db as pgnet_db
from pgnet_curl.errors import DatabaseUnavailable, PgnetCurlError


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


@pytest.mark.xfail(strict=True, reason="--synchronous-commit: worker part pending "
                                       "(Worker._connect passes settings.synchronous_commit to db.connect)")
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
