"""`pgnet-curl serve`: resolve the database (given or embedded), check it, supervise workers."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from psycopg.conninfo import make_conninfo

from . import db, metrics_dir, schema, settings as settings_module
from .redact import safe_dsn

log = logging.getLogger("pgnet_curl.serve")

# The login role the workers use with the embedded server (a member of pgnet_worker).
EMBEDDED_WORKER_ROLE = "pgnet_curl_worker"

# Flag names as serve takes them -> Settings fields.
_FLAG_TO_SETTING = {
    "lease_grace": "lease_grace_s",
    "poll_interval": "poll_interval_s",
    "drain_timeout": "drain_timeout_s",
    "deny_cidr": "deny_cidrs",
    "allow_cidr": "allow_cidrs",
}


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
    worker_dsn = dsn
    if not dsn:
        from .embedded import EmbeddedPostgres, default_data_dir

        embedded = EmbeddedPostgres(Path(data_dir) if data_dir else default_data_dir())
        dsn = embedded.start()
        install_schema = True
        # The workers log in as an unprivileged member of pgnet_worker, not as the superuser.
        worker_dsn = db.with_user(dsn, EMBEDDED_WORKER_ROLE)
        log.info("embedded PostgreSQL running in %s", embedded.data_dir)
    try:
        if follow_pg_net:
            # pg_net's worker connects as pg_net.username: so do ours, even with the embedded server.
            dsn = worker_dsn = follow_pg_net_settings(dsn)
        if install_schema:
            version = schema.install(dsn, worker_role=EMBEDDED_WORKER_ROLE if embedded else None)
            log.info("net schema version %d installed", version)
        settings = settings_module.build(dsn=worker_dsn, **values)
        log.info("outgoing requests: %s", settings_module.describe_transport(settings))
        supervisor = Supervisor(settings, metrics_host, metrics_port)
        supervisor.check_database()
        log.info("serving database %s", safe_dsn(worker_dsn))
        if embedded:
            click.echo(f"\nConnect with:  psql {dsn}\n"
                       f"Try:           select net.http_get('http://127.0.0.1:PORT/');\n", err=True)
        return supervisor.run()
    finally:
        if embedded:
            embedded.stop("fast")
