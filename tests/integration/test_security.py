"""Privileges as installed: what PUBLIC, the worker's role and private-mode roles may do.

Every check logs in as a real role with no grants of its own and tries what a user would.
"""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

from helpers import wait_until

from pgnet_curl import schema

def connect_as(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def table_privileges(conn: psycopg.Connection, role: str) -> dict[str, set[str]]:
    """{table: privileges role holds on it} for every table and sequence in schema net."""
    kinds = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]
    rows = conn.execute(
        """select c.relname, k.privilege
           from pg_class c cross join unnest(%s::text[]) as k(privilege)
           where c.relnamespace = 'net'::regnamespace and c.relkind = 'r'
             and has_table_privilege(%s, c.oid, k.privilege)""",
        (kinds, role),
    ).fetchall()
    sequences = conn.execute(
        """select c.relname, k.privilege
           from pg_class c cross join unnest(array['USAGE', 'SELECT', 'UPDATE']) as k(privilege)
           where c.relnamespace = 'net'::regnamespace and c.relkind = 'S'
             and has_sequence_privilege(%s, c.oid, k.privilege)""",
        (role,),
    ).fetchall()
    found: dict[str, set[str]] = {}
    for table, privilege in rows + sequences:
        found.setdefault(table, set()).add(privilege)
    return found


def column_updates(conn: psycopg.Connection, role: str, table: str) -> set[str]:
    return {name for (name,) in conn.execute(
        """select attname from pg_attribute
           where attrelid = %s::regclass and attnum > 0 and not attisdropped
             and has_column_privilege(%s, attrelid, attnum, 'UPDATE')""", (table, role)).fetchall()}


# What pg_net code does, and nothing more: call the request functions, read the queue and the
# responses, collect responses, delete old responses.
SHARED_PUBLIC = {"http_request_queue": {"SELECT"}, "_http_response": {"SELECT", "DELETE"},
                 # Requests in line behind their ordering key's head, or held for an open circuit:
                 # pending, like the queue's.
                 "_ordered_requests": {"SELECT"}, "_held_requests": {"SELECT"}}
WORKER = {
    "http_request_queue": {"SELECT", "DELETE"},
    "_http_response": {"SELECT", "INSERT", "DELETE"},
    "_http_request_archive": {"SELECT", "INSERT", "DELETE"},
    "_schema_migrations": {"SELECT"},
    "_install_options": {"SELECT"},
    "signing_keys": {"SELECT"},
    "destination_limits": {"SELECT", "INSERT", "UPDATE"},
    "_destination_buckets": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "_destination_leases": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    # Ordering and circuits (sql/0012): the keys are read; requests in line move into the queue
    # only through the owner's functions; circuits are the worker's to keep.
    "_ordering_keys": {"SELECT"},
    "_ordered_requests": {"SELECT"},  # PUBLIC's, in shared mode
    "_held_requests": {"SELECT", "INSERT"},
    "_destination_circuits": {"SELECT", "INSERT", "UPDATE", "DELETE"},
}


