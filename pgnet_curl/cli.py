"""The `pgnet-curl` command line: install the schema, print it, serve requests."""

from __future__ import annotations

import logging
import sys

import click

from . import __version__, schema
from .errors import PgnetCurlError

DSN_ENVVARS = ["PGNET_DSN", "DATABASE_URL"]


def dsn_option(required: bool):
    return click.option(
        "--dsn", envvar=DSN_ENVVARS, required=required, metavar="DSN",
        help="PostgreSQL connection string (also PGNET_DSN or DATABASE_URL).",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "PGNET"})
@click.version_option(__version__, prog_name="pgnet-curl")
def cli() -> None:
    """pg_net's SQL API on any PostgreSQL, served by an external libcurl worker."""


@cli.command()
@dsn_option(required=True)
@click.option("--durable/--unlogged", default=None,
              help="Logged tables that survive a crash, or unlogged ones like pg_net's "
                   "(default: unlogged for a new install, unchanged for an existing one).")
def install(dsn: str, durable: bool | None) -> None:
    """Install or upgrade the net schema in a database (safe to run again)."""
    version = schema.install(dsn, durable=durable)
    click.echo(f"net schema version {version} installed")


@cli.command()
@dsn_option(required=True)
@click.confirmation_option(prompt="Drop schema net with every queued request and stored response?")
def uninstall(dsn: str) -> None:
    """Drop the net schema and everything in it."""
    schema.uninstall(dsn)
    click.echo("net schema dropped")


@cli.command()
@click.option("--durable", is_flag=True, help="Make the tables logged instead of unlogged.")
def sql(durable: bool) -> None:
    """Print the install script, for people who run migrations with their own tools."""
    click.echo(schema.install_script(durable), nl=False)


def main() -> None:
    """Run the CLI, turning our errors into a message and a meaningful exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
