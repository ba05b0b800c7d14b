"""When to claim, how many, and how: the plain claim, the limited one while destination limits exist,
the one that holds requests to open circuits while some are open, and their probes; letting idle
ordering keys' next requests into the queue first; and the safety poll's claim, of what no wake
announces."""

from __future__ import annotations

import heapq
import time

from ..curl_driver import CurlDriver
from ..model import Request
from ..queue import Queue, WriteEffects
from .circuits import Circuits
from .context import WorkerContext

# Calls for help (a NOTIFY that wakes every worker) at most this often.
_HELP_INTERVAL_S = 0.05
# Idle ordering keys looked at per statement; keys a caller was adding to are looked at again
# after a wait that doubles from the first to the second figure.
_IDLE_KEYS_PER_CALL = 500
_IDLE_RETRY_MIN_S, _IDLE_RETRY_MAX_S = 0.02, 1.0


class Claimer:
    """Lease requests up to the free slots; wake the other workers when there is more than we take."""

    def __init__(self, ctx: WorkerContext, driver: CurlDriver, circuits: Circuits):
        self.ctx = ctx
        self.driver = driver
        self.circuits = circuits
        # Whether net.destination_limits has rows (claim with claim_limited then), and whether
        # any caps concurrency (then a write-back may free a slot: claim again after it).
        self.limits_active = self.concurrency_limited = False
        # When to let idle ordering keys' next requests in (a write-back found nothing in line it
        # could see: one may have joined since), or None.
        self.idle_keys_due_s: float | None = None
        self._idle_retry_s = _IDLE_RETRY_MIN_S
        # Monotonic times at which retries this worker put back become due, and hosts its
        # claims found held back by a rate limit get tokens again (a heap): claim again then.
        self._due_s: list[float] = []
        self._next_help_s = 0.0
        # The last claim filled its limit: more are probably waiting.
        self._full = False
        # The last claim was the safety poll's (claim_overdue): a full one chains as such.
        self._overdue = False
        # A wake's claim ran since the last safety poll (which then has nothing to add).
        self._claimed_since_poll = False

    def free_slots(self) -> int:
        return self.ctx.settings.max_inflight - self.driver.inflight

    def min_claim(self) -> int:
        """Slots to wait for before claiming again while busy: no claim query per finished request."""
        if self.driver.inflight == 0:
            return 1
        settings = self.ctx.settings
        return max(1, min(settings.batch_size, settings.max_inflight) // 4)

    def ready(self) -> bool:
        """Whether a claim would run now (for the loop's poll timeout)."""
        wakeups = self.ctx.wakeups
        return ((wakeups.claim or wakeups.overdue) and not self.ctx.stopping and not self.ctx.holding
                and self.free_slots() >= self.min_claim())

    def take_claimed_since_poll(self) -> bool:
        """Whether a wake's claim ran since the last call (the safety poll asks)."""
        claimed, self._claimed_since_poll = self._claimed_since_poll, False
        return claimed

    def next_due_s(self) -> float | None:
        due = self._due_s[0] if self._due_s else None
        idle_s, probe_s = self.idle_keys_due_s, self.circuits.probe_due_s
        if idle_s is None and probe_s is None:
            return due  # every loop turn asks: keep the usual case short
        for other in (idle_s, probe_s):
            if other is not None and (due is None or other < due):
                due = other
        return due

    def wake_if_due(self, now: float) -> None:
        if self._due_s and now >= self._due_s[0]:
            while self._due_s and now >= self._due_s[0]:
                heapq.heappop(self._due_s)
            self.ctx.wakeups.claim = True
        idle_s, probe_s = self.idle_keys_due_s, self.circuits.probe_due_s
        if (idle_s is not None and now >= idle_s) or (probe_s is not None and now >= probe_s):
            self.ctx.wakeups.claim = True

    def claim(self, queue: Queue, now: float) -> list[Request] | None:
        """Lease what there is room for, oldest first; None when no claim ran (then share_load
        need not follow)."""
        ctx = self.ctx
        wakeups = ctx.wakeups
        if not (wakeups.claim or wakeups.overdue) or ctx.holding:
            return None
        if ctx.stopping:
            # Woken while draining: pass the work on to whoever still serves.
            wakeups.claim = wakeups.overdue = False
            self.ask_for_help(queue, now)
            return None
        if self.free_slots() < self.min_claim():
            if wakeups.claim:
                # Work is waiting and we are full: let the other workers take it.
                self.ask_for_help(queue, now)
            return None
        limit = min(ctx.settings.batch_size, self.free_slots())
        if self.idle_keys_due_s is not None and now >= self.idle_keys_due_s:
            self._release_idle_keys(queue, now)
        # A wake's claim takes overdue rows too; the safety poll's takes nothing else. The wake
        # is taken now: one that arrives during the statement (whose snapshot may predate the
        # row it announces) asks for the next claim.
        self._overdue = not wakeups.claim
        wakeups.claim = wakeups.overdue = False
        requests = []
        if self.circuits.probe_due_s is not None and now >= self.circuits.probe_due_s:
            requests = queue.claim_probes(ctx.settings.lease_grace_s)
            self.circuits.probed(now)
        held = bool(self.circuits.held)
        if self._overdue and not self.limits_active and not held:
            claimed = queue.claim_overdue(limit - len(requests), ctx.settings.lease_grace_s)
        else:
            self._claimed_since_poll |= not self._overdue
            claimed = queue.claim(limit - len(requests), ctx.settings.lease_grace_s, limited=self.limits_active,
                                  slots=self.concurrency_limited, overdue_only=self._overdue, circuits=held)
        if wakeups.limits and claimed and self._laxer_than_the_limits(queue):
            # A limit committed before these requests did (its NOTIFY came with the claim's result):
            # give them back, and the next claim runs under it, so it holds for every request after it.
            queue.release([request.id for request in claimed])
            claimed = []
        requests += claimed
        if self.limits_active and len(requests) < limit:
            due_s = queue.limits_due_s()
            if due_s is not None:
                heapq.heappush(self._due_s, time.monotonic() + due_s)
        now_epoch_s = time.time()
        for request in requests:
            if request.attempts > 1:
                ctx.stats["reclaimed"] += 1
                ctx.metrics.lease_reclaims_total.inc()
            ctx.tally.claimed(max(0.0, now_epoch_s - request.created_epoch_s))
        ctx.stats["claimed"] += len(requests)
        self._full = len(requests) == limit
        return requests

    def read_limits(self, queue: Queue) -> tuple[bool, bool]:
        """Read whether limits exist and whether some has a concurrency; return the state before."""
        before = (self.limits_active, self.concurrency_limited)
        self.limits_active, self.concurrency_limited = queue.limits_active()
        return before

    def _laxer_than_the_limits(self, queue: Queue) -> bool:
        """Read the limits' state again (a changed limit is a wake, as in housekeeping); True if
        the claim that just ran was laxer than that state."""
        self.ctx.wakeups.limits = False
        self.ctx.wakeups.claim = True
        had_limits, had_slots = self.read_limits(queue)
        return (self.limits_active and not had_limits) or (self.concurrency_limited and not had_slots)

    def share_load(self, queue: Queue, now: float) -> None:
        """After the claimed requests went to curl: a full batch means more are probably waiting,
        so claim again as slots free up; a busy worker wakes the others to share the load (not for
        the safety poll's claim: a wake would take new rows)."""
        if self._overdue:
            self.ctx.wakeups.overdue |= self._full
            return
        self.ctx.wakeups.claim |= self._full
        if self._full or self.driver.inflight >= self.ctx.settings.max_inflight // 2:
            self.ask_for_help(queue, now)

    def ask_for_help(self, queue: Queue, now: float) -> None:
        """Wake every worker of this database (at most every _HELP_INTERVAL_S)."""
        if now < self._next_help_s:
            return
        self._next_help_s = now + _HELP_INTERVAL_S
        queue.ask_for_help()

    def after_write(self, written: int, retry_delays_ms: list[float], effects: WriteEffects, now: float) -> None:
        """Claim again when a written response may have freed a host's concurrency, let an ordering
        key's next request in, or closed a circuit; and when each retry put back becomes due (its
        not_before was set by the database before now)."""
        if (self.concurrency_limited and written) or effects.released or effects.closed:
            self.ctx.wakeups.claim = True
        if effects.idled:
            self.idle_keys_due_s = now
            self.ctx.wakeups.claim = True
        self.circuits.opened(effects.opened, now)
        self.circuits.written()
        for delay_ms in retry_delays_ms:
            heapq.heappush(self._due_s, now + delay_ms / 1000)

    def _release_idle_keys(self, queue: Queue, now: float) -> None:
        """Let idle ordering keys' next requests in; come back for keys a caller is adding to."""
        released, still_idle = queue.release_idle_keys(_IDLE_KEYS_PER_CALL)
        if released:
            # New rows in the queue, as a wake announces them: this claim takes them.
            self.ctx.wakeups.claim = True
        if still_idle:
            self.idle_keys_due_s = now + self._idle_retry_s
            self._idle_retry_s = min(self._idle_retry_s * 2, _IDLE_RETRY_MAX_S)
        else:
            self.idle_keys_due_s = None
            self._idle_retry_s = _IDLE_RETRY_MIN_S
