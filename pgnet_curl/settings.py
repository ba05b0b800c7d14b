"""Worker settings: defaults, then the database's pg_net.* settings, then flags and PGNET_* env."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from urllib.parse import urlsplit

from .destination_policy import parse_cidrs
from .errors import ConfigError

# pg_net's defaults for the settings it reads from the database.
DEFAULT_BATCH_SIZE = 200
DEFAULT_TTL = timedelta(hours=6)


@dataclass(frozen=True)
class DestinationLimit:
    """One row of net.destination_limits, as `--destination-limit PATTERN=CONCURRENT/RATE[/BURST]` gives it."""

    host_pattern: str
    max_concurrent: int | None = None
    max_per_second: float | None = None
    burst: float | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a worker process needs to know; immutable, replaced on reload."""

    dsn: str = ""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Rows claimed per query (pg_net.batch_size).
    batch_size: int = DEFAULT_BATCH_SIZE
    # Requests in flight per worker process at most.
    # 500 measured faster than 1000 (fewer connections per host to scan) and 128 slower.
    max_inflight: int = 500
    # Responses kept this long (pg_net.ttl).
    ttl: timedelta = DEFAULT_TTL
    # A claimed row stays ours for its timeout plus this; after that any worker may take it.
    lease_grace_s: float = 30.0
    # Write-back batches: flushed at this many rows or after this many ms, whichever first.
    write_batch_size: int = 500
    flush_interval_ms: float = 5.0
    # Safety poll for what no wake announces: expired leases and due retries (not new rows:
    # a row inserted straight into the queue waits for a wake, as in pg_net).
    poll_interval_s: float = 5.0
    # How often the pg_net.* settings are read again (pg_reload_conf() reaches the workers this
    # fast), together with a check that the net schema is still the one being served.
    settings_refresh_s: float = 0.5
    # Serve the database and connect as the role pg_net.database_name / pg_net.username name,
    # when set (at start and at net.worker_restart()); off with several databases.
    follow_pg_net_settings: bool = True
    # Graceful shutdown: in-flight requests get this long to finish before being released.
    drain_timeout_s: float = 10.0
    # A request claimed this many times without an answer (its workers died) gets an error row.
    max_attempts: int = 5
    # Larger response bodies end the transfer with an error row (pg_net has no cap).
    max_response_bytes: int = 100 * 1024 * 1024
    # Whether the workers' commits (claims, write-backs) wait for their WAL flush. Off, a crash
    # can forget the last few hundred ms of them: those requests are sent again, never lost.
    synchronous_commit: bool = False
    # Redirects followed per request at most.
    max_redirects: int = 10
    # Connections per destination host at most (0: no limit).
    max_host_connections: int = 0
    # Retries of transient failures, for requests that name no max_retries / retry_backoff.
    max_retries: int = 0
    retry_backoff_ms: int = 1000
    # No wait between attempts is longer, whatever the backoff or Retry-After says.
    retry_backoff_cap_ms: int = 300_000
    # NOTIFY this channel with the request id when a response is stored (requests may name one).
    notify_channel: str | None = None
    # TLS: verification is always on; these replace libcurl's CA bundle or add a client certificate.
    ca_file: str | None = None
    ca_path: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # Outgoing proxy (http://[user:password@]host:port); when None libcurl reads *_proxy env vars.
    proxy: str | None = field(default=None, repr=False)
    # Destination policy (destination_policy.py): CIDRs denied and allowed on top of the
    # default deny list, and whether loopback and private networks are denied too.
    deny_cidrs: tuple[str, ...] = ()
    allow_cidrs: tuple[str, ...] = ()
    deny_private: bool = False
    # Per-destination limits serve writes into net.destination_limits at start.
    destination_limits: tuple[DestinationLimit, ...] = ()
    # What a dead-lettered head of an ordering key does: "continue" lets the next request of its
    # key go, "halt" stops the key until net.retry_request replays it.
    ordering_on_failure: str = "continue"
    # Circuit breaker: this many consecutive failures to a host (connection errors, timeouts, 5xx)
    # within the window open its circuit; its requests are held for a cool-down that doubles each
    # time it opens again, up to the cap. Off: this serve counts no failures (it still holds the
    # requests of circuits that other serves of the database opened).
    circuit_breaker: bool = True
    circuit_failures: int = 10
    circuit_window_s: float = 60.0
    circuit_cooldown_s: float = 5.0
    circuit_cooldown_cap_s: float = 300.0
    # Which settings came from flags/env and so win over the database's pg_net.* values.
    pinned: frozenset = frozenset()

    def with_database_values(self, batch_size: str | None, ttl: str | None) -> "Settings":
        """Apply pg_net.batch_size and pg_net.ttl as read from the database, unless pinned."""
        changes = {}
        if "batch_size" not in self.pinned:
            changes["batch_size"] = parse_positive_int("pg_net.batch_size", batch_size, DEFAULT_BATCH_SIZE)
        if "ttl" not in self.pinned:
            changes["ttl"] = parse_interval("pg_net.ttl", ttl, DEFAULT_TTL)
        return replace(self, **changes)


