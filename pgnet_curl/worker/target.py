"""Where a worker's session goes: the database and role its DSN names, or those pg_net.database_name
and pg_net.username name when they are set, as pg_net's worker connects."""

from __future__ import annotations

from psycopg.conninfo import make_conninfo

from .. import db

# pg_net's default database: `pgnet-curl install` writes it into postgresql.auto.conf on
# PostgreSQL 13-16 (setting_names.py), so it cannot tell an explicit choice from the default.
PG_NET_DEFAULT_DATABASE = "postgres"


def wanted_dsn(base_dsn: str, database_name: str | None, username: str | None) -> str:
    """base_dsn aimed at the database and role pg_net's settings name; unset ones keep the DSN's.

    The DSN's host, port, password and other parameters stay.
    """
    changes = {}
    if database_name and database_name != PG_NET_DEFAULT_DATABASE:
        changes["dbname"] = database_name
    if username:
        changes["user"] = username
    return make_conninfo(base_dsn, **changes) if changes else base_dsn


def place(dsn: str) -> tuple[str, str]:
    """(database, role) a DSN connects to, as far as the DSN says (libpq's defaults otherwise)."""
    params = db.parse_dsn(dsn)
    user = params.get("user") or ""
    return params.get("dbname") or user, user


def same_place(dsn: str, other: str) -> bool:
    return place(dsn) == place(other)
