"""`pgnet-curl serve`: resolve the database (given or embedded), check it, supervise workers."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import platformdirs

from psycopg.conninfo import make_conninfo

from . import db, metrics_dir, schema, settings as settings_module

log = logging.getLogger("pgnet_curl.serve")

# Flag names as serve takes them -> Settings fields.
_FLAG_TO_SETTING = {
    "lease_grace": "lease_grace_s",
    "poll_interval": "poll_interval_s",
    "drain_timeout": "drain_timeout_s",
}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("pgnet-curl"))


def follow_pg_net_settings(dsn: str) -> str:
    """Return dsn aimed at the database and role pg_net.database_name / pg_net.username name."""
    from .queue import queries

    conn = db.connect(dsn, "pgnet-curl serve")
    try:
        with db.database_errors("reading pg_net.database_name and pg_net.username"):
            dbname, user = conn.execute(queries()["pg_net_target"]).fetchone()
    finally:
        conn.close()
    log.info("following pg_net's settings: serving database %s as role %s", dbname, user)
    return make_conninfo(dsn, dbname=dbname, user=user)


def serve(dsn: str | None, data_dir: str | None, install_schema: bool, tuning: dict,
          metrics_host: str = "0.0.0.0", metrics_port: int | None = None,
          follow_pg_net: bool = False) -> int:
    """Serve until stopped; return the exit code."""
    metrics_dir.prepare()
    from .supervisor import Supervisor  # after prepare(): it imports prometheus_client

    values = {_FLAG_TO_SETTING.get(name, name): value for name, value in tuning.items()}
    embedded = None
    if not dsn:
        from .embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(Path(data_dir) if data_dir else default_data_dir())
        dsn = embedded.start()
        install_schema = True
        log.info("embedded PostgreSQL running in %s", embedded.data_dir)
    try:
        if follow_pg_net:
            dsn = follow_pg_net_settings(dsn)
        if install_schema:
            version = schema.install(dsn)
            log.info("net schema version %d installed", version)
        settings = settings_module.build(dsn=dsn, **values)
        supervisor = Supervisor(settings, metrics_host, metrics_port)
        supervisor.check_database()
        if embedded:
            click.echo(f"\nConnect with:  psql {dsn}\n"
                       f"Try:           select net.http_get('http://127.0.0.1:PORT/');\n", err=True)
        return supervisor.run()
    finally:
        if embedded:
            embedded.stop("fast")
