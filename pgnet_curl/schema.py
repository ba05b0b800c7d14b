"""Install, upgrade and remove the `net` schema from the SQL files shipped with the package."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import time

import psycopg

from . import db, setting_names
from .errors import DatabaseUnavailable, SchemaError
from .redact import db_error_text
from .sql_files import sql_dir

# Serialises concurrent installs of the same database (any constant works; this spells "pgnet").
INSTALL_LOCK_KEY = 0x70676E6574
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
log = logging.getLogger("pgnet_curl.install")

# The tables a PostgreSQL crash must not empty: logged by default, unlogged (pg_net's trade-off:
# less WAL, emptied by crash recovery) with `install --unlogged`. The queue's mode is the install's.
TABLES = ("net.http_request_queue", "net._http_response", "net._http_request_archive",
          # Requests in line behind their key's head, the keys, the circuits and the requests they
          # hold (sql/0012): as the queue.
          "net._ordered_requests", "net._ordering_keys", "net._destination_circuits", "net._held_requests")
# relpersistence of the tables -> the mode `status` and /healthz name, and what it means.
_MODES = {"p": "durable", "u": "unlogged"}
DURABILITY = {
    "durable": "logged tables: a PostgreSQL crash loses no request or response",
    "unlogged": "a PostgreSQL crash empties the queue and the responses, as with pg_net "
                "(pgnet-curl install --durable makes the tables logged)",
    "mixed": "some net tables are logged and some not: a crash empties the unlogged ones "
             "(pgnet-curl install --durable or --unlogged)",
}
WAITING_FOR_SCHEMA = "waiting for the net schema: run pgnet-curl install"


def migrations() -> list[tuple[int, str, str]]:
    """Return (version, file name, SQL text) of every numbered schema file, in order."""
    found = []
    for path in sql_dir().iterdir():
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path.name, path.read_text(encoding="utf-8")))
    found.sort()
    return found


def latest_version() -> int:
    return migrations()[-1][0]


def install_script(durable: bool | None = None, private: bool | None = None) -> str:
    """Return the whole idempotent install script, as `pgnet-curl sql` prints it.

    durable=True makes the tables logged (converting an unlogged install), False unlogged (pg_net's
    choice), None creates them logged and leaves an existing install's mode as it is. private=True
    installs the private mode, False the shared one, None keeps what an existing install has
    (shared for a new one); see sql/0004_privileges.sql.
    """
    return "".join(_script_parts(durable, private))


def _script_parts(durable: bool | None, private: bool | None) -> tuple[str, str, str]:
    """The script in three parts: up to the migrations, the tables' persistence, the rest."""
    parts = [f"-- pgnet-curl schema version {latest_version()}\nbegin;\n"]
    parts.append(f"select pg_advisory_xact_lock({INSTALL_LOCK_KEY});\n")
    if private is not None:
        parts.append(f"set local pgnet_curl.private = {'on' if private else 'off'};\n")
    for _, name, text in migrations():
        parts.append(f"\n-- ==== {name} ====\n{text}")
    # Last: privileges for every object, whichever file created it (sql/0004_privileges.sql).
    # Delivered at commit: workers waiting for the schema (or serving a dropped one) look now.
    tail = (f"select net._apply_privileges();\n"
            f"\nselect pg_notify('{db.CONTROL_CHANNEL}', 'installed');\n"
            f"\ncommit;\n")
    return "".join(parts), "\n" + _persistence_sql(durable), tail


def _persistence_sql(durable: bool | None) -> str:
    """Make the tables logged or unlogged (None: as the queue is), taking no lock when they already are.

    The files create them logged. None matters on upgrades: a table a newer file creates (the
    archive, in 0007) follows the mode of the install it joins.
    """
    if durable is None:
        mode = ("(select case relpersistence when 'u' then 'unlogged' else 'logged' end "
                "from pg_class where oid = 'net.http_request_queue'::regclass)")
        code = "(select relpersistence from pg_class where oid = 'net.http_request_queue'::regclass)"
        tables = TABLES[1:]
    else:
        mode, code = ("'logged'", "'p'") if durable else ("'unlogged'", "'u'")
        tables = TABLES
    return "".join(
        f"do $$ begin\n"
        f"  if (select relpersistence from pg_class where oid = '{table}'::regclass) <> {code} then\n"
        f"    execute format('alter table {table} set %s', {mode});\n"
        f"  end if;\n"
        f"end $$;\n"
        for table in tables
    )


