"""Install, upgrade and remove the `net` schema from the SQL files shipped with the package."""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

import psycopg

from . import db
from .errors import DatabaseUnavailable, SchemaError

# Serialises concurrent installs of the same database (any constant works; this spells "pgnet").
INSTALL_LOCK_KEY = 0x70676E6574
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
log = logging.getLogger("pgnet_curl.install")

TABLES = ("net.http_request_queue", "net._http_response")
WAITING_FOR_SCHEMA = "waiting for the net schema: run pgnet-curl install"


def sql_dir() -> Path:
    """Return the folder holding the SQL files: inside the wheel, or sql/ in a checkout."""
    packaged = resources.files("pgnet_curl") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


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


def install_script(durable: bool = False) -> str:
    """Return the whole idempotent install script, as `pgnet-curl sql` prints it."""
    parts = [f"-- pgnet-curl schema version {latest_version()}\nbegin;\n"]
    parts.append(f"select pg_advisory_xact_lock({INSTALL_LOCK_KEY});\n")
    for _, name, text in migrations():
        parts.append(f"\n-- ==== {name} ====\n{text}")
    parts.append("\n" + _persistence_sql(durable))
    # Delivered at commit: workers waiting for the schema (or serving a dropped one) look now.
    parts.append(f"\nselect pg_notify('{db.CONTROL_CHANNEL}', 'installed');\n")
    parts.append("\ncommit;\n")
    return "".join(parts)


def _persistence_sql(durable: bool) -> str:
    """Make the tables logged or unlogged, taking no lock when they already are."""
    mode, code = ("logged", "p") if durable else ("unlogged", "u")
    return "".join(
        f"do $$ begin\n"
        f"  if (select relpersistence from pg_class where oid = '{table}'::regclass) <> '{code}' then\n"
        f"    alter table {table} set {mode};\n"
        f"  end if;\n"
        f"end $$;\n"
        for table in TABLES
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


def install(dsn: str, durable: bool | None = None) -> int:
    """Apply the schema to the database at dsn; safe to run again. Return the version.

    durable=True makes the tables logged (they survive a crash), False unlogged (pg_net's
    choice), None leaves an existing install as it is (new installs are unlogged).
    """
    with db.connect(dsn, "pgnet-curl install") as conn:
        try:
            if durable is None and _installed_version(conn) is not None:
                durable = _is_logged(conn)
            conn.execute(install_script(bool(durable)).encode())
            version = _installed_version(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise DatabaseUnavailable(f"lost the database while installing the net schema: {exc}") from exc
        except psycopg.Error as exc:
            raise SchemaError(f"could not install the net schema: {exc}") from exc
        _declare_setting_names(conn)
    return version


def _declare_setting_names(conn: psycopg.Connection) -> None:
    """Let `alter system set pg_net.*` work in any session on PostgreSQL 13-16 (a superuser only)."""
    from .setting_names import declare

    try:
        declare(conn)
    except psycopg.Error as exc:
        log.warning("could not declare the pg_net.* names in postgresql.auto.conf (%s); "
                    "ALTER SYSTEM for them needs set_config(name, '', false) first on PostgreSQL 13-16",
                    str(exc).strip())


def _is_logged(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "select relpersistence = 'p' from pg_class where oid = 'net.http_request_queue'::regclass"
    ).fetchone()
    return bool(row and row[0])


def uninstall(dsn: str) -> None:
    """Drop schema net and everything in it: queued requests and stored responses too."""
    with db.connect(dsn, "pgnet-curl uninstall") as conn, db.database_errors("dropping the net schema"):
        conn.execute("drop schema if exists net cascade")
