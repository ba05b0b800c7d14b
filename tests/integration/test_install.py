"""Installing, upgrading and removing the schema, from Python and from the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import psycopg
import pytest

from pgnet_curl import schema

CLI = [sys.executable, "-m", "pgnet_curl"]


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, timeout=60)


def net_objects(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """select 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
               from pg_proc p where p.pronamespace = (select oid from pg_namespace where nspname = 'net')
               union all select 'relation', relname from pg_class where relnamespace = (select oid from pg_namespace where nspname = 'net')
               union all select 'type', typname from pg_type
                 where typnamespace = (select oid from pg_namespace where nspname = 'net') and typname not like '\\_%%' and typrelid = 0
               order by 1, 2"""
        ).fetchall()


def test_install_into_empty_database_then_again_keeps_data(empty_db_dsn):
    assert schema.install(empty_db_dsn) == schema.latest_version()
    before = net_objects(empty_db_dsn)
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get('http://127.0.0.1:9/')")
        conn.execute("insert into net._http_response(id, status_code) values (1, 200)")
    assert schema.install(empty_db_dsn) == schema.latest_version()
    assert net_objects(empty_db_dsn) == before
    with psycopg.connect(empty_db_dsn) as conn:
        assert conn.execute("select count(*) from net.http_request_queue").fetchone()[0] == 1
        assert conn.execute("select count(*) from net._http_response").fetchone()[0] == 1
        assert conn.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0] == 2


def test_concurrent_installs_do_not_collide(empty_db_dsn):
    failures = []

    def install():
        try:
            schema.install(empty_db_dsn)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=install) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def persistence_of(dsn: str) -> dict[str, str]:
    """relpersistence of each table in schema.TABLES and of the queue's id sequence."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "select t.name, c.relpersistence from unnest(%s::text[]) as t(name) join pg_class c on c.oid = to_regclass(t.name)",
            ([*schema.TABLES, "net.http_request_queue_id_seq"],)).fetchall())


LOGGED = {"net.http_request_queue": "p", "net._http_response": "p", "net._http_request_archive": "p",
          "net._ordered_requests": "p", "net._ordering_keys": "p", "net._destination_circuits": "p",
          "net._held_requests": "p",
          "net.http_request_queue_id_seq": "p"}


def test_new_install_is_logged_and_keeps_its_mode_until_asked(empty_db_dsn):
    schema.install(empty_db_dsn)
    assert persistence_of(empty_db_dsn) == LOGGED
    schema.install(empty_db_dsn, durable=False)
    unlogged = persistence_of(empty_db_dsn)
    assert {unlogged[table] for table in schema.TABLES} == {"u"}
    # The sequence follows its table from PostgreSQL 15 on; before, sequences are always logged.
    # Either way a crash never hands out an id twice: a logged table's sequence is logged.
    schema.install(empty_db_dsn)  # no flag: an existing install keeps its persistence
    assert persistence_of(empty_db_dsn) == unlogged
    schema.install(empty_db_dsn, durable=True)
    assert persistence_of(empty_db_dsn) == LOGGED


def test_unlogged_install_stays_unlogged_through_an_upgrade_that_adds_a_table(empty_db_dsn):
    """An install from before 0007 gains the archive: it takes the queue's mode, not the file's."""
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        for _, _, text in schema.migrations()[:6]:
            conn.execute(text.encode())
        conn.execute("alter table net.http_request_queue set unlogged; alter table net._http_response set unlogged")
    schema.install(empty_db_dsn)
    assert {persistence_of(empty_db_dsn)[table] for table in schema.TABLES} == {"u"}


def test_cli_converts_an_existing_install_and_says_how_long_it_took(empty_db_dsn):
    assert run_cli("install", "--dsn", empty_db_dsn, "--unlogged").returncode == 0
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute("select net.http_get('http://127.0.0.1:9/') from generate_series(1, 1000)")
    result = run_cli("install", "--dsn", empty_db_dsn, "--durable")
    assert result.returncode == 0, result.stderr
    assert re.search(r"converted the net tables from unlogged to durable in \d+\.\d\d s "
                     r"\(ALTER TABLE \.\.\. SET LOGGED\)", result.stderr), result.stderr
    assert persistence_of(empty_db_dsn) == LOGGED
    with psycopg.connect(empty_db_dsn) as conn:
        assert conn.execute("select count(*) from net.http_request_queue").fetchone()[0] == 1000
    again = run_cli("install", "--dsn", empty_db_dsn)
    assert again.returncode == 0 and "converted" not in again.stderr


def test_status_names_the_durability(empty_db_dsn):
    schema.install(empty_db_dsn)
    report = json.loads(run_cli("status", "--dsn", empty_db_dsn, "--json").stdout)
    assert report["durability"] == "durable"
    schema.install(empty_db_dsn, durable=False)
    text = run_cli("status", "--dsn", empty_db_dsn).stdout
    assert "durability unlogged: a PostgreSQL crash empties the queue and the responses" in text


