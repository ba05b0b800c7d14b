"""The worker's database session: connect and LISTEN, turn NOTIFYs into wake-ups, reconnect with backoff."""

from __future__ import annotations

import logging
import random
import select
import time

import psycopg

from .. import db
from ..errors import DatabaseUnavailable, PgnetCurlError
from ..queue import Queue
from ..redact import db_error_text
from .context import WorkerContext
from .dbwait import Service, ServicedConnection
from .poller import DB, Poller

log = logging.getLogger("pgnet_curl.worker")

RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 10.0
# While the database refuses writes, say so at most this often.
_REFUSAL_LOG_INTERVAL_S = 30.0
# A session ended by pg_terminate_backend() (or a server shutdown) is opened again after this,
# as pg_net's worker restarts after its restart delay: monitoring sees the worker go and return.
TERMINATED_RECONNECT_S = 1.0
ADMIN_SHUTDOWN = "57P01"


class Session:
    """One LISTENing connection at a time; when it breaks, the next is tried after a growing delay."""

    def __init__(self, ctx: WorkerContext, poller: Poller, service: Service | None = None):
        self.ctx = ctx
        self._poller = poller
        # While a statement waits for the server, this keeps the transfers moving (dbwait.py).
        self._service = service
        self.application_name = f"pgnet-curl worker {ctx.index}"
        self.conn: psycopg.Connection | None = None
        self.queue: Queue | None = None
        # Where the session goes: the DSN's database and role, or pg_net's (worker/target.py).
        self.dsn = ctx.settings.dsn
        self.backend_pid = 0
        # The server said it ends this session (SQLSTATE 57P01), before closing it.
        self._terminated = False
        self._fd = -1
        self.reconnect_at_s = 0.0
        self._reconnect_delay_s = RECONNECT_MIN_S
        # The queue table's oid while the schema is served; None while waiting for it. A new oid
        # means a drop and reinstall: the requests in flight belong to a table that is gone.
        self.queue_oid: int | None = None
        # Since when the database refuses writes (None: it takes them); the backoff then grows
        # until a write succeeds, not until a connect does (a read-only server takes connects).
        self.refused_since_s: float | None = None
        self._refusal_logged_s = 0.0

    @property
    def connected(self) -> bool:
        return self.conn is not None

    @property
    def serving(self) -> bool:
        """Connected with the net schema there (not waiting for an install)."""
        return self.queue_oid is not None

    def open(self) -> Queue | None:
        """Connect and LISTEN; None (and a reconnect scheduled) when the database can't be reached.

        The session counts as connected only once adopt() has run: the caller reads its first
        settings in between, and abandon()s the connection if that fails.
        """
        try:
            return self.connect_to(self.dsn)
        except PgnetCurlError as exc:
            self.schedule_reconnect(exc)
            return None

    def connect_to(self, dsn: str) -> Queue:
        """Open a LISTENing connection to dsn, not yet the session's; raise PgnetCurlError.

        Its NOTIFYs are handled from the LISTEN on: one that arrives during the first reads (a
        net.worker_restart() after they read the settings) is not lost.
        """
        conn = db.connect(dsn, self.application_name, listen=True, on_notify=self._on_notify,
                          synchronous_commit=self.ctx.settings.synchronous_commit,
                          connection_class=ServicedConnection)
        conn.service = self._service
        return Queue(conn, self.ctx.owner)

    def abandon(self, queue: Queue, exc: PgnetCurlError) -> None:
        queue.conn.close()
        self.schedule_reconnect(exc)

    def adopt(self, queue: Queue) -> None:
        """Make an opened connection the session's: watched, counted, its NOTIFYs handled."""
        conn = queue.conn
        conn.add_notice_handler(self._on_notice)
        self.conn, self.queue = conn, queue
        self._terminated = False
        self.backend_pid = conn.info.backend_pid
        self._fd = conn.fileno()
        self._poller.watch(self._fd, select.POLLIN, DB)
        self.ctx.metrics.worker_db_connected.set(1)
        if self.refused_since_s is not None:
            return
        if self._reconnect_delay_s > RECONNECT_MIN_S or self.ctx.stats["reconnects"]:
            log.info("worker %d reconnected to the database", self.ctx.index)
        self._reconnect_delay_s = RECONNECT_MIN_S

    def read(self) -> None:
        """Take what the server sent (NOTIFYs); raise DatabaseUnavailable if the connection is gone."""
        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"connection lost: {db_error_text(exc)}") from None
        while notify := pgconn.notifies():
            pgconn.notify_handler(notify)
        if self.conn.broken or pgconn.status != psycopg.pq.ConnStatus.OK:
            raise DatabaseUnavailable("connection lost")

    def _on_notify(self, notify: psycopg.Notify) -> None:
        wakeups = self.ctx.wakeups
        if notify.channel == db.WAKE_CHANNEL:
            if notify.pid == self.backend_pid:
                return  # our own call for help
            # A committed request wakes one worker of the N, chosen by the sender's backend pid,
            # so the others run no claim that finds nothing. A worker with more than it can take
            # sends 'help', and every worker claims. A designated worker that is down claims when
            # it is back (a reconnect is a wake); when one dies the supervisor wakes the others.
            # A wake (not 'help') also has the TTL passes look for expired responses, as pg_net's.
            workers = self.ctx.settings.workers
            if notify.payload == "help":
                wakeups.claim = True
            elif workers == 1 or notify.pid % workers == self.ctx.index - 1:
                wakeups.claim = wakeups.expiry = True
        elif notify.channel == db.CONTROL_CHANNEL:
            if notify.payload == "restart":
                wakeups.restart = True
            elif notify.payload == "signing_keys":
                wakeups.keys = True
            elif notify.payload == "installed":
                wakeups.check = True
            elif notify.payload == "destination_limits":
                wakeups.limits = True
            elif notify.payload == "circuits":
                wakeups.circuits = True

    def _on_notice(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        # libpq hands an error that arrives between statements (the FATAL a terminated backend
        # sends before closing) to the notice processor.
        if diagnostic.sqlstate == ADMIN_SHUTDOWN:
            self._terminated = True

    def schedule_reconnect(self, exc: PgnetCurlError) -> None:
        if self._terminated or getattr(exc, "sqlstate", None) == ADMIN_SHUTDOWN:
            self._terminated = False
            self._reconnect_delay_s = RECONNECT_MIN_S
            log.warning("worker %d: the database ended its session (pg_terminate_backend or a shutdown); "
                        "reconnecting in %.1f s", self.ctx.index, TERMINATED_RECONNECT_S)
            self.reconnect_at_s = time.monotonic() + TERMINATED_RECONNECT_S
            return
        log.warning("worker %d: %s; retrying in %.1f s", self.ctx.index, exc, self._next_attempt())

    def _next_attempt(self) -> float:
        """Schedule the next connect after a growing, jittered delay; return that delay."""
        delay_s = self._reconnect_delay_s * random.uniform(0.8, 1.2)
        self.reconnect_at_s = time.monotonic() + delay_s
        self._reconnect_delay_s = min(self._reconnect_delay_s * 2, RECONNECT_MAX_S)
        return delay_s

    def refused(self, exc: PgnetCurlError, unwritten: int) -> None:
        """The database refuses writes: drop this session (a failover moves the writable server;
        this one stays read-only) and try a new one later. The caller keeps its responses."""
        now = time.monotonic()
        first = self.refused_since_s is None
        if first:
            self.refused_since_s = now
        # The count first: a scrape that sees the flag sees its count (and in writes_accepted).
        self.ctx.metrics.unwritten_responses.set(unwritten)
        self.ctx.metrics.worker_writes_refused.set(1)
        self.ctx.stats["reconnects"] += 1
        self.close()
        delay_s = self._next_attempt()
        if first or now - self._refusal_logged_s >= _REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged_s = now
            log.warning("worker %d: the database refuses writes (%s): keeping %d responses, retrying in %.1f s",
                        self.ctx.index, exc, unwritten, delay_s)

    def writes_accepted(self, stored: int) -> None:
        """A write went through: leave the refused state, if in it."""
        if self.refused_since_s is None:
            return
        log.info("worker %d: the database accepts writes again: stored %d responses kept for %.1f s",
                 self.ctx.index, stored, time.monotonic() - self.refused_since_s)
        self.refused_since_s = None
        self._reconnect_delay_s = RECONNECT_MIN_S
        self.ctx.metrics.unwritten_responses.set(0)
        self.ctx.metrics.worker_writes_refused.set(0)

    def lost(self, exc: PgnetCurlError) -> None:
        """Drop a broken connection and reconnect later; in-flight transfers carry on meanwhile."""
        self.ctx.stats["reconnects"] += 1
        self.ctx.metrics.db_reconnects_total.inc()
        self.close()
        self.schedule_reconnect(exc)

    def close(self) -> None:
        if self.conn is None:
            return
        # By fd number: a broken connection cannot tell its fileno() any more.
        self._poller.unwatch(self._fd)
        try:
            self.conn.close()
        except psycopg.Error:
            pass
        self.conn = self.queue = None
        self.ctx.metrics.worker_db_connected.set(0)
        self.ctx.metrics.worker_waiting_for_schema.set(0)
