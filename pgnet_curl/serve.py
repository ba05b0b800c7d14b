"""`pgnet-curl serve`: resolve the database (given or embedded), check it, supervise workers."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import platformdirs

from . import db, metrics_dir, schema, settings as settings_module

log = logging.getLogger("pgnet_curl.serve")

# The login role the workers use with the embedded server (a member of pgnet_worker).
EMBEDDED_WORKER_ROLE = "pgnet_curl_worker"

# Flag names as serve takes them -> Settings fields.
_FLAG_TO_SETTING = {
    "lease_grace": "lease_grace_s",
    "poll_interval": "poll_interval_s",
    "drain_timeout": "drain_timeout_s",
}


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("pgnet-curl"))


def serve(dsn: str | None, data_dir: str | None, install_schema: bool, tuning: dict,
          metrics_host: str = "0.0.0.0", metrics_port: int | None = None) -> int:
    """Serve until stopped; return the exit code."""
    metrics_dir.prepare()
    from .supervisor import Supervisor  # after prepare(): it imports prometheus_client

    values = {_FLAG_TO_SETTING.get(name, name): value for name, value in tuning.items() if value != ()}
    embedded = None
    worker_dsn = dsn
    if not dsn:
        from .embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(Path(data_dir) if data_dir else default_data_dir())
        dsn = embedded.start()
        install_schema = True
        # The workers log in as an unprivileged member of pgnet_worker, not as the superuser.
        worker_dsn = db.with_user(dsn, EMBEDDED_WORKER_ROLE)
        log.info("embedded PostgreSQL running in %s", embedded.data_dir)
    try:
        if install_schema:
            version = schema.install(dsn, worker_role=EMBEDDED_WORKER_ROLE if embedded else None)
            log.info("net schema version %d installed", version)
        settings = settings_module.build(dsn=worker_dsn, **values)
        supervisor = Supervisor(settings, metrics_host, metrics_port)
        supervisor.check_database()
        if embedded:
            click.echo(f"\nConnect with:  psql {dsn}\n"
                       f"Try:           select net.http_get('http://127.0.0.1:PORT/');\n", err=True)
        return supervisor.run()
    finally:
        if embedded:
            embedded.stop("fast")
