"""Declare pg_net's setting names in postgresql.auto.conf, so ALTER SYSTEM takes them (PostgreSQL 13-16).

PostgreSQL before 17 refuses `alter system set pg_net.ttl = ...` in a session that has never
seen the name (no loaded module defines it). A name some configuration file sets is known to
every session, at system level, so a database- or role-level setting still wins over it, as
with pg_net. The values written are pg_net's defaults, and only for names no file sets yet.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql as pg_sql

from .sql_files import queries

log = logging.getLogger("pgnet_curl.install")

PG_NET_DEFAULTS = {
    "pg_net.batch_size": "200",
    "pg_net.ttl": "6 hours",
    "pg_net.database_name": "postgres",
    "pg_net.username": "",
}
# From this version on, ALTER SYSTEM accepts any custom name.
_ALTER_SYSTEM_TAKES_ANY_NAME = 170000


def declare(conn: psycopg.Connection) -> list[str]:
    """As a superuser on PostgreSQL 13-16, declare the names no file sets; return those declared.

    Runs outside a transaction (ALTER SYSTEM cannot run in one), on an autocommit connection.
    """
    if conn.info.server_version >= _ALTER_SYSTEM_TAKES_ANY_NAME:
        return []
    statements = queries()
    if not conn.execute(statements["is_superuser"]).fetchone()[0]:
        log.info("not a superuser: pg_net.* names not declared; see the README's Settings section")
        return []
    names = list(PG_NET_DEFAULTS)
    configured = {row[0] for row in conn.execute(statements["configured_names"], {"names": names})}
    missing = [name for name in names if name not in configured]
    for name in missing:
        conn.execute(statements["declare_placeholder"], {"name": name})
        prefix, suffix = name.split(".")
        conn.execute(pg_sql.SQL("alter system set {} = {}").format(
            pg_sql.Identifier(prefix, suffix), pg_sql.Literal(PG_NET_DEFAULTS[name])))
    if missing:
        # New sessions fork from the postmaster: it must read the file to know the names.
        conn.execute(statements["reload_conf"])
        log.info("declared %s in postgresql.auto.conf (pg_net's defaults)", ", ".join(missing))
    return missing
