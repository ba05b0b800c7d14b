"""The session's life as the loop sees it: connect and first reads, errors that drop it, the schema
dropped or installed again under it, net.worker_restart(), and the database and role pg_net's
settings name."""

from __future__ import annotations

import logging
import math
import time

from ..curl_driver import CurlDriver
from ..errors import DatabaseUnavailable, PgnetCurlError, WritesRefused
from ..queue import Queue
from ..schema import WAITING_FOR_SCHEMA
from . import target
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
        # Go where pg_net.database_name / pg_net.username say at the next connect: at start and
        # at each restart (a reconnect keeps the place: requests may be in flight).
        self._follow_target = True
        # A move there that waits for the requests in flight here to be answered and written.
        self._move_to: str | None = None
        # The last move that failed, and why: each failure is logged once.
        self._move_failed: tuple[str, str] | None = None

    def connect(self) -> None:
        session = self.session
        # A new session is what a pending restart asks for; one asked for from here on (its
        # NOTIFY reaches the new session) comes after this session read its settings.
        self._follow_target = self._follow_target or self.ctx.wakeups.restart
        self.ctx.wakeups.restart = False
        queue = session.open()
        if queue is None:
            return
        try:
            queue_oid = self.housekeeping.first_reads(queue)
            wanted = self._wanted_dsn(queue) if self._follow_target else None
        except PgnetCurlError as exc:
            session.abandon(queue, exc)
            return
        self._follow_target = False
        if wanted is not None:
            queue, queue_oid = self._go_to(wanted, queue, queue_oid)
        self._adopt(queue, queue_oid)

    def _adopt(self, queue: Queue, queue_oid: int | None) -> None:
        self.session.adopt(queue)
        # A (re)start or reconnect is a wake, as in pg_net, for requests and expired responses.
        self.ctx.wakeups.claim = True
        self.housekeeping.expiry.reset()
        # Responses finished while we were away are written now (those whose lease held).
        self.writeback.oldest_s = 0.0
        self.housekeeping.schedule_check(time.monotonic())
        self.follow_schema(queue_oid, fresh_session=True)
        self.housekeeping.write_flag_limits()
        self._release_unheld()

    def _release_unheld(self) -> None:
        """On a new session, give back what is leased to us but neither in flight nor answered: a
        claim whose reply the old connection lost, a write-back a crash undid (synchronous_commit
        is off). Otherwise each waits for its lease to expire."""
        if not (self.session.connected and self.session.serving) or self.ctx.stats["reconnects"] == 0:
            return
        held = (self.driver.inflight_ids() + [response.id for response in self.writeback.pending]
                + [request.id for request in self.claimer.circuits.waiting() + self.claimer.circuits.ready])
        try:
            released = self.session.queue.release_unheld(held)
        except PgnetCurlError as exc:
            self.on_db_error(exc)
            return
        if released:
            log.info("worker %d released %d requests the lost session had leased to it", self.ctx.index, released)

    def _wanted_dsn(self, queue: Queue) -> str | None:
        """Where pg_net's settings send the session, if not where it is (None: stay)."""
        settings = self.ctx.settings
        if not settings.follow_pg_net_settings:
            return None
        wanted = target.wanted_dsn(settings.dsn, *queue.pg_net_target())
        if target.same_place(wanted, self.session.dsn):
            if self._move_to is not None:
                log.info("worker %d stays in database %s as role %s", self.ctx.index, *target.place(wanted))
            self._move_to, self.ctx.holding = None, False
            return None
        return wanted

    def _go_to(self, wanted: str, queue: Queue, queue_oid: int | None) -> tuple[Queue, int | None]:
        """Open a session where wanted says and return it with its schema's oid; on failure, or
        while requests are in flight here, return the session given."""
        if self.driver.inflight or self.writeback.pending:
            # Their answers belong in this database: move once they are written here.
            if self._move_to != wanted:
                log.info("worker %d moves to database %s as role %s once its %d requests in flight are answered",
                         self.ctx.index, *target.place(wanted), self.driver.inflight + len(self.writeback.pending))
            self._move_to, self.ctx.holding = wanted, True
            return queue, queue_oid
        self._move_to, self.ctx.holding = None, False
        moved = None
        try:
            moved = self.session.connect_to(wanted)
            moved_oid = self.housekeeping.first_reads(moved)
        except PgnetCurlError as exc:
            if moved is not None:
                moved.conn.close()
            if self._move_failed != (wanted, str(exc)):
                self._move_failed = (wanted, str(exc))
                say = log.warning if self.ctx.index == 1 else log.debug
                say("worker %d could not serve database %s as role %s, as pg_net.database_name / pg_net.username "
                    "say (%s); staying in database %s as role %s", self.ctx.index, *target.place(wanted), exc,
                    *target.place(self.session.dsn))
            return queue, queue_oid
        queue.conn.close()
        self._move_failed = None
        self.session.dsn = wanted
        # Another database: its schema is found, not installed again.
        self.session.queue_oid = None
        how = ("as pg_net.database_name / pg_net.username say" if wanted != self.ctx.settings.dsn
               else "the DSN's: pg_net.database_name and pg_net.username are unset")
        say = log.info if self.ctx.index == 1 else log.debug
        say("worker %d: serving database %s as role %s (%s)", self.ctx.index, *target.place(wanted), how)
        return moved, moved_oid

    def due_s(self) -> float | None:
        """When act() has something to do: a restart asked for, a move whose requests are answered."""
        if self._move_to is not None and not self.driver.inflight and not self.writeback.pending:
            return 0.0
        if self.ctx.wakeups.restart:
            return self._last_restart_s + RESTART_MIN_INTERVAL_S
        return None

    def act(self, now: float) -> None:
        if self.ctx.wakeups.restart and now >= self._last_restart_s + RESTART_MIN_INTERVAL_S:
            self.restart(now)
        elif self._move_to is not None and not self.driver.inflight and not self.writeback.pending:
            queue, queue_oid = self._go_to(self._move_to, self.session.queue, self.session.queue_oid)
            if queue is not self.session.queue:
                self.session.close()
                self._adopt(queue, queue_oid)

    def on_db_error(self, exc: PgnetCurlError) -> None:
        """Drop the connection and reconnect later; in-flight transfers carry on meanwhile.

        An error from a dropped or reinstalled schema (a missing table, "cached plan must not
        change result type") is no connection problem: when the check agrees, follow the schema.
        A database that refuses writes keeps the finished responses here until it takes them.
        """
        if isinstance(exc, WritesRefused) and self.session.connected:
            self.session.refused(exc, len(self.writeback.pending))
            return
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
            lost = len(self.driver.abort_all()) + len(self.writeback.pending) + len(self.claimer.circuits.waiting())
            self.writeback.pending.clear()
            self.claimer.circuits.forget()
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
        """Write pending responses; tell the claimer what that freed, put back and let in, and the
        TTL passes that a response is stored (no query: the oldest one is known)."""
        queue = self.session.queue
        written, retry_delays_ms = self.writeback.flush(queue, everything)
        now = time.monotonic()
        self.session.writes_accepted(written)
        if written:
            self.housekeeping.expiry.written(now)
        self.claimer.after_write(written, retry_delays_ms, queue.take_effects(), now)

    def restart(self, now: float) -> None:
        """net.worker_restart(): a new database session, so every pg_net.* setting applies anew,
        pg_net.database_name and pg_net.username included.

        In-flight transfers carry on; finished responses are written first. The restart request
        stays pending until a new session opens (connect() takes it).
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
