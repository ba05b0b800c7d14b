"""Housekeeping: the schema and pg_net.* settings check, signing key and limit refresh, the TTL passes,
and the safety poll."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .. import schema
from ..errors import DatabaseUnavailable, PgnetCurlError, SchemaError
from ..queue import Queue
from .claimer import Claimer
from .context import WorkerContext
from .expiry import Expiry
from .outcome import Outcome
from .session import Session

log = logging.getLogger("pgnet_curl.worker")

# The schema version this worker's statements need (an older install waits for `install`).
_SCHEMA_VERSION = schema.latest_version()
# While the net schema is missing, look for it this often (the install also NOTIFYs).
SCHEMA_WAIT_CHECK_S = 0.5
# Signing keys are read again this often, besides on their NOTIFY and at connect.
_SIGNING_KEYS_REFRESH_S = 60.0
# Token buckets that are full again (and slots of dead workers) are forgotten this often.
_IDLE_BUCKETS_EVERY_S = 30.0
# Worker 1 looks this often for ordering keys whose head left the queue by other means than a
# write-back (a delete by hand, a truncate): a scan of the queue.
_ORDERING_SWEEP_S = 60.0


class Housekeeping:
    """Timed reads and deletes that keep a worker's view of the database current and its tables small.

    follow_schema(oid) is the loop's: it is called with what each check found.
    """

    def __init__(self, ctx: WorkerContext, session: Session, outcome: Outcome, claimer: Claimer,
                 follow_schema: Callable[[int | None], None]):
        self.ctx = ctx
        self.session = session
        self.outcome = outcome
        self.claimer = claimer
        self._follow_schema = follow_schema
        self.expiry = Expiry(ctx)
        self.next_poll_s = self.next_check_s = self._next_keys_s = self._next_buckets_s = 0.0
        # The outdated schema version last reported, so that it is reported once.
        self._outdated_seen: int | None = None
        # A schema net this worker cannot read (not pgnet-curl's) was reported.
        self._unreadable_seen = False
        self._limits_written_oid: int | None = None
        self._next_ordering_sweep_s = 0.0

    def start(self, now: float) -> None:
        self.next_poll_s = now + self.ctx.settings.poll_interval_s
        self.next_check_s = now + self.ctx.settings.settings_refresh_s

    def first_reads(self, queue: Queue) -> int | None:
        """On a new connection: settings, the schema's oid (None: wait for it), keys and limits."""
        checked_oid, batch_size, ttl = queue.check()
        self.ctx.settings = self.ctx.settings.with_database_values(batch_size, ttl)
        try:
            queue_oid = self._usable(checked_oid, queue)
            if queue_oid is not None:
                self.outcome.signing_keys = queue.signing_keys()
                self.claimer.read_limits(queue)
                self._read_features(queue, time.monotonic())
        except SchemaError:
            # Dropped between the check and these reads: connected, waiting for it.
            queue_oid = None
        if checked_oid is not None and queue_oid is None and not self.session.serving and self._outdated_seen is None:
            # Dropped after the check saw it, before this worker served it: told as a drop while
            # serving is (following the schema tells it when a served schema is gone).
            (log.info if self.ctx.index == 1 else log.debug)("%s (the schema was dropped)", schema.WAITING_FOR_SCHEMA)
        return queue_oid

    def check(self) -> int | None:
        """Re-read pg_net's settings; return the queue table's oid (None: no schema)."""
        queue = self.session.queue
        queue_oid, batch_size, ttl = queue.check()
        before = self.ctx.settings
        self.ctx.settings = before.with_database_values(batch_size, ttl)
        if self.ctx.wakeups.reload or self.ctx.settings != before:
            log.info("worker %d settings: batch_size=%d ttl=%s", self.ctx.index, self.ctx.settings.batch_size,
                     self.ctx.settings.ttl)
            self.ctx.wakeups.claim = True
        self.ctx.wakeups.reload = False
        return self._usable(queue_oid, queue)

    def _usable(self, queue_oid: int | None, queue: Queue) -> int | None:
        """queue_oid if the schema there is the version this worker needs, else None (wait).

        The version is read only when the schema is new to us: not on every check.
        """
        if queue_oid is None or (queue_oid == self.session.queue_oid and self.session.serving):
            return queue_oid
        try:
            installed = schema.installed_version(queue.conn)
        except SchemaError:
            return None  # dropped again since the check: wait for the next install
        except DatabaseUnavailable:
            raise
        except PgnetCurlError as exc:
            # Tables of that name this role may not read (another extension's): not ours, wait.
            if not self._unreadable_seen:
                self._unreadable_seen = True
                log.warning("worker %d: schema net is not a pgnet-curl install this role can read (%s); waiting",
                            self.ctx.index, exc)
            return None
        self._unreadable_seen = False
        if installed is not None and installed >= _SCHEMA_VERSION:
            self._outdated_seen = None
            return queue_oid
        if installed != self._outdated_seen:
            self._outdated_seen = installed
            log.warning("worker %d: the net schema is version %s and this pgnet-curl needs version %d: "
                        "run pgnet-curl install; waiting", self.ctx.index, installed, _SCHEMA_VERSION)
        return None

    def check_interval_s(self) -> float:
        if self.session.serving:
            return self.ctx.settings.settings_refresh_s
        return min(self.ctx.settings.settings_refresh_s, SCHEMA_WAIT_CHECK_S)

    def schedule_check(self, now: float) -> None:
        self.next_check_s = now + self.check_interval_s()

    def due_s(self) -> float:
        """The next time run() has something to do (while connected)."""
        if self.ctx.wakeups.check:
            return 0.0
        due_s = min(self.next_poll_s, self.next_check_s)
        if self.session.serving:
            expiry_s = self.expiry.due_s()
            if expiry_s is not None:
                due_s = min(due_s, expiry_s)
        return due_s

    def run(self, now: float) -> None:
        """Do what is due; raise PgnetCurlError if the database fails meanwhile."""
        wakeups = self.ctx.wakeups
        if wakeups.reload or wakeups.check or now >= self.next_check_s:
            wakeups.check = False
            self._follow_schema(self.check())
            self.schedule_check(now)
        # A reinstall renews the session, which may fail: then the reconnect takes over.
        if not self.session.connected or not self.session.serving:
            return
        queue = self.session.queue
        self.claimer.circuits.expire(now)
        if now >= self.next_poll_s:
            # What no wake announces: leases that expired, retries that are due (not new rows).
            # A wake's claim since the last poll took those too.
            if not self.claimer.take_claimed_since_poll():
                wakeups.overdue = True
            self.next_poll_s = now + self.ctx.settings.poll_interval_s
            if self.ctx.index == 1:
                self._sample_queue(queue)
            # Also the safety net under the circuits' NOTIFYs, and the ordering keys' write-backs.
            wakeups.circuits = False
            self._read_features(queue, now, poll=True)
        if wakeups.circuits:
            wakeups.circuits = False
            self._read_features(queue, now)
            # A closed circuit's requests are back in the queue: that is a wake.
            wakeups.claim = True
        limits_changed = wakeups.limits
        if wakeups.keys or now >= self._next_keys_s:
            # Also a safety net under the NOTIFYs of key and limit changes.
            wakeups.limits = True
            wakeups.keys = False
            self._next_keys_s = now + _SIGNING_KEYS_REFRESH_S
            self.outcome.signing_keys = queue.signing_keys()
        if wakeups.limits:
            wakeups.limits = False
            before = self.claimer.read_limits(queue)
            # Changed limits may let held-back requests go; a refresh that finds none is no wake.
            if limits_changed or before != (self.claimer.limits_active, self.claimer.concurrency_limited):
                wakeups.claim = True
        if wakeups.expiry:
            wakeups.expiry = False
            self.expiry.woken()
        self.expiry.run(queue, now)
        if self.claimer.limits_active and now >= self._next_buckets_s:
            self._next_buckets_s = now + _IDLE_BUCKETS_EVERY_S
            queue.delete_idle_buckets()

    def write_flag_limits(self) -> None:
        """Worker 1 writes serve's --destination-limit rows into each schema it serves (a
        reinstall drops them); their NOTIFY tells every worker of the database."""
        settings = self.ctx.settings
        if not (self.session.serving and self.ctx.index == 1 and settings.destination_limits
                and self._limits_written_oid != self.session.queue_oid):
            return
        try:
            self.session.queue.set_destination_limits(settings.destination_limits)
        except PgnetCurlError as exc:
            log.warning("worker %d could not write the --destination-limit rows (%s)", self.ctx.index, exc)
            return
        self._limits_written_oid = self.session.queue_oid
        log.info("destination limits set: %s", ", ".join(limit.host_pattern for limit in settings.destination_limits))

    def _read_features(self, queue: Queue, now: float, poll: bool = False) -> None:
        """The circuits to hold requests for, and at a poll the ordering keys' and circuits' sweeps."""
        ordering, idle, circuits = queue.feature_state()
        self.claimer.circuits.on_state(circuits, now)
        if idle:
            # E.g. a key its write-back left idle, whose worker then died: let its next request in.
            self.claimer.idle_keys_due_s = now
        if not poll:
            return
        if ordering:
            if self.ctx.index == 1 and now >= self._next_ordering_sweep_s:
                self._next_ordering_sweep_s = now + _ORDERING_SWEEP_S
                queue.release_idle_keys(0, sweep=True)
                self.claimer.idle_keys_due_s = now
        if self.ctx.index == 1:
            self.claimer.circuits.publish(circuits)
            if self.claimer.circuits.held or now < self.claimer.circuits.held_until_s:
                queue.unpark_requests()

    def _sample_queue(self, queue: Queue) -> None:
        """Queue depth and oldest pending age, sampled at the poll by one worker (not per request)."""
        depth, oldest_age_s = queue.sample()
        # The age first: a scrape that sees this depth sees the age of the same sample.
        self.ctx.metrics.queue_oldest_pending_seconds.set(oldest_age_s or 0.0)
        self.ctx.metrics.queue_depth.set(depth)
