"""Worker settings: defaults, then the database's pg_net.* settings, then flags and PGNET_* env."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta

from .errors import ConfigError

# pg_net's defaults for the settings it reads from the database.
DEFAULT_BATCH_SIZE = 200
DEFAULT_TTL = timedelta(hours=6)


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
    # Safety poll for what a NOTIFY cannot announce (reconnects, expired leases, direct inserts).
    poll_interval_s: float = 5.0
    # How often the pg_net.* settings are read again (pg_reload_conf() reaches the workers this
    # fast), together with a check that the net schema is still the one being served.
    settings_refresh_s: float = 0.5
    # How often responses older than the TTL are deleted, and how many per statement.
    ttl_sweep_interval_s: float = 30.0
    ttl_sweep_rows: int = 1000
    # Graceful shutdown: in-flight requests get this long to finish before being released.
    drain_timeout_s: float = 10.0
    # A request claimed this many times without an answer (its workers died) gets an error row.
    max_attempts: int = 5
    # Larger response bodies end the transfer with an error row.
    max_response_bytes: int = 32 * 1024 * 1024
    # Redirects followed per request at most.
    max_redirects: int = 10
    # Connections per destination host at most (0: no limit).
    max_host_connections: int = 0
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
    if "ttl" in given and not isinstance(given["ttl"], timedelta):
        given["ttl"] = parse_interval("--ttl", given["ttl"], DEFAULT_TTL)
    settings = Settings(**given, pinned=frozenset(given) - {"dsn"})
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    for name in ("workers", "batch_size", "max_inflight", "write_batch_size", "ttl_sweep_rows",
                 "max_response_bytes", "max_attempts"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    for name in ("lease_grace_s", "flush_interval_ms", "poll_interval_s", "drain_timeout_s"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"{name.replace('_', '-')} must not be negative")


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
