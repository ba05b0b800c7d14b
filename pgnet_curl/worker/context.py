"""What the parts of one worker process share: who it is, its settings, its counters, its wake-ups."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

from .. import metrics
from ..queue import CircuitParams
from ..settings import Settings


def lease_owner(hostname: str, run_id: str, pid: int) -> str:
    """Name a worker process in the lease columns; the supervisor can name a dead child too."""
    return f"{hostname}:{run_id}:{pid}"


@dataclass
class Wakeups:
    """Reasons to act, set by NOTIFYs, signals and timers, and cleared by the part that acts."""

    # Look for claimable requests (a wake NOTIFY, a full claim, a freed slot, a due retry).
    claim: bool = True
    # The safety poll: claim only what no wake announces (expired leases, due retries).
    overdue: bool = False
    # A wake from a request function or net.wake(): look for expired responses too, as pg_net.
    expiry: bool = False
    # net.worker_restart(): open a new database session.
    restart: bool = False
    # SIGHUP: read pg_net's settings again (and say what they are).
    reload: bool = False
    # The signing keys, the destination limits or the circuits changed.
    keys: bool = False
    limits: bool = False
    circuits: bool = False
    # The install script committed: check the schema now, not at the next check.
    check: bool = False


@dataclass
class WorkerContext:
    """One worker process's identity and state that every stage reads."""

    settings: Settings
    index: int
    database: str
    # Unique per process: a lease held by a dead process can never be mistaken for ours.
    owner: str
    metrics: metrics.DatabaseMetrics
    tally: metrics.Tally
    wakeups: Wakeups = field(default_factory=Wakeups)
    stats: dict = field(default_factory=lambda: {
        "claimed": 0, "written": 0, "lease_lost": 0, "reclaimed": 0, "reconnects": 0, "retries": 0})
    # Draining: claim nothing more.
    stopping: bool = False
    # Moving to the database pg_net.database_name names: claim nothing until what is in flight
    # here is answered (and written here).
    holding: bool = False
    # How failures open circuits, for the write-back (failures 0 with --no-circuit-breaker: none counted).
    circuit_params: CircuitParams = CircuitParams()

    @classmethod
    def create(cls, settings: Settings, index: int, run_id: str | None, database: str) -> "WorkerContext":
        bound = metrics.DatabaseMetrics(database)
        owner = lease_owner(socket.gethostname(), run_id or secrets.token_hex(4), os.getpid())
        circuit_params = CircuitParams(settings.circuit_failures if settings.circuit_breaker else 0,
                                       settings.circuit_window_s, settings.circuit_cooldown_s,
                                       settings.circuit_cooldown_cap_s)
        return cls(settings, index, database, owner, bound, metrics.Tally(bound), circuit_params=circuit_params)