def build(**overrides) -> Settings:
    """Make Settings from explicit values (flags), pinning those that were given."""
    given = {key: value for key, value in overrides.items() if value is not None}
    known = {f.name for f in fields(Settings)}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    if "destination_limits" in given:
        given["destination_limits"] = tuple(
            limit if isinstance(limit, DestinationLimit) else parse_destination_limit(limit)
            for limit in given["destination_limits"])
    if "ttl" in given and not isinstance(given["ttl"], timedelta):
        given["ttl"] = parse_interval("--ttl", given["ttl"], DEFAULT_TTL)
    for name, flag in (("deny_cidrs", "--deny-cidr"), ("allow_cidrs", "--allow-cidr")):
        if name in given:
            given[name] = parse_cidrs(flag, given[name])
    settings = Settings(**given, pinned=frozenset(given) - {"dsn"})
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    for name in ("workers", "batch_size", "max_inflight", "write_batch_size",
                 "max_response_bytes", "max_attempts", "circuit_failures"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    for name in ("lease_grace_s", "flush_interval_ms", "poll_interval_s", "drain_timeout_s", "max_retries"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name.replace('_', '-')} must not be negative")
    for name in ("retry_backoff_ms", "retry_backoff_cap_ms"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
    if settings.notify_channel is not None and not 0 < len(settings.notify_channel.encode()) < 64:
        raise ConfigError("notify-channel must be a channel name of 1 to 63 bytes")
    if settings.ordering_on_failure not in ("continue", "halt"):
        raise ConfigError(f"ordering-on-failure must be continue or halt, got {settings.ordering_on_failure!r}")
    for name in ("circuit_window_s", "circuit_cooldown_s", "circuit_cooldown_cap_s"):
        if not getattr(settings, name) > 0:
            raise ConfigError(f"{name.removesuffix('_s').replace('_', '-')} must be a positive number of seconds")
    if settings.circuit_cooldown_cap_s < settings.circuit_cooldown_s:
        raise ConfigError("circuit-cooldown-cap must be at least circuit-cooldown")
    _validate_transport(settings)


def _validate_transport(settings: Settings) -> None:
    """Check the TLS files and the proxy URL now, rather than failing every request later."""
    if settings.ca_file:
        _check_readable("--ca-file", settings.ca_file)
        try:
            ssl.create_default_context(cafile=settings.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"--ca-file {settings.ca_file} holds no usable PEM certificate ({exc})") from None
    if settings.ca_path:
        if not os.path.isdir(settings.ca_path) or not os.access(settings.ca_path, os.R_OK | os.X_OK):
            raise ConfigError(f"--ca-path {settings.ca_path} is not a readable directory")
    if settings.client_key and not settings.client_cert:
        raise ConfigError("--client-key needs --client-cert")
    if settings.client_cert:
        _check_readable("--client-cert", settings.client_cert)
        if settings.client_key:
            _check_readable("--client-key", settings.client_key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
                settings.client_cert, settings.client_key, password=_refuse_password)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"--client-cert {settings.client_cert} and --client-key {settings.client_key or '(in the cert file)'} "
                f"must be a PEM certificate and its matching, unencrypted private key: {exc}"
            ) from None
    if settings.proxy is not None:
        parts = urlsplit(settings.proxy)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"--proxy must look like http://host:port, got {mask_userinfo(settings.proxy)!r}")


