"""The session's life as the loop sees it: connect and first reads, errors that drop it, the schema
dropped or installed again under it, and net.worker_restart()."""

from __future__ import annotations

import logging
import math
import time

from ..curl_driver import CurlDriver
from ..errors import DatabaseUnavailable, PgnetCurlError
from ..schema import WAITING_FOR_SCHEMA
from .claimer import Claimer
from .context import WorkerContext
from .housekeeping import Housekeeping
from .session import Session
from .writeback import WriteBack

log = logging.getLogger("pgnet_curl.worker")

# net.worker_restart() calls that arrive while a restart is pending merge into it: a session is
# restarted at most this often, so a loop of calls cannot keep a worker from its work.
RESTART_MIN_INTERVAL_S = 0.5


class Lifecycle:
    """What happens to the stages' state when the session or the schema under it changes."""

    def __init__(self, ctx: WorkerContext, session: Session, driver: CurlDriver, claimer: Claimer,
                 writeback: WriteBack):
        self.ctx = ctx
        self.session = session
        self.driver = driver
        self.claimer = claimer
        self.writeback = writeback
        self.housekeeping: Housekeeping | None = None  # set by the loop once built
        self._last_restart_s = -math.inf

    def connect(self) -> None:
        session = self.session
        queue = session.open()
        if queue is None:
            return
        try:
            queue_oid = self.housekeeping.first_reads(queue)
        except PgnetCurlError as exc:
            session.abandon(queue, exc)
            return
        # A new session is what a pending restart asked for.
        self.ctx.wakeups.restart = False
        session.adopt(queue)
        # A (re)start or reconnect is a wake, as in pg_net, for requests and expired responses.
        self.ctx.wakeups.claim = True
        self.housekeeping.expiry.reset()
        # Responses finished while we were away are written now (those whose lease held).
        self.writeback.oldest_s = 0.0
        self.housekeeping.schedule_check(time.monotonic())
        self.follow_schema(queue_oid, fresh_session=True)
        self.housekeeping.write_flag_limits()

    def due_s(self) -> float | None:
        """When act() has something to do: a restart asked for."""
        if self.ctx.wakeups.restart:
            return self._last_restart_s + RESTART_MIN_INTERVAL_S
        return None

    def act(self, now: float) -> None:
        if self.ctx.wakeups.restart and now >= self._last_restart_s + RESTART_MIN_INTERVAL_S:
            self.restart(now)

    def on_db_error(self, exc: PgnetCurlError) -> None:
        """Drop the connection and reconnect later; in-flight transfers carry on meanwhile.

        An error from a dropped or reinstalled schema (a missing table, "cached plan must not
        change result type") is no connection problem: when the check agrees, follow the schema.
        """
        if not isinstance(exc, DatabaseUnavailable) and self.session.connected and self.session.serving:
            try:
                queue_oid = self.housekeeping.check()
                if queue_oid != self.session.queue_oid:
                    self.follow_schema(queue_oid)
                    return
            except PgnetCurlError as check_exc:
                exc = check_exc
        self.session.lost(exc)

    def follow_schema(self, queue_oid: int | None, fresh_session: bool = False) -> None:
        """Follow the schema appearing, disappearing, or being dropped and installed again."""
        session = self.session
        was = session.queue_oid
        session.queue_oid = queue_oid
        self.ctx.metrics.worker_waiting_for_schema.set(0 if session.serving else 1)
        if queue_oid == was:
            return
        # Only worker 1 tells: one line per change, not one per worker.
        say = log.info if self.ctx.index == 1 else log.debug
        if was is not None:
            lost = len(self.driver.abort_all()) + len(self.writeback.pending)
            self.writeback.pending.clear()
            if lost:
                log.warning("worker %d: the net schema was dropped with %d requests in flight or unwritten; "
                            "they are gone with it", self.ctx.index, lost)
        if queue_oid is None:
            say("%s (the schema was dropped)", WAITING_FOR_SCHEMA)
        else:
            say("net schema %s: serving", "found" if was is None else "installed again")
        self.ctx.wakeups.claim = session.serving
        self.housekeeping.schedule_check(time.monotonic())
        if session.serving and not fresh_session:
            # This session's prepared statements return the dropped schema's types ("cached
            # plan must not change result type"): a new session starts clean, as pg_net's does.
            session.close()
            self.connect()

    def flush(self, everything: bool) -> None:
        """Write pending responses; tell the claimer what that freed and put back, and the TTL
        passes that a response is stored (no query: the oldest one is known)."""
        written, retry_delays_ms = self.writeback.flush(self.session.queue, everything)
        now = time.monotonic()
        if written:
            self.housekeeping.expiry.written(now)
        self.claimer.after_write(written, retry_delays_ms, now)

    def restart(self, now: float) -> None:
        """net.worker_restart(): a new database session, so every pg_net.* setting applies anew.

        In-flight transfers carry on; finished responses are written first. The restart request
        stays pending until a new session is open (connect() clears it).
        """
        self._last_restart_s = now
        log.info("worker %d restarting its database session (net.worker_restart)", self.ctx.index)
        try:
            self.flush(everything=True)
        except PgnetCurlError as exc:
            self.on_db_error(exc)
            return
        self.session.close()
        self.connect()
        if self.session.connected:
            settings = self.ctx.settings
            log.info("worker %d settings: batch_size=%d ttl=%s", self.ctx.index, settings.batch_size, settings.ttl)
