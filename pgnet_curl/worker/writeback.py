"""The write-back buffer: finished responses wait here and go to the database in batches."""

from __future__ import annotations

import logging
import time

from ..errors import DatabaseUnavailable, PgnetCurlError, SchemaError
from ..model import Response
from ..queue import Queue
from .context import WorkerContext

log = logging.getLogger("pgnet_curl.worker")


class WriteBack:
    """Flushed when a batch is full, when its oldest response has waited flush_interval_ms, when
    nothing else is in flight, or at once while the loop is quiet (one socket ready at most)."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.pending: list[Response] = []
        self.oldest_s = 0.0
        # Set by the loop for each step.
        self.quiet = True

    def add(self, responses: list[Response], now: float) -> None:
        if not responses:
            return
        if not self.pending:
            self.oldest_s = now
        self.pending.extend(responses)

    def due_s(self) -> float | None:
        """When the oldest pending response must be written at the latest."""
        if not self.pending:
            return None
        return self.oldest_s + self.ctx.settings.flush_interval_ms / 1000

    def flush_due(self, now: float, inflight: int) -> bool:
        return bool(self.pending) and (
            len(self.pending) >= self.ctx.settings.write_batch_size or inflight == 0 or self.quiet
            or now - self.oldest_s >= self.ctx.settings.flush_interval_ms / 1000)

    def flush(self, queue: Queue, everything: bool) -> tuple[int, list[float]]:
        """Write pending responses in batches of write_batch_size (all of them if everything).

        Return (rows written, retry delays in ms of the requests put back for another attempt).
        """
        batch_size = self.ctx.settings.write_batch_size
        written_total, retry_delays_ms = 0, []
        while self.pending:
            batch = self.pending[:batch_size]
            started_s = time.monotonic()
            written = self._write(queue, batch)
            del self.pending[: len(batch)]
            self._count(batch, written, time.monotonic() - started_s)
            written_total += written
            retry_delays_ms.extend(r.retry_in_ms for r in batch if r.retry_in_ms is not None)
            self.oldest_s = time.monotonic()
            if not everything and len(self.pending) < batch_size:
                break
        return written_total, retry_delays_ms

    def _write(self, queue: Queue, batch: list[Response]) -> int:
        """Write a batch; if the database refuses it, write row by row so one bad row loses nothing."""
        settings = self.ctx.settings
        try:
            return queue.write(batch, settings.notify_channel, settings.ordering_on_failure == "halt",
                               self.ctx.circuit_params)
        except (DatabaseUnavailable, SchemaError):
            raise
        except PgnetCurlError as exc:
            if len(batch) == 1:
                return self._write_unstorable(queue, batch[0], exc)
            log.warning("worker %d: a write-back batch was refused (%s); writing row by row", self.ctx.index, exc)
            return sum(self._write(queue, [row]) for row in batch)

    def _write_unstorable(self, queue: Queue, response: Response, exc: Exception) -> int:
        """Store an error row for a response the database would not take as it was."""
        replacement = Response(response.id, status_code=response.status_code,
                               content_type=response.content_type,
                               error_msg=f"the response could not be stored: {exc}", request=response.request)
        return queue.write([replacement], halt=self.ctx.settings.ordering_on_failure == "halt",
                           circuit=self.ctx.circuit_params)

    def _count(self, batch: list[Response], written: int, duration_s: float) -> None:
        ctx = self.ctx
        ctx.stats["written"] += written
        ctx.stats["lease_lost"] += len(batch) - written
        ctx.metrics.write_batch_duration_seconds.observe(duration_s)
        ctx.metrics.write_batch_size.observe(len(batch))
        if len(batch) > written:
            ctx.metrics.lease_lost_total.inc(len(batch) - written)
        now_epoch_s = time.time()
        for response in batch:
            if response.retry_in_ms is None:
                ctx.tally.written(max(0.0, now_epoch_s - response.request.created_epoch_s))
