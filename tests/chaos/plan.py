"""How hard and how long a chaos run is: the test's short run and the bench's long one differ only here."""

from __future__ import annotations

from dataclasses import dataclass

FAULTS = ("worker_kill", "postgres_crash", "network_drop", "serve_kill")


@dataclass(frozen=True)
class Plan:
    """The load, the faults and the bounds of one run."""

    rate_per_s: float = 200.0
    # Load before the first fault, and between one fault's recovery and the next fault.
    warmup_s: float = 2.0
    steady_s: float = 1.5
    drop_s: float = 5.0
    workers: int = 2
    # The receiver answers after this long: rate x delay requests are in flight at any time.
    answer_delay_ms: int = 200
    # Longer than the drop with a margin for a busy machine: a worker's loop waits on its silent
    # database session meanwhile, and a transfer that outlived its timeout would end in a timeout
    # row (tests/integration/test_reliability.py, the silent-connection xfail).
    timeout_ms: int = 8000
    # A request's lease is its timeout plus this: how long the requests of a killed serve, or
    # write-backs a crash undid, wait before they are sent again.
    lease_grace_s: float = 1.0
    recover_timeout_s: float = 60.0
    # A worker's size grows with the most requests it ever had in flight (connections, handles):
    # the warm-up starts with a burst of this many per worker, so that each reaches its
    # --max-inflight once, and the warm size is read rss_warmup_s after the burst was answered.
    # No worker, restarted ones included, may then grow past that size plus rss_bound_bytes.
    burst_per_worker: int = 500
    rss_warmup_s: float = 1.0
    rss_bound_bytes: int = 16 * 1024 * 1024
    faults: tuple[str, ...] = FAULTS
    serve_args: tuple[str, ...] = ()


SHORT = Plan()
LONG = Plan(rate_per_s=2000.0, warmup_s=5.0, steady_s=10.0)
