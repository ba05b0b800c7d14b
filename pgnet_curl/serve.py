"""`pgnet-curl serve`: resolve the database (given or embedded), check it, supervise workers."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from . import db, metrics_dir, schema, settings as settings_module
from .errors import ConfigError, PgnetCurlError
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
    "circuit_window": "circuit_window_s",
    "circuit_cooldown": "circuit_cooldown_s",
    "circuit_cooldown_cap": "circuit_cooldown_cap_s",
}


def databases_naming_a_target(databases: dict[str, str]) -> list[str]:
    """Labels of the databases (label -> DSN) that set pg_net.database_name or pg_net.username
    to somewhere else than their DSN: those serve does not follow when it serves several."""
    from .sql_files import queries
    from .worker.target import wanted_dsn

    named = []
    for label, dsn in databases.items():
        try:
            conn = db.connect(dsn, "pgnet-curl serve")
        except PgnetCurlError:
            continue  # the supervisor says so
        try:
            with db.database_errors("reading pg_net.database_name and pg_net.username"):
                database_name, username = conn.execute(queries()["pg_net_target"]).fetchone()
        except PgnetCurlError:
            continue
        finally:
            conn.close()
        if wanted_dsn(dsn, database_name, username) != dsn:
            named.append(label)
    return named


def database_labels(dsns: list[str]) -> list[str]:
    """Name each database for metrics and logs: its dbname, with host:port where that repeats."""
    parts = []
    for dsn in dsns:
        params = db.parse_dsn(dsn)
        parts.append((params.get("dbname") or params.get("user") or "postgres",
                      f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"))
    names = [name for name, _ in parts]
    labels = [name if names.count(name) == 1 else f"{name}@{where}" for name, where in parts]
    if len(set(labels)) < len(labels):
        raise ConfigError("the same database is named twice (--dsn / --dsn-file)")
    return labels


def read_dsn_file(path: str) -> list[str]:
    """One DSN per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--dsn-file {path}: {exc.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def serve(dsns: list[str], data_dir: str | None, install_schema: bool, tuning: dict,
          metrics_host: str = "0.0.0.0", metrics_port: int | None = None,
          follow_pg_net: bool = True) -> int:
    """Serve every database in dsns (the embedded one when there is none) until stopped."""
    metrics_dir.prepare()
    from .supervisor import Supervisor  # after prepare(): it imports prometheus_client

    values = {_FLAG_TO_SETTING.get(name, name): value for name, value in tuning.items() if value != ()}
    if values.get("synchronous_commit") is not None:
        values["synchronous_commit"] = values["synchronous_commit"] == "on"
    if values.pop("no_circuit_breaker", None):
        values["circuit_breaker"] = False
    embedded = None
    worker_dsns = list(dsns)
    if not dsns:
        from .embedded import EmbeddedPostgres, default_data_dir

        embedded = EmbeddedPostgres(Path(data_dir) if data_dir else default_data_dir())
        dsns = [embedded.start()]
        install_schema = True
        # The workers log in as an unprivileged member of pgnet_worker, not as the superuser.
        worker_dsns = [db.with_user(dsns[0], EMBEDDED_WORKER_ROLE)]
        log.info("embedded PostgreSQL running in %s", embedded.data_dir)
    try:
        if install_schema:
            for dsn in dsns:
                version = schema.install(dsn, worker_role=EMBEDDED_WORKER_ROLE if embedded else None)
                log.info("net schema version %d installed in %s", version, safe_dsn(dsn))
        labelled = dict(zip(database_labels(worker_dsns), worker_dsns))
        # pg_net's worker serves one database: the one pg_net.database_name names, as the role
        # pg_net.username names. The workers follow them (worker/target.py) when serve serves one.
        if follow_pg_net and len(labelled) > 1:
            follow_pg_net = False
            named = databases_naming_a_target(labelled)
            if named:
                log.warning("pg_net.database_name / pg_net.username are set in %s and not followed: with "
                            "several databases, serve serves each as its DSN says", ", ".join(named))
        databases = {label: settings_module.build(dsn=dsn, follow_pg_net_settings=follow_pg_net, **values)
                     for label, dsn in labelled.items()}
        log.info("outgoing requests: %s", settings_module.describe_transport(next(iter(databases.values()))))
        supervisor = Supervisor(databases, metrics_host, metrics_port)
        supervisor.check_database()
        for label, settings in databases.items():
            log.info("serving database %s (%s)", label, safe_dsn(settings.dsn))
        if embedded:
            click.echo(f"\nConnect with:  psql {dsns[0]}\n"
                       f"Try:           select net.http_get('http://127.0.0.1:PORT/');\n", err=True)
        return supervisor.run()
    finally:
        if embedded:
            embedded.stop("fast")
