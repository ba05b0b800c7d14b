"""The `pgnet-curl` command line: install the schema, print it, serve requests."""

from __future__ import annotations

import os
import sys

import click

from . import __version__, logs, schema
from .errors import PgnetCurlError

DSN_ENVVARS = ["PGNET_DSN", "DATABASE_URL"]


def dsn_option(required: bool):
    return click.option(
        "--dsn", envvar=DSN_ENVVARS, required=required, metavar="DSN",
        help="PostgreSQL connection string (also PGNET_DSN or DATABASE_URL).",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgnet-curl")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              envvar="PGNET_LOG_LEVEL", show_envvar=True, show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              envvar="PGNET_LOG_FORMAT", show_envvar=True, show_default=True)
def cli(log_level: str, log_format: str) -> None:
    """pg_net's SQL API on any PostgreSQL, served by an external libcurl worker."""
    logs.configure(log_level, log_format)


@cli.command()
@dsn_option(required=True)
@click.option("--durable/--unlogged", default=None,
              help="Logged tables that survive a PostgreSQL crash, or unlogged ones like pg_net's, which "
                   "crash recovery empties (default: logged for a new install, unchanged for an existing "
                   "one; converting an existing one rewrites its tables under an exclusive lock).")
@click.option("--private/--shared", default=None,
              help="Private: only roles granted pgnet_user may make requests, and each role sees only "
                   "its own; shared: pg_net's model (default: shared for a new install, unchanged for "
                   "an existing one).")
@click.option("--worker-role", metavar="NAME",
              help="Create (or keep) login role NAME, a member of pgnet_worker, for serve to connect as.")
@click.option("--worker-password", envvar="PGNET_WORKER_PASSWORD", show_envvar=True,
              help="Password to set for --worker-role (sent hashed).")
def install(dsn: str, durable: bool | None, private: bool | None, worker_role: str | None,
            worker_password: str | None) -> None:
    """Install or upgrade the net schema in a database (safe to run again)."""
    if worker_password is not None and not worker_role:
        raise click.UsageError("--worker-password needs --worker-role")
    version = schema.install(dsn, durable=durable, private=private, worker_role=worker_role,
                             worker_password=worker_password)
    click.echo(f"net schema version {version} installed")
    if worker_role:
        click.echo(f"worker role {worker_role} is a member of pgnet_worker: serve with a DSN that logs in as it")


@cli.command()
@dsn_option(required=True)
@click.confirmation_option(prompt="Drop schema net with every queued request and stored response?")
def uninstall(dsn: str) -> None:
    """Drop the net schema and everything in it."""
    schema.uninstall(dsn)
    click.echo("net schema dropped")


@cli.command()
@click.option("--durable/--unlogged", default=None,
              help="Logged tables or unlogged ones like pg_net's (default: logged for a new install, "
                   "unchanged for an existing one).")
@click.option("--private/--shared", default=None,
              help="Install the private or the shared privilege mode (default: keep what is installed).")
def sql(durable: bool | None, private: bool | None) -> None:
    """Print the install script, for people who run migrations with their own tools."""
    click.echo(schema.install_script(durable, private), nl=False)


@cli.command()
@dsn_option(required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--minutes", default=5, show_default=True, help="Window for the response counts.")
def status(dsn: str, as_json: bool, minutes: int) -> None:
    """Show queue depth, oldest pending request, recent outcomes, workers and settings."""
    from . import status as status_module

    click.echo(status_module.render(status_module.collect(dsn, minutes), as_json))


def _serve_options(function):
    """Attach serve's tuning flags, each also readable from a PGNET_* environment variable."""
    options = [
        ("--workers", int, "Worker processes (default: one per core)."),
        ("--max-inflight", int, "Requests in flight per worker at most (default 500)."),
        ("--batch-size", int, "Rows claimed per query; overrides pg_net.batch_size (default 200)."),
        ("--ttl", str, "Keep responses this long; overrides pg_net.ttl (default '6 hours')."),
        ("--lease-grace", float, "Seconds a claim outlives its request's timeout (default 30)."),
        ("--write-batch-size", int, "Responses written per statement at most (default 500)."),
        ("--flush-interval-ms", float, "Longest wait before writing finished responses (default 5)."),
        ("--poll-interval", float, "Seconds between safety polls of the queue (default 5)."),
        ("--drain-timeout", float, "Seconds in-flight requests get on shutdown (default 10)."),
        ("--max-redirects", int, "Redirects followed per request (default 10)."),
        ("--max-attempts", int, "Claims without an answer before an error row (default 5)."),
        ("--max-response-bytes", int, "Larger bodies end in an error row (default 100 MiB)."),
        ("--max-host-connections", int, "Connections per destination host (default: no limit)."),
        ("--max-retries", int, "Retries of transient failures for requests that name none (default 0)."),
        ("--retry-backoff-ms", int, "Base of the exponential backoff between retries (default 1000)."),
        ("--retry-backoff-cap-ms", int, "Longest wait between attempts, Retry-After included (default 300000)."),
        ("--notify-channel", str, "NOTIFY this channel with the request id when a response is stored."),
        ("--ca-file", str, "PEM bundle of CAs to trust instead of libcurl's default bundle."),
        ("--ca-path", str, "Directory of hashed PEM CA certificates to trust (c_rehash)."),
        ("--client-cert", str, "PEM client certificate sent to servers that ask for one."),
        ("--client-key", str, "PEM private key of --client-cert (unencrypted; default: in the cert file)."),
        ("--proxy", str, "http:// proxy for every request (default: http_proxy/https_proxy/no_proxy env)."),
        ("--synchronous-commit", click.Choice(["on", "off"]),
         "Whether the workers' commits wait for their WAL flush (default off: a PostgreSQL crash may "
         "make them send the last few hundred ms of requests again, never lose one)."),
        ("--ordering-on-failure", click.Choice(["continue", "halt"]),
         "When the head of an ordering key is dead-lettered: let the next request of the key go "
         "(continue, the default) or stop the key until net.retry_request replays it (halt)."),
        ("--circuit-failures", int, "Consecutive failures to a host that open its circuit (default 10)."),
        ("--circuit-window", float, "Seconds within which those failures count (default 60)."),
        ("--circuit-cooldown", float, "Seconds an open circuit holds requests before its probe; doubles "
                                      "each time it opens again (default 5)."),
        ("--circuit-cooldown-cap", float, "Longest cool-down, in seconds (default 300)."),
    ]
    policy_options = [
        ("--deny-cidr", dict(multiple=True), "Deny connections to this CIDR range (repeatable)."),
        ("--allow-cidr", dict(multiple=True), "Allow this CIDR range inside a denied one (repeatable)."),
        ("--deny-private", dict(is_flag=True, default=None),
         "Also deny loopback, RFC 1918, CGNAT and unique-local ranges."),
        ("--no-circuit-breaker", dict(is_flag=True, default=None),
         "Count no failures, so open no circuit (circuits other serves opened still hold requests)."),
    ]
    for flag, extra, text in reversed(policy_options):
        envvar = "PGNET_" + flag[2:].replace("-", "_").upper()
        function = click.option(flag, envvar=envvar, show_envvar=True, help=text, **extra)(function)
    for flag, kind, text in reversed(options):
        envvar = "PGNET_" + flag[2:].replace("-", "_").upper()
        function = click.option(flag, type=kind, envvar=envvar, show_envvar=True, help=text)(function)
    return click.option(
        "--destination-limit", "destination_limits", multiple=True, metavar="PATTERN=CONCURRENT/RATE[/BURST]",
        envvar="PGNET_DESTINATION_LIMIT", show_envvar=True,
        help="Per destination host matching PATTERN (api.example.com, *.example.com, *): at most CONCURRENT "
             "in flight and RATE per second across every worker; written into net.destination_limits at "
             "start. Repeatable (env: space-separated).")(function)


@cli.command()
@click.option("--dsn", "dsns", multiple=True, metavar="DSN",
              help="A database to serve (repeatable: one serve for several databases). "
                   "Default: PGNET_DSN or DATABASE_URL, else the embedded PostgreSQL.")
@click.option("--dsn-file", type=click.Path(dir_okay=False), envvar="PGNET_DSN_FILE", show_envvar=True,
              help="A file of databases to serve, one DSN per line (# comments).")
@_serve_options
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="PGNET_DATA_DIR", show_envvar=True,
              help="Where the embedded PostgreSQL keeps its data when no DSN is given.")
@click.option("--install", "install_schema", is_flag=True, envvar="PGNET_INSTALL",
              help="Install or upgrade the net schema before serving.")
@click.option("--metrics-port", type=int, envvar="PGNET_METRICS_PORT", show_envvar=True,
              help="Serve /metrics and /healthz on this port (default: off).")
@click.option("--metrics-host", default="0.0.0.0", envvar="PGNET_METRICS_HOST", show_envvar=True,
              show_default=True, help="Address for --metrics-port.")
@click.option("--follow-pg-net-settings/--no-follow-pg-net-settings", "follow_pg_net", default=True,
              envvar="PGNET_FOLLOW_PG_NET_SETTINGS", show_envvar=True, show_default=True,
              help="Serve the database and connect as the role that pg_net.database_name and "
                   "pg_net.username name when they are set (at start and at net.worker_restart()), "
                   "as pg_net's worker does; only when serving one database.")
def serve(dsns, dsn_file, data_dir, install_schema, metrics_port, metrics_host, follow_pg_net, **tuning) -> None:
    """Send the requests queued in the database(s) and store their responses.

    With no DSN, starts an embedded PostgreSQL in --data-dir and serves that.
    """
    from .serve import read_dsn_file, serve as run_serve

    dsns = list(dsns) + (read_dsn_file(dsn_file) if dsn_file else [])
    if not dsns:
        # One DSN each: a keyword DSN holds spaces, so these are never split.
        dsns = [value for value in (os.environ.get(name) for name in DSN_ENVVARS) if value][:1]
    sys.exit(run_serve(dsns=dsns, data_dir=data_dir, install_schema=install_schema, tuning=tuning,
                       metrics_host=metrics_host, metrics_port=metrics_port, follow_pg_net=follow_pg_net))


def main() -> None:
    """Run the CLI, turning our errors into a message and a meaningful exit code."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PgnetCurlError as exc:
        click.echo(f"pgnet-curl: {exc}", err=True)
        sys.exit(exc.exit_code)