def test_public_holds_only_what_pg_net_code_uses(db, make_role):
    name, dsn = make_role()
    assert table_privileges(db, name) == SHARED_PUBLIC
    assert column_updates(db, name, "net.http_request_queue") == set()
    with connect_as(dsn) as conn:
        request_id = conn.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0]
        assert conn.execute("select count(*) from net.http_request_queue").fetchone()[0] == 1
        assert conn.execute("select (net._http_collect_response(%s)).status", (request_id,)).fetchone()[0] == "PENDING"
        for statement in (
            "insert into net.http_request_queue(method, url, headers, timeout_milliseconds) values ('GET', 'http://x/', '{}', 1)",
            "update net.http_request_queue set url = 'http://127.0.0.1:1/'",
            "truncate net._http_response",
            "insert into net._http_response(id, status_code) values (1, 200)",
            "select * from net._schema_migrations",
            "select nextval('net.http_request_queue_id_seq')",
            "select net._queue_request('GET', 'http://127.0.0.1:9/', '{}', '{}', null, 100)",
            "create table net.mine(id int)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


ESCALATION_FUNCTION = """
    create function {fn}() returns trigger language plpgsql as $$
    begin
        execute 'alter role ' || quote_ident(current_user) || ' superuser';
        return null;
    end $$"""


@pytest.mark.parametrize("mode", ["shared", "private"])
def test_a_role_cannot_plant_a_trigger_that_the_worker_fires(mode, db_dsn, db, make_role, serve, http_server):
    if mode == "private":
        schema.install(db_dsn, private=True)
    mallory, dsn = make_role("pgnet_user")
    # A schema of its own to create functions in (PostgreSQL 15+ closes public to PUBLIC).
    db.execute(sql.SQL("create schema {0} authorization {0}").format(sql.Identifier(mallory)))
    with connect_as(dsn) as conn:
        conn.execute(ESCALATION_FUNCTION.format(fn=f"{mallory}.escalate"))
        for table in ("net._http_response", "net.http_request_queue"):
            for statement in (
                f"create trigger escalate after insert on {table} for each statement execute function {mallory}.escalate()",
                f"create rule escalate as on insert to {table} do also select 1",
                f"create policy escalate on {table} using (true)",
                f"alter table {table} disable row level security",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
        request_id = conn.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    # The worker connects as the superuser here (the harshest case), and writes the response back.
    serve(db_dsn)
    wait_until(lambda: db.execute("select status_code from net._http_response where id = %s",
                                  (request_id,)).fetchone(), message="the response row")
    assert db.execute("select rolsuper from pg_roles where rolname = %s", (mallory,)).fetchone() == (False,)


def test_worker_role_holds_exactly_what_the_worker_uses(db, db_dsn, worker_dsn, serve, http_server):
    worker = conninfo_to_dict(worker_dsn)["user"]
    assert table_privileges(db, "pgnet_worker") == WORKER
    assert column_updates(db, "pgnet_worker", "net.http_request_queue") == {
        "lease_owner", "lease_expires_at", "attempts", "not_before", "retries"}
    assert column_updates(db, "pgnet_worker", "net._http_response") == {"callback_error"}
    assert db.execute("select rolsuper, rolcreaterole, rolcreatedb, rolbypassrls from pg_roles where rolname = %s",
                      (worker,)).fetchone() == (False, False, False, False)

    # An old response for the TTL sweep, which runs when a worker starts.
    db.execute("insert into net._http_response(id, status_code, created) values (-1, 200, now() - interval '1 day')")
    process = serve(worker_dsn, "--ttl", "1 hour", workers=2)
    sessions = db.execute("select distinct usename from pg_stat_activity where application_name like 'pgnet-curl worker%'").fetchall()
    assert sessions == [(worker,)]
    ids = [db.execute("select net.http_get(%s)", (http_server.url_for(f"/status/{code}"),)).fetchone()[0]
           for code in (200, 404, 503)]
    wait_until(lambda: db.execute("select count(*) from net._http_response where id = any(%s)", (ids,)).fetchone()[0] == 3,
               message="three response rows written by the unprivileged worker")
    wait_until(lambda: db.execute("select count(*) from net._http_response where id = -1").fetchone()[0] == 0,
               message="the TTL sweep, run as the same role")
    assert process.stop() == 0
    assert "permission denied" not in process.log


def test_private_mode_each_role_sees_only_its_own(db, db_dsn, make_role, worker_dsn, serve, http_server):
    schema.install(db_dsn, private=True)
    assert table_privileges(db, "public") == {}
    alice, alice_dsn = make_role("pgnet_user")
    bob, bob_dsn = make_role("pgnet_user")
    carol, carol_dsn = make_role()

    url = http_server.url_for("/echo")
    with connect_as(alice_dsn) as a, connect_as(bob_dsn) as b:
        alice_ids = [a.execute("select net.http_get(%s, headers => '{\"Authorization\": \"Bearer alice-secret\"}')",
                               (url,)).fetchone()[0] for _ in range(2)]
        bob_id = b.execute("select net.http_post(%s, '{\"who\": \"bob\"}')", (url,)).fetchone()[0]
        assert a.execute("select id, requested_by from net.http_request_queue order by id").fetchall() == [
            (alice_ids[0], alice), (alice_ids[1], alice)]
        assert b.execute("select id, requested_by from net.http_request_queue").fetchall() == [(bob_id, bob)]
        # Nobody can queue a row in someone else's name, or touch the worker's columns.
        with pytest.raises(errors.InsufficientPrivilege):
            a.execute("insert into net.http_request_queue(method, url, headers, timeout_milliseconds, requested_by) "
                      "values ('GET', %s, '{}', 1000, %s)", (url, bob))
        with pytest.raises(errors.InsufficientPrivilege):
            a.execute("update net.http_request_queue set url = 'http://127.0.0.1:1/'")

        serve(worker_dsn)
        wait_until(lambda: db.execute("select count(*) from net._http_response").fetchone()[0] == 3,
                   message="the worker answers both roles")
        assert sorted(a.execute("select id from net._http_response").fetchall()) == [(i,) for i in alice_ids]
        assert b.execute("select id, requested_by, status_code from net._http_response").fetchall() == [(bob_id, bob, 200)]
        assert a.execute("select (net._http_collect_response(%s)).status", (bob_id,)).fetchone()[0] == "ERROR"
        assert b.execute("select (net._http_collect_response(%s)).status", (bob_id,)).fetchone()[0] == "SUCCESS"
        # Deleting "all" responses deletes one's own.
        assert a.execute("delete from net._http_response").rowcount == 2
    assert db.execute("select id from net._http_response").fetchall() == [(bob_id,)]

    with connect_as(carol_dsn) as c:
        for statement in ("select net.http_get('http://127.0.0.1:9/')", "select * from net._http_response",
                          "select * from net.http_request_queue"):
            with pytest.raises(errors.InsufficientPrivilege):
                c.execute(statement)


def test_reinstall_keeps_the_mode_and_switching_back_restores_pg_nets_grants(db_dsn, db, make_role):
    schema.install(db_dsn, private=True)
    schema.install(db_dsn)  # no flag: an existing install keeps its mode
    assert table_privileges(db, "public") == {}
    schema.install(db_dsn, private=False)
    name, dsn = make_role()
    assert table_privileges(db, name) == SHARED_PUBLIC
    with connect_as(dsn) as conn:
        assert conn.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0] > 0


def test_install_tightens_the_grants_of_an_older_install(db_dsn, db, make_role):
    # What versions 1-3 granted.
    db.execute("grant all on all tables in schema net to public; grant all on all sequences in schema net to public")
    name, _ = make_role()
    assert "TRIGGER" in table_privileges(db, name)["_http_response"]
    schema.install(db_dsn)
    assert table_privileges(db, name) == SHARED_PUBLIC


def test_worker_restart_is_for_every_role_as_in_pg_net(db_dsn, db, make_role):
    """pg_net lets any role call it (issue 17); private mode: members of pgnet_user, not others."""
    _, dsn = make_role()
    with connect_as(dsn) as conn:
        assert conn.execute("select net.worker_restart()").fetchone() == (False,)
    schema.install(db_dsn, private=True)
    _, member_dsn = make_role("pgnet_user")
    _, other_dsn = make_role()
    with connect_as(member_dsn) as conn:
        assert conn.execute("select net.worker_restart()").fetchone() == (False,)
    with connect_as(other_dsn) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("select net.worker_restart()")


def test_worker_can_check_that_the_worker_is_up_as_any_role(db, make_role, worker_dsn, serve):
    _, dsn = make_role()
    serve(worker_dsn)
    with connect_as(dsn) as conn:
        conn.execute("select net.check_worker_is_up()")


def test_install_creates_the_worker_login_role(db_dsn, db):
    from test_install import run_cli

    name = f"pgnet_test_worker_{os.getpid()}"
    try:
        result = run_cli("install", "--dsn", db_dsn, "--worker-role", name, "--worker-password", "s3cret-pw")
        assert result.returncode == 0, result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
        row = db.execute(
            """select r.rolcanlogin, r.rolsuper, pg_has_role(r.oid, 'pgnet_worker', 'member'), a.rolpassword
               from pg_roles r join pg_authid a on a.oid = r.oid where r.rolname = %s""", (name,)).fetchone()
        assert row[:3] == (True, False, True)
        assert row[3].startswith("SCRAM-SHA-256$4096:")
        # A superuser is refused as the worker's role.
        refused = run_cli("install", "--dsn", db_dsn, "--worker-role", conninfo_to_dict(db_dsn).get("user", "postgres"))
        assert refused.returncode == 4 and "superuser" in refused.stderr
    finally:
        db.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
        db.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


def test_private_mode_gives_members_no_worker_function(db_dsn, db):
    schema.install(db_dsn, private=True)
    granted = {name for (name,) in db.execute(
        """select p.proname from pg_proc p where p.pronamespace = 'net'::regnamespace
           and has_function_privilege('pgnet_user', p.oid, 'EXECUTE')""").fetchall()}
    assert {"http_get", "http_post", "http_delete", "http_request", "retry_request"} <= granted
    assert "worker_restart" in granted  # as pg_net lets every role call it
    assert not granted & {"rotate_signing_key", "_run_callbacks", "_claim_limited",
                          "_destination_limits_due_s", "_destination_limits_for", "_apply_privileges",
                          "_circuit_held_hosts", "_claim_probes", "_circuit_release", "_ordering_advance",
                          "_ordering_release_idle"}