def installed_version(conn: psycopg.Connection) -> int | None:
    """Return the schema version installed in the connected database, or None."""
    with db.database_errors("reading the schema version"):
        return _installed_version(conn)


def _installed_version(conn: psycopg.Connection) -> int | None:
    row = conn.execute("select to_regclass('net._schema_migrations') is not null").fetchone()
    if not row[0]:
        return None
    return conn.execute("select max(version) from net._schema_migrations").fetchone()[0]


def install(dsn: str, durable: bool | None = None, private: bool | None = None,
            worker_role: str | None = None, worker_password: str | None = None) -> int:
    """Apply the schema to the database at dsn; safe to run again. Return the version.

    durable=True makes the tables logged (they survive a crash), False unlogged (pg_net's
    choice), None leaves an existing install as it is (new installs are logged). Converting an
    existing install rewrites its tables under an exclusive lock: the time it took is logged.
    private likewise chooses the privilege mode. worker_role names a login role to create (or
    keep) as a member of pgnet_worker, for `serve` to connect as.
    """
    head, persistence_sql, tail = _script_parts(durable, private)
    with db.connect(dsn, "pgnet-curl install") as conn:
        try:
            before = persistence(conn)
            conn.execute(head.encode())
            started_s = time.monotonic()
            conn.execute(persistence_sql.encode())
            converted_s = time.monotonic() - started_s
            after = persistence(conn)
            conn.execute(tail.encode())
            if before is not None and after != before:
                log.info("converted the net tables from %s to %s in %.2f s (ALTER TABLE ... SET %s)", before,
                         after, converted_s, "LOGGED" if after == "durable" else "UNLOGGED")
            if worker_role:
                ensure_worker_role(conn, worker_role, worker_password)
            version = _installed_version(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable(
                f"lost the database while installing the net schema: {db_error_text(exc)}") from None
        except psycopg.Error as exc:
            raise SchemaError(f"could not install the net schema: {db_error_text(exc)}") from None
        _declare_setting_names(conn)
    return version


def persistence(conn: psycopg.Connection) -> str | None:
    """Say how the net tables survive a crash: 'durable' (logged), 'unlogged' (emptied by crash
    recovery, as pg_net's), 'mixed' (someone altered one); None without the schema."""
    rows = conn.execute(
        "select c.relpersistence from unnest(%s::text[]) as t(name) join pg_class c on c.oid = to_regclass(t.name)",
        (list(TABLES),)).fetchall()
    kinds = {kind for (kind,) in rows}
    if not kinds:
        return None
    if len(kinds) > 1:
        return "mixed"
    return _MODES.get(kinds.pop(), "mixed")


def _declare_setting_names(conn: psycopg.Connection) -> None:
    """Let `alter system set pg_net.*` work in any session on PostgreSQL 13-16 (a superuser only)."""
    try:
        setting_names.declare(conn)
    except psycopg.Error as exc:
        log.warning("could not declare the pg_net.* names in postgresql.auto.conf (%s); "
                    "ALTER SYSTEM for them needs set_config(name, '', false) first on PostgreSQL 13-16",
                    db_error_text(exc))


def ensure_worker_role(conn: psycopg.Connection, name: str, password: str | None = None) -> None:
    """Create login role `name` if it does not exist and make it a member of pgnet_worker.

    The role gets nothing else: pgnet_worker holds exactly the privileges the worker uses.
    A password, when given, is set (also on an existing role).
    """
    from psycopg import sql

    role = sql.Identifier(name)
    exists = conn.execute("select rolsuper from pg_roles where rolname = %s", (name,)).fetchone()
    if exists and exists[0]:
        raise SchemaError(f"role {name} is a superuser: the worker's role must not be one; pick another name")
    if not exists:
        conn.execute(sql.SQL("create role {} login").format(role))
    if password is not None:
        # Sent already hashed, so the password itself never reaches the server's statement log.
        conn.execute(sql.SQL("alter role {} login password {}").format(role, sql.Literal(scram_verifier(password))))
    conn.execute(sql.SQL("grant pgnet_worker to {}").format(role))


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """Return PostgreSQL's SCRAM-SHA-256 verifier for a password (RFC 5802, RFC 7677)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def uninstall(dsn: str) -> None:
    """Drop schema net and everything in it: queued requests and stored responses too."""
    with db.connect(dsn, "pgnet-curl uninstall") as conn, db.database_errors("dropping the net schema"):
        conn.execute("drop schema if exists net cascade")
