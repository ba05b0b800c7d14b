"""Errors pgnet-curl raises, each with a message a user can act on."""


class PgnetCurlError(Exception):
    """Base of every error pgnet-curl raises on purpose."""

    exit_code = 1


class ConfigError(PgnetCurlError):
    """A setting or flag has a value we cannot use."""

    exit_code = 2


class DatabaseUnavailable(PgnetCurlError):
    """The database cannot be reached (bad DSN, server down, authentication failed)."""

    exit_code = 3

    def __init__(self, message: str, sqlstate: str | None = None):
        super().__init__(message)
        # The server's reason when it gave one (57P01: the session was terminated).
        self.sqlstate = sqlstate


class WritesRefused(DatabaseUnavailable):
    """The database takes no writes for now (read-only after a failover, a full disk): keep the
    work and try again later, on a new session (a failover moves the writable server)."""


class SchemaError(PgnetCurlError):
    """The net schema is missing, outdated or could not be installed."""

    exit_code = 4


class EmbeddedServerError(PgnetCurlError):
    """The embedded PostgreSQL could not be started or stopped."""

    exit_code = 5
