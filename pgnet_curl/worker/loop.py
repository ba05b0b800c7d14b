"""One worker process: a single event loop over curl's sockets and timer, the database session
(LISTEN) and the write-back timer, passing each request on through the stages.

Data flows one way: session -> claimer -> outcome.before_send -> circuits.admit -> curl driver ->
outcome.after_finish -> circuits.after_finish -> write-back -> metrics; housekeeping keeps the
session's view current.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time

from ..curl_driver import CurlDriver
from ..destination_policy import DestinationPolicy
from ..errors import PgnetCurlError
from ..model import Request, Response
from ..redact import safe_url
from ..settings import Settings
from .circuits import Circuits
from .claimer import Claimer
from .context import WorkerContext
from .housekeeping import Housekeeping
from .lifecycle import Lifecycle
from .outcome import Outcome
from .poller import CURL, DB, READABLE, SIGNAL, WRITABLE, Poller
from .session import Session
from .writeback import WriteBack

log = logging.getLogger("pgnet_curl.worker")

# Per-request observations reach /metrics at most this late.
METRICS_FLUSH_INTERVAL_S = 0.25
# A second stop signal within this many seconds of the first is the same request.
_REPEATED_STOP_AFTER_S = 2.0


class Worker:
    """Claim requests, send them through curl, write responses back; until told to stop."""

    def __init__(self, settings: Settings, index: int = 1, run_id: str | None = None, database: str = "default"):
        self.ctx = ctx = WorkerContext.create(settings, index, run_id, database)
        self.poller = Poller()
        self.driver = CurlDriver(self.poller.watch_curl_fd, max_redirects=settings.max_redirects,
                                 max_host_connections=settings.max_host_connections,
                                 max_response_bytes=settings.max_response_bytes,
                                 ca_file=settings.ca_file, ca_path=settings.ca_path,
                                 client_cert=settings.client_cert, client_key=settings.client_key,
                                 proxy=settings.proxy,
                                 destination_policy=DestinationPolicy(
                                     settings.deny_cidrs, settings.allow_cidrs, settings.deny_private))
        self.session = Session(ctx, self.poller, self._run_transfers_while_waiting)
        self.circuits = Circuits(ctx)
        self.claimer = Claimer(ctx, self.driver, self.circuits)
        self.outcome = Outcome(ctx)
        self.writeback = WriteBack(ctx)
        self.lifecycle = Lifecycle(ctx, self.session, self.driver, self.claimer, self.writeback)
        self.housekeeping = Housekeeping(ctx, self.session, self.outcome, self.claimer, self.lifecycle.follow_schema)
        self.lifecycle.housekeeping = self.housekeeping
        self.housekeeping.start(time.monotonic())
        self._stop_requested_s = 0.0
        self._drain_deadline_s = 0.0
        self._next_metrics_flush_s = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and a drain; return the process exit code."""
        self._install_signal_handlers()
        self.lifecycle.connect()
        settings = self.ctx.settings
        log.info("worker %d started (pid %d, max_inflight=%d, batch_size=%d, ttl=%s)", self.ctx.index, os.getpid(),
                 settings.max_inflight, settings.batch_size, settings.ttl)
        try:
            while not self._finished():
                self._step()
        finally:
            self._shutdown()
        return 0

    def request_stop(self) -> None:
        """Stop claiming; finish what is in flight until the drain deadline."""
        if self.ctx.stopping:
            # A terminal's Ctrl-C or systemd signals the whole process group and the supervisor
            # forwards the same stop: only a stop repeated later means "give up on the drain".
            if time.monotonic() - self._stop_requested_s > _REPEATED_STOP_AFTER_S:
                self._drain_deadline_s = 0.0
            return
        self._stop_requested_s = time.monotonic()
        log.info("worker %d draining: %d in flight, %d responses to write", self.ctx.index,
                 self.driver.inflight, len(self.writeback.pending))
        self.ctx.stopping = True
        self._drain_deadline_s = time.monotonic() + self.ctx.settings.drain_timeout_s
        # Claimed requests waiting for a failing host are in flight as far as a drain goes.
        for request in self.circuits.take_waiting():
            self.driver.add(request)

    def _finished(self) -> bool:
        if not self.ctx.stopping:
            return False
        if self.driver.inflight == 0 and not self.writeback.pending:
            return True
        return time.monotonic() >= self._drain_deadline_s

    def _shutdown(self) -> None:
        unfinished = (self.driver.abort_all() + self.circuits.waiting() + self.circuits.take_ready()
                      + self.circuits.to_release)
        pending = self.writeback.pending
        if self.session.connected and self.session.serving:
            try:
                if pending:
                    self.writeback.flush(self.session.queue, everything=True)
                released = self.session.queue.release([request.id for request in unfinished])
                if released:
                    # Unleased rows look new, and new rows wait for a wake: give one.
                    self.session.queue.ask_for_help()
                if unfinished:
                    log.warning("worker %d released %d unfinished requests to the queue", self.ctx.index, released)
            except PgnetCurlError as exc:
                log.warning("worker %d could not hand back its work (%s); leases will expire", self.ctx.index, exc)
        if pending:
            log.warning("worker %d exits with %d unwritten responses; their requests will be sent again "
                        "after their leases expire", self.ctx.index, len(pending))
        self.driver.close()
        self.session.close()
        self._publish_metrics(time.monotonic())
        log.info("worker %d stopped: %s", self.ctx.index, self.ctx.stats)

    def _install_signal_handlers(self) -> None:
        self._signal_r, self._signal_w = socket.socketpair()
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        self.poller.watch(self._signal_r.fileno(), select.POLLIN, SIGNAL)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: setattr(self.ctx.wakeups, "reload", True))
        # The supervisor forks us with these blocked, so none is lost before this point.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    def _drain_signal_socket(self) -> None:
        try:
            while self._signal_r.recv(512):
                pass
        except BlockingIOError:
            pass

    # ---- the loop --------------------------------------------------------------------------

    def _step(self) -> None:
        ready = self.poller.poll(self._poll_timeout_s())
        # A quiet loop (at most one socket ready) writes responses at once; a busy one batches.
        self.writeback.quiet = len(ready) <= 1
        kinds = self.poller.kinds
        for fd, mask in ready:
            kind = kinds.get(fd)
            if kind is CURL:
                self.driver.socket_event(fd, bool(mask & READABLE), bool(mask & WRITABLE))
            elif kind is DB:
                self._guarded(self.session.read)
            elif kind is SIGNAL:
                self._drain_signal_socket()
        now = time.monotonic()
        if self.driver.timer_deadline_s is not None and now >= self.driver.timer_deadline_s:
            self.driver.timer_event()
        finished = self.driver.take_finished()
        if finished:
            self.outcome.after_finish(finished)
            admitted = self.circuits.after_finish(finished, now)
            self.writeback.add(finished, now)
            self._count_finished(finished)
            for request in admitted:
                self.driver.add(request)
        if self.ctx.tally.pending and now >= self._next_metrics_flush_s:
            self._publish_metrics(now)
        if not self.session.connected:
            if now >= self.session.reconnect_at_s:
                self.lifecycle.connect()
            return
        if not self.session.serving:
            self._periodic(now)
            return
        # Each stage may lose the connection; the next ones then wait for the reconnect.
        for stage in (self._flush_if_due, self._periodic, self._claim):
            if not self.session.connected:
                return
            stage(now)

    def _run_transfers_while_waiting(self, fd: int, events: int, timeout_s: float) -> int:
        """A statement waits for the database (dbwait.py): move the transfers on meanwhile, for up
        to timeout_s; return fd's poll events as soon as it is ready (0 if it was not)."""
        poller, driver = self.poller, self.driver
        kind_before = poller.kinds.get(fd)
        poller.watch(fd, events, DB)
        deadline_s = time.monotonic() + timeout_s
        try:
            while True:
                now = time.monotonic()
                wait_s = deadline_s - now
                if driver.timer_deadline_s is not None:
                    wait_s = min(wait_s, driver.timer_deadline_s - now)
                fd_events = 0
                for ready_fd, mask in poller.poll(max(0.0, wait_s)):
                    kind = poller.kinds.get(ready_fd)
                    if ready_fd == fd:
                        fd_events = mask
                    elif kind is CURL:
                        driver.socket_event(ready_fd, bool(mask & READABLE), bool(mask & WRITABLE))
                    elif kind is SIGNAL:
                        self._drain_signal_socket()
                if driver.timer_deadline_s is not None and time.monotonic() >= driver.timer_deadline_s:
                    driver.timer_event()
                if fd_events or time.monotonic() >= deadline_s:
                    return fd_events
        finally:
            if kind_before is None:
                poller.unwatch(fd)
            else:
                poller.watch(fd, select.POLLIN, kind_before)

    def _poll_timeout_s(self) -> float:
        now = time.monotonic()
        deadlines = [self.housekeeping.next_poll_s]
        for deadline in (self.driver.timer_deadline_s, self.writeback.due_s(), self.claimer.next_due_s()):
            if deadline is not None:
                deadlines.append(deadline)
        if self.ctx.tally.pending:
            deadlines.append(self._next_metrics_flush_s)
        if not self.session.connected:
            deadlines.append(self.session.reconnect_at_s)
        else:
            deadlines.append(self.housekeeping.due_s())
            lifecycle_s = self.lifecycle.due_s()
            if lifecycle_s is not None:
                deadlines.append(lifecycle_s)
            if self.session.serving and self.claimer.ready():
                deadlines.append(now)
        if self.ctx.stopping:
            deadlines.append(self._drain_deadline_s)
        return max(0.0, min(deadlines) - now)

    def _guarded(self, action, *args) -> None:
        """Run a database action; a failure drops the session (or follows the schema)."""
        try:
            action(*args)
        except PgnetCurlError as exc:
            self.lifecycle.on_db_error(exc)

    def _flush_if_due(self, now: float) -> None:
        if self.writeback.flush_due(now, self.driver.inflight):
            self._guarded(self.lifecycle.flush, False)

    def _periodic(self, now: float) -> None:
        due_s = self.lifecycle.due_s()
        if due_s is not None and now >= due_s:
            self.lifecycle.act(now)
            if not self.session.connected:
                return
        self.claimer.wake_if_due(now)
        self._guarded(self.housekeeping.run, now)

    def _claim(self, now: float) -> None:
        queue = self.session.queue
        circuits = self.circuits
        if circuits.ready:
            for request in circuits.take_ready():
                self.driver.add(request)
        if circuits.to_release or circuits.resets:
            self._guarded(circuits.flush, queue)
            if not self.session.connected:
                return
        try:
            requests = self.claimer.claim(queue, now)
        except PgnetCurlError as exc:
            self.lifecycle.on_db_error(exc)
            return
        if requests is None:
            return
        self.session.writes_accepted(0)
        if requests and requests[0].queue_oid != self.session.queue_oid:
            # Claimed from a reinstalled schema before its check or NOTIFY was seen: what is in
            # flight now belongs to the dropped tables; these requests do not.
            self.lifecycle.follow_schema(requests[0].queue_oid)
        self._send(requests)
        if self.session.connected:
            self._guarded(self.claimer.share_load, self.session.queue, now)

    def _send(self, requests: list[Request]) -> None:
        """Hand each claimed request to curl, or its error row to the write-back."""
        answers = []
        for request in requests:
            try:
                # The session's queue of now: following a reinstall above renews the session.
                answer = self.outcome.before_send(request, self.session.queue)
            except PgnetCurlError as exc:
                # Not sent now; its lease expires and it is claimed again.
                self.lifecycle.on_db_error(exc)
                continue
            if answer is None:
                if self.circuits.watching and not self.circuits.admit(request):
                    continue  # held for its host: waits here or goes back to the queue
                self.driver.add(request)
            else:
                # Not sent: no outcome for its circuit (a probe is claimed again when it expires).
                request.circuit_probe = False
                answers.append(answer)
        self.writeback.add(answers, time.monotonic())

    def _count_finished(self, finished: list[Response]) -> None:
        tally = self.ctx.tally
        for response in finished:
            tally.finished(response.request.method, response.status_code, response.timed_out, response.duration_s)
        if log.isEnabledFor(logging.DEBUG):
            for response in finished:
                request = response.request
                log.debug("worker %d: request %d %s %s -> %s", self.ctx.index, request.id, request.method,
                          safe_url(request.url), response.status_code or response.error_msg)

    def _publish_metrics(self, now: float) -> None:
        # The gauge first: a scrape that sees the counters of finished requests sees them out of flight.
        self.ctx.metrics.inflight_requests.set(self.driver.inflight)
        self.ctx.tally.flush()
        if self.session.refused_since_s is not None:
            self.ctx.metrics.unwritten_responses.set(len(self.writeback.pending))
        self._next_metrics_flush_s = now + METRICS_FLUSH_INTERVAL_S
