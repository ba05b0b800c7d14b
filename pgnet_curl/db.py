"""Database connections and the one place psycopg errors become pgnet-curl errors."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .errors import ConfigError, DatabaseUnavailable, PgnetCurlError, SchemaError, WritesRefused
from .redact import db_error_text

WAKE_CHANNEL = "pgnet_curl_wake"
CONTROL_CHANNEL = "pgnet_curl_control"
CONNECT_TIMEOUT_S = 10
# Notice a dead peer or a cut network within about 20 s instead of TCP's minutes: an idle
# LISTEN connection probes with keepalives; unacknowledged sends give up after the user timeout.
_TCP_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
                "tcp_user_timeout": 20000}


def with_user(dsn: str, user: str) -> str:
    """Return dsn with its login role replaced by user (and no password)."""
    params = parse_dsn(dsn)
    params.pop("password", None)
    params["user"] = user
    return make_conninfo(**params)


@contextlib.contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Turn psycopg errors raised while doing `action` into ours.

    Ours carry only the primary message and SQLSTATE, and are raised `from None`: psycopg's
    full text (DETAIL: Failing row contains ...) would print with a traceback. A read-only
    server or a full disk is WritesRefused: a DatabaseUnavailable, so the work is kept and
    tried again, never answered with an error row.
    """
    try:
        yield
    except (pg_errors.ReadOnlySqlTransaction, pg_errors.DiskFull) as exc:
        raise WritesRefused(f"{action}: {db_error_text(exc)}") from None
    except (pg_errors.UndefinedTable, pg_errors.UndefinedFunction, pg_errors.InvalidSchemaName) as exc:
        raise SchemaError(
            f"{action}: the net schema is missing or outdated ({exc.diag.message_primary}); "
            f"run: pgnet-curl install --dsn ..."
        ) from None
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        if (getattr(exc, "sqlstate", None) or "").startswith("54"):
            # psycopg files class 54 (program limit exceeded) under OperationalError, but no
            # reconnect helps: the statement is too big (a write-back batch over jsonb's 256 MiB,
            # say), and a smaller one may pass.
            raise PgnetCurlError(f"{action}: {db_error_text(exc)}") from None
        raise DatabaseUnavailable(f"{action}: {db_error_text(exc)}", sqlstate=exc.sqlstate) from None
    except psycopg.Error as exc:
        raise PgnetCurlError(f"{action}: {db_error_text(exc)}") from None


def parse_dsn(dsn: str) -> dict:
    """The DSN's parameters; a ConfigError that quotes none of it when it does not parse."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"the DSN is not a valid connection string: {db_error_text(exc)}") from None


def connect(dsn: str, application_name: str, listen: bool = False,
            synchronous_commit: bool | None = None,
            connection_class: type[psycopg.Connection] = psycopg.Connection,
            on_notify: Callable[[psycopg.Notify], None] | None = None) -> psycopg.Connection:
    """Open an autocommit connection named in pg_stat_activity; LISTEN for wakes if asked, with
    on_notify handling every NOTIFY from the LISTEN on (none is dropped before it is set).

    synchronous_commit: whether a commit waits for its WAL flush. None: off in a worker's
    session (listen), the server's setting in any other. Off, a crash forgets at most the last
    3 x wal_writer_delay of a worker's claims and write-backs: those requests are sent again,
    never lost, as every request is committed by its caller's own session.
    """
    parse_dsn(dsn)
    if synchronous_commit is None and listen:
        synchronous_commit = False
    with database_errors("connecting to the database"):
        conn = connection_class.connect(
            dsn, autocommit=True, application_name=application_name, connect_timeout=CONNECT_TIMEOUT_S,
            **_TCP_OPTIONS,
        )
        # Our statements name net.* objects in full; resolving nothing else outside pg_catalog
        # means no role's look-alike function in another schema can run in our session.
        setup = "set search_path = pg_catalog, pg_temp"
        if synchronous_commit is not None:
            setup += f"; set synchronous_commit = {'on' if synchronous_commit else 'off'}"
        if on_notify is not None:
            conn.add_notify_handler(on_notify)
        if listen:
            setup += f"; listen {WAKE_CHANNEL}; listen {CONTROL_CHANNEL}"
        conn.execute(setup)
        return conn