def _check_readable(flag: str, path: str) -> None:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"{flag} {path} is not a readable file")


def _refuse_password() -> str:
    raise ValueError("the private key is encrypted")


def mask_userinfo(url: str) -> str:
    """Return url with any user:password@ replaced by ***@, so it can be logged."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    # Up to the last @, even past a /: a password may hold an unescaped one.
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


# Proxy variables libcurl reads when no --proxy is given (it ignores upper-case HTTP_PROXY).
PROXY_ENV_VARS = ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")


def describe_transport(settings: Settings, environ=os.environ) -> str:
    """Say in one log line how requests leave: CA, client certificate, proxy; no credentials."""
    parts = [f"TLS verification on, CA: {settings.ca_file or settings.ca_path or 'libcurl default'}"]
    if settings.ca_file and settings.ca_path:
        parts[0] += f" and {settings.ca_path}"
    if settings.client_cert:
        parts.append(f"client certificate: {settings.client_cert}")
    if settings.proxy:
        parts.append(f"proxy: {mask_userinfo(settings.proxy)}")
    else:
        from_env = [f"{name}={mask_userinfo(environ[name])}" for name in PROXY_ENV_VARS if environ.get(name)]
        parts.append(f"proxy from environment: {' '.join(from_env)}" if from_env else "no proxy")
    return "; ".join(parts)


def parse_positive_int(name: str, text: str | None, default: int) -> int:
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {text!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value


_INTERVAL_UNITS = {
    "us": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "ms": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_INTERVAL_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def parse_interval(name: str, text: str | None, default: timedelta) -> timedelta:
    """Parse a PostgreSQL-style interval such as '6 hours' or '1 day 30 minutes'."""
    if text is None or text.strip() == "":
        return default
    total_s = 0.0
    position = 0
    lowered = text.strip().lower()
    while position < len(lowered):
        match = _INTERVAL_PART.match(lowered, position)
        if not match or match.group(2) not in _INTERVAL_UNITS:
            raise ConfigError(f"{name} must be an interval like '6 hours', got {text!r}")
        total_s += float(match.group(1)) * _INTERVAL_UNITS[match.group(2)]
        position = match.end()
    return timedelta(seconds=total_s)


_DESTINATION_LIMIT_FORMAT = "PATTERN=CONCURRENT/RATE[/BURST], e.g. api.example.com=10/50 or *.example.com=/20"


def parse_destination_limit(text: str) -> DestinationLimit:
    """Parse `PATTERN=CONCURRENT/RATE[/BURST]`; an empty part sets no limit of that kind."""
    pattern, equals, values = text.strip().partition("=")
    parts = values.split("/")
    if not equals or not pattern.strip() or not 2 <= len(parts) <= 3:
        raise ConfigError(f"--destination-limit must be {_DESTINATION_LIMIT_FORMAT}, got {text!r}")
    concurrent, rate, burst = (parts + [""])[:3]
    try:
        limit = DestinationLimit(pattern.strip(), int(concurrent) if concurrent.strip() else None,
                                 float(rate) if rate.strip() else None, float(burst) if burst.strip() else None)
    except ValueError:
        raise ConfigError(f"--destination-limit must be {_DESTINATION_LIMIT_FORMAT}, got {text!r}") from None
    if limit.max_concurrent is None and limit.max_per_second is None:
        raise ConfigError(f"--destination-limit {text!r} sets neither a concurrency nor a rate")
    if ((limit.max_concurrent is not None and limit.max_concurrent < 1)
            or (limit.max_per_second is not None and not limit.max_per_second > 0)
            or (limit.burst is not None and not limit.burst >= 1)):
        raise ConfigError(f"--destination-limit {text!r}: concurrency must be at least 1, rate above 0, burst at least 1")
    return limit