def test_cli_install_and_uninstall(empty_db_dsn):
    result = run_cli("install", "--dsn", empty_db_dsn)
    assert result.returncode == 0, result.stderr
    assert f"net schema version {schema.latest_version()} installed" in result.stdout
    assert ("relation", "http_request_queue") in net_objects(empty_db_dsn)

    refused = run_cli("uninstall", "--dsn", empty_db_dsn, input="n\n")
    assert refused.returncode != 0
    assert ("relation", "http_request_queue") in net_objects(empty_db_dsn)

    result = run_cli("uninstall", "--dsn", empty_db_dsn, "--yes")
    assert result.returncode == 0, result.stderr
    assert net_objects(empty_db_dsn) == []

    # A reinstall starts request ids at 1 again.
    schema.install(empty_db_dsn)
    with psycopg.connect(empty_db_dsn) as conn:
        assert conn.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0] == 1


def test_cli_install_reads_dsn_from_environment(empty_db_dsn):
    import os

    env = {**os.environ, "DATABASE_URL": empty_db_dsn}
    env.pop("PGNET_DSN", None)
    result = subprocess.run([*CLI, "install"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("relation", "http_request_queue") in net_objects(empty_db_dsn)


def test_printed_sql_installs_the_same_schema(empty_db_dsn, db_dsn):
    result = run_cli("sql")
    assert result.returncode == 0
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute(result.stdout.encode())
        conn.execute(result.stdout.encode())  # twice: the script is idempotent
    assert net_objects(empty_db_dsn) == net_objects(db_dsn)
    assert persistence_of(empty_db_dsn) == LOGGED
    unlogged = run_cli("sql", "--unlogged")
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute(unlogged.stdout.encode())
    assert {persistence_of(empty_db_dsn)[table] for table in schema.TABLES} == {"u"}


def test_cli_install_with_bad_dsn_says_so():
    result = run_cli("install", "--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert result.returncode == 3
    assert "connecting to the database" in result.stderr and "Connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_embedded_server_adopts_a_running_cluster(pg_server):
    if pg_server.embedded is None:
        pytest.skip("PGNET_TEST_DSN names an external server")
    from pgnet_curl.embedded import EmbeddedPostgres

    again = EmbeddedPostgres(pg_server.embedded.data_dir)
    assert again.start() == pg_server.embedded.dsn


def test_upgrade_from_version_one_keeps_data(empty_db_dsn):
    _, _, version_one = schema.migrations()[0]
    with psycopg.connect(empty_db_dsn, autocommit=True) as conn:
        conn.execute(version_one.encode())
        conn.execute("insert into net._http_response(id, status_code, content) values (1, 200, 'kept')")
    assert schema.install(empty_db_dsn) == schema.latest_version()
    with psycopg.connect(empty_db_dsn) as conn:
        assert conn.execute("select content, content_bytes from net._http_response").fetchall() == [("kept", None)]


def test_upgrade_from_version_eight_folds_the_option_columns_into_options(db):
    """Versions 7 and 8 kept each delivery option (and the host) in a column of its own."""
    for table in ("net.http_request_queue", "net._http_request_archive"):
        db.execute(f"""alter table {table} add column max_retries int, add column retry_backoff_ms int,
                       add column notify_channel text, add column idempotency_key text, add column signing_key_id text,
                       add column callback regprocedure, add column replay_of bigint""")
    db.execute("alter table net.http_request_queue add column host text")
    db.execute("""insert into net.http_request_queue(method, url, headers, timeout_milliseconds, max_retries,
                                                     notify_channel, callback)
                  values ('GET', 'http://127.0.0.1:9/a', '{}', 1000, 3, 'done', 'pg_catalog.abs(bigint)'),
                         ('GET', 'http://127.0.0.1:9/b', '{}', 1000, null, null, null)""")
    db.execute("""insert into net._http_request_archive(id, method, url, headers, timeout_milliseconds, requested_by,
                                                       created_at, idempotency_key, replay_of)
                  values (7, 'GET', 'http://127.0.0.1:9/c', '{}', 1000, 'postgres', now(), 'msg_5', 5)""")
    db.execute("delete from net._schema_migrations where version = 9")

    db.execute(schema.install_script().encode())

    assert db.execute("select url, options from net.http_request_queue order by id").fetchall() == [
        ("http://127.0.0.1:9/a", {"max_retries": 3, "notify_channel": "done",
                                  "callback": db.execute("select 'pg_catalog.abs(bigint)'::regprocedure::oid").fetchone()[0]}),
        ("http://127.0.0.1:9/b", None)]
    assert db.execute("select options from net._http_request_archive").fetchone()[0] == {
        "idempotency_key": "msg_5", "replay_of": 5}
    left = db.execute("""select attrelid::regclass::text, attname from pg_attribute
                         where attrelid in ('net.http_request_queue'::regclass, 'net._http_request_archive'::regclass)
                           and attname in ('max_retries', 'notify_channel', 'callback', 'replay_of', 'host')
                           and not attisdropped""").fetchall()
    assert left == []
    assert db.execute("select max(version) from net._schema_migrations").fetchone()[0] == schema.latest_version()
