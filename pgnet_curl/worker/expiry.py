"""Responses past pg_net.ttl: deleted in passes of at most pg_net.batch_size rows, as pg_net's worker
does at every wake and (re)start, and, beyond pg_net, when the oldest response expires."""

from __future__ import annotations

import math

from ..queue import Queue
from .context import WorkerContext

# Passes, and reads of the oldest response after a wake, at most this often: pg_net's worker
# passes about once a second while the last pass deleted something.
PASS_INTERVAL_S = 1.0


class Expiry:
    """Know when the oldest stored response expires, so that a pass runs then, and none before.

    The oldest response's age is read after each pass, and on a new session or a wake (rows
    another worker wrote, or a client inserted, may be unknown then); the responses this worker
    writes itself are known without a query. Times are the worker's monotonic clock: the
    database's age of a row is turned into one, so the two hosts' clocks need not agree.
    """

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        # When the oldest stored response was stored (monotonic), None when there is none.
        self._oldest_s: float | None = None
        # _oldest_s must be read again before it is trusted: a new session, a wake.
        self._stale = True
        self._last_read_s = self._last_pass_s = -math.inf

    def reset(self) -> None:
        """A new session or schema: read the oldest response now (and pass if it expired)."""
        self._stale = True
        self._last_read_s = -math.inf

    def woken(self) -> None:
        """A wake: look again, as pg_net passes at every wake (at most once a second)."""
        self._stale = True

    def written(self, now: float) -> None:
        """This worker stored responses at `now`: the oldest, if the table held none."""
        if self._oldest_s is None and not self._stale:
            self._oldest_s = now

    def due_s(self) -> float | None:
        """When run() has something to do; None: nothing until a write, a wake or a new session."""
        if self._stale:
            return self._last_read_s + PASS_INTERVAL_S
        if self._oldest_s is None:
            return None
        return max(self._oldest_s + self._ttl_s(), self._last_pass_s + PASS_INTERVAL_S)

    def run(self, queue: Queue, now: float) -> None:
        """Read the oldest response or delete what expired, if due; raise PgnetCurlError on failure."""
        due_s = self.due_s()
        if due_s is None or now < due_s:
            return
        if self._stale:
            self._read(queue, now)
            if self._oldest_s is None or now < max(self._oldest_s + self._ttl_s(),
                                                   self._last_pass_s + PASS_INTERVAL_S):
                return
        settings = self.ctx.settings
        ttl_s = self._ttl_s()
        deleted = queue.delete_expired(ttl_s, settings.batch_size)
        # Failed requests kept for replay live as long as their responses.
        queue.delete_expired_archive(ttl_s, settings.batch_size)
        self.ctx.metrics.responses_expired_total.inc(deleted)
        self._last_pass_s = now
        self._read(queue, now)

    def _read(self, queue: Queue, now: float) -> None:
        age_s = queue.oldest_response_age_s()
        self._oldest_s = None if age_s is None else now - age_s
        self._stale = False
        self._last_read_s = now

    def _ttl_s(self) -> float:
        return self.ctx.settings.ttl.total_seconds()
