"""One worker process: a single event loop over curl's sockets and timer, the database
connection (LISTEN), and the write-back timer.

Data flows one way: claim from the queue -> curl driver -> write-back buffer -> queue.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import secrets
import select
import signal
import socket
import time

import psycopg
import pycurl

from . import db, metrics, retry, schema, signing
from .curl_driver import CurlDriver
from .destination_policy import DestinationPolicy
from .errors import DatabaseUnavailable, PgnetCurlError, SchemaError
from .model import Request, Response
from .queue import Queue
from .redact import db_error_text, safe_url
from .settings import Settings

log = logging.getLogger("pgnet_curl.worker")

_CURL, _DB, _SIGNAL = "curl", "db", "signal"
# epoll and poll share these bit values. Errors and hang-ups count as readable: the reader
# (libcurl or libpq) finds out what happened.
_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP
_WRITABLE = select.POLLOUT
_POLL_TO_EVENTS = {
    pycurl.POLL_IN: select.POLLIN,
    pycurl.POLL_OUT: select.POLLOUT,
    pycurl.POLL_INOUT: select.POLLIN | select.POLLOUT,
}
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.1, 10.0
# Per-request observations reach /metrics at most this late.
METRICS_FLUSH_INTERVAL_S = 0.25
# Calls for help (a NOTIFY that wakes every worker) at most this often.
_HELP_INTERVAL_S = 0.05
# A second stop signal within this many seconds of the first is the same request.
_REPEATED_STOP_AFTER_S = 2.0
# TTL sweep: at most this many delete statements per sweep, so a sweep never stalls the loop.
_TTL_SWEEP_MAX_STATEMENTS = 10
# The schema version this worker's statements need (an older install waits for `install`).
_SCHEMA_VERSION = schema.latest_version()
# Signing keys are read again this often, besides on their NOTIFY and at connect.
_SIGNING_KEYS_REFRESH_S = 60.0
# While the net schema is missing, look for it this often (the install also NOTIFYs).
SCHEMA_WAIT_CHECK_S = 0.5


def lease_owner(hostname: str, run_id: str, pid: int) -> str:
    """Name a worker process in the lease columns; the supervisor can name a dead child too."""
    return f"{hostname}:{run_id}:{pid}"


class Worker:
    """Claim requests, send them through curl, write responses back; until told to stop."""

    def __init__(self, settings: Settings, index: int = 1, run_id: str | None = None, database: str = "default"):
        self.settings = settings
        self.index = index
        # Metrics carry the database's label: one serve may serve several databases.
        self.metrics = metrics.DatabaseMetrics(database)
        self.application_name = f"pgnet-curl worker {index}"
        # Unique per process: a lease held by a dead process can never be mistaken for ours.
        self.owner = lease_owner(socket.gethostname(), run_id or secrets.token_hex(4), os.getpid())
        # fd -> what it is (_CURL, _DB, _SIGNAL); epoll directly: selectors costs more per call,
        # and libcurl adds and removes a socket for every request on a kept-alive connection.
        self._fds: dict[int, str] = {}
        self._poller = select.epoll() if hasattr(select, "epoll") else select.poll()
        self._poll_uses_ms = not hasattr(select, "epoll")
        self.driver = CurlDriver(self._watch_curl_fd, max_redirects=settings.max_redirects,
                                 max_host_connections=settings.max_host_connections,
                                 max_response_bytes=settings.max_response_bytes,
                                 ca_file=settings.ca_file, ca_path=settings.ca_path,
                                 client_cert=settings.client_cert, client_key=settings.client_key,
                                 proxy=settings.proxy,
                                 destination_policy=DestinationPolicy(
                                     settings.deny_cidrs, settings.allow_cidrs, settings.deny_private))
        self.conn: psycopg.Connection | None = None
        self._db_fd = -1
        self.queue: Queue | None = None
        # The queue table's oid while the schema is there; None while waiting for it. A new oid
        # means a drop and reinstall: the requests in flight belong to a table that is gone.
        self._queue_oid: int | None = None
        self._reconnect_at_s = 0.0
        self._reconnect_delay_s = RECONNECT_MIN_S
        self.pending: list[Response] = []
        self._quiet = True
        self._oldest_pending_s = 0.0
        self.want_claim = True
        self._reload_requested = False
        self._reload_keys_requested = False
        # Monotonic times at which retries this worker put back become due, and hosts its
        # claims found held back by a rate limit get tokens again (a heap): claim again then.
        self._retries_due_s: list[float] = []
        # Whether net.destination_limits has rows (claim with claim_limited then), and whether
        # any caps concurrency (then a write-back may free a slot: claim again after it).
        self._limits_active = self._concurrency_limited = False
        self._reload_limits_requested = False
        self._limits_written_oid: int | None = None
        self._restart_requested = False
        self._backend_pid = 0
        self._next_help_s = 0.0
        self.stopping = False
        self._stop_requested_s = 0.0
        self._drain_deadline_s = 0.0
        now = time.monotonic()
        self._next_poll_s = now + settings.poll_interval_s
        self._next_check_s = now + settings.settings_refresh_s
        self._next_ttl_sweep_s = now
        self.tally = metrics.Tally(self.metrics)
        self._next_metrics_flush_s = 0.0
        self.stats = {"claimed": 0, "written": 0, "lease_lost": 0, "reclaimed": 0, "reconnects": 0, "retries": 0}
        # (key_id, secret, expiry epoch or None) of the signing keys, read at connect and on change.
        self._signing_keys: list[tuple[str, bytes, float | None]] = []
        self._next_keys_reread_s = 0.0
        self._next_keys_s = 0.0
        # The outdated schema version last reported, so that it is reported once.
        self._outdated_seen: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT and a drain; return the process exit code."""
        self._install_signal_handlers()
        self._connect()
        log.info("worker %d started (pid %d, max_inflight=%d, batch_size=%d, ttl=%s)", self.index, os.getpid(),
                 self.settings.max_inflight, self.settings.batch_size, self.settings.ttl)
        try:
            while not self._finished():
                self._step()
        finally:
            self._shutdown()
        return 0

    def request_stop(self) -> None:
        """Stop claiming; finish what is in flight until the drain deadline."""
        if self.stopping:
            # A terminal's Ctrl-C or systemd signals the whole process group and the supervisor
            # forwards the same stop: only a stop repeated later means "give up on the drain".
            if time.monotonic() - self._stop_requested_s > _REPEATED_STOP_AFTER_S:
                self._drain_deadline_s = 0.0
            return
        self._stop_requested_s = time.monotonic()
        log.info("worker %d draining: %d in flight, %d responses to write", self.index,
                 self.driver.inflight, len(self.pending))
        self.stopping = True
        self._drain_deadline_s = time.monotonic() + self.settings.drain_timeout_s

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        if self.driver.inflight == 0 and not self.pending:
            return True
        return time.monotonic() >= self._drain_deadline_s

    def _shutdown(self) -> None:
        unfinished = self.driver.abort_all()
        if self.conn is not None and self.serving:
            try:
                if self.pending:
                    self._flush(everything=True)
                released = self.queue.release([request.id for request in unfinished])
                if unfinished:
                    log.warning("worker %d released %d unfinished requests to the queue", self.index, released)
            except PgnetCurlError as exc:
                log.warning("worker %d could not hand back its work (%s); leases will expire", self.index, exc)
        if self.pending:
            log.warning("worker %d exits with %d unwritten responses; their requests will be sent again "
                        "after their leases expire", self.index, len(self.pending))
        self.driver.close()
        self._disconnect()
        self._publish_metrics(time.monotonic())
        log.info("worker %d stopped: %s", self.index, self.stats)

    def _install_signal_handlers(self) -> None:
        self._signal_r, self._signal_w = socket.socketpair()
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        self._watch(self._signal_r.fileno(), select.POLLIN, _SIGNAL)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._request_reload())
        # The supervisor forks us with these blocked, so none is lost before this point.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    def _request_reload(self) -> None:
        self._reload_requested = True

    # ---- the loop --------------------------------------------------------------------------

    def _step(self) -> None:
        timeout_s = self._select_timeout_s()
        ready = self._poller.poll(timeout_s * 1000 if self._poll_uses_ms else timeout_s)
        # A quiet loop (at most one socket ready) writes responses at once; a busy one batches.
        self._quiet = len(ready) <= 1
        for fd, mask in ready:
            kind = self._fds.get(fd)
            if kind is _CURL:
                self.driver.socket_event(fd, bool(mask & _READABLE), bool(mask & _WRITABLE))
            elif kind is _DB:
                self._on_db_readable()
            elif kind is _SIGNAL:
                self._drain_signal_socket()
        now = time.monotonic()
        if self.driver.timer_deadline_s is not None and now >= self.driver.timer_deadline_s:
            self.driver.timer_event()
        finished = self.driver.take_finished()
        if finished:
            if not self.pending:
                self._oldest_pending_s = now
            self._plan_retries(finished)
            self.pending.extend(finished)
            self._count_finished(finished)
            if log.isEnabledFor(logging.DEBUG):
                self._log_finished(finished)
        if self.conn is None:
            if now >= self._reconnect_at_s:
                self._connect()
            return
        if self.tally.pending and now >= self._next_metrics_flush_s:
            self._publish_metrics(now)
        if not self.serving:
            self._periodic(now)
            return
        # Each step may lose the connection; the next ones then wait for the reconnect.
        for step in (self._maybe_flush, self._periodic, self._maybe_claim):
            if self.conn is None:
                return
            step(now)

    def _count_finished(self, finished: list[Response]) -> None:
        for response in finished:
            self.tally.finished(response.request.method, response.status_code, response.timed_out,
                                response.duration_s)

    def _log_finished(self, finished: list[Response]) -> None:
        for response in finished:
            request = response.request
            log.debug("worker %d: request %d %s %s -> %s", self.index, request.id, request.method,
                      safe_url(request.url), response.status_code or response.error_msg)

    def _publish_metrics(self, now: float) -> None:
        self.tally.flush()
        self.metrics.inflight_requests.set(self.driver.inflight)
        self._next_metrics_flush_s = now + METRICS_FLUSH_INTERVAL_S

    def _select_timeout_s(self) -> float:
        now = time.monotonic()
        deadlines = [self._next_poll_s]
        if self.driver.timer_deadline_s is not None:
            deadlines.append(self.driver.timer_deadline_s)
        if self.pending:
            deadlines.append(self._oldest_pending_s + self.settings.flush_interval_ms / 1000)
        if self.tally.pending:
            deadlines.append(self._next_metrics_flush_s)
        if self.conn is None:
            deadlines.append(self._reconnect_at_s)
        else:
            deadlines.append(self._next_check_s)
            if self.serving:
                deadlines.append(self._next_ttl_sweep_s)
        if self.stopping:
            deadlines.append(self._drain_deadline_s)
        if self._retries_due_s:
            deadlines.append(self._retries_due_s[0])
        claimable = self.conn is not None and self.serving and self.want_claim and not self.stopping
        if claimable and self._free_slots() >= self._min_claim():
            deadlines.append(now)
        return max(0.0, min(deadlines) - now)

    def _drain_signal_socket(self) -> None:
        try:
            while self._signal_r.recv(512):
                pass
        except BlockingIOError:
            pass

    # ---- curl side -------------------------------------------------------------------------

    def _watch_curl_fd(self, fd: int, what: int) -> None:
        """Mirror libcurl's interest in a socket into the poller."""
        if what == pycurl.POLL_REMOVE:
            if self._fds.get(fd) is _CURL:
                self._unwatch(fd)
            return
        self._watch(fd, _POLL_TO_EVENTS[what], _CURL)

    def _watch(self, fd: int, events: int, kind: str) -> None:
        if fd in self._fds:
            try:
                self._poller.modify(fd, events)
                self._fds[fd] = kind
                return
            except OSError:
                # The fd number was closed and reused unannounced: register it afresh.
                self._unwatch(fd)
        self._poller.register(fd, events)
        self._fds[fd] = kind

    def _unwatch(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass

    def _free_slots(self) -> int:
        return self.settings.max_inflight - self.driver.inflight

    def _min_claim(self) -> int:
        """Slots to wait for before claiming again while busy: no claim query per finished request."""
        if self.driver.inflight == 0:
            return 1
        return max(1, min(self.settings.batch_size, self.settings.max_inflight) // 4)

    def _maybe_claim(self, now: float) -> None:
        if not self.want_claim:
            return
        if self.stopping:
            # Woken while draining: pass the work on to whoever still serves.
            self.want_claim = False
            self._ask_for_help(now)
            return
        if self._free_slots() < self._min_claim():
            # Work is waiting and we are full: let the other workers take it.
            self._ask_for_help(now)
            return
        limit = min(self.settings.batch_size, self._free_slots())
        try:
            requests = self.queue.claim(limit, self.settings.lease_grace_s, limited=self._limits_active)
            if self._limits_active and len(requests) < limit:
                due_s = self.queue.limits_due_s()
                if due_s is not None:
                    heapq.heappush(self._retries_due_s, time.monotonic() + due_s)
        except PgnetCurlError as exc:
            self._on_db_error(exc)
            return
        if requests and requests[0].queue_oid != self._queue_oid:
            # Claimed from a reinstalled schema before its check or NOTIFY was seen: what is in
            # flight now belongs to the dropped tables; these requests do not.
            self._adopt_schema(requests[0].queue_oid)
        now_epoch_s = time.time()
        for request in requests:
            if request.attempts > 1:
                self.stats["reclaimed"] += 1
                self.metrics.lease_reclaims_total.inc()
            self.tally.claimed(max(0.0, now_epoch_s - request.created_epoch_s))
            if request.attempts > self.settings.max_attempts:
                self._give_up(request)
            elif self._sign(request):
                self.driver.add(request)
        self.stats["claimed"] += len(requests)
        # A full batch means more are probably waiting: claim again as slots free up. A busy
        # worker wakes the others to share the load.
        self.want_claim = len(requests) == limit
        if self.want_claim or self.driver.inflight >= self.settings.max_inflight // 2:
            self._ask_for_help(now)

    def _ask_for_help(self, now: float) -> None:
        """Wake every worker of this database (at most every _HELP_INTERVAL_S)."""
        if now < self._next_help_s:
            return
        self._next_help_s = now + _HELP_INTERVAL_S
        try:
            self.queue.ask_for_help()
        except PgnetCurlError as exc:
            self._on_db_error(exc)

    def _give_up(self, request: Request) -> None:
        """Answer a request whose workers kept dying with an error row instead of sending it again."""
        log.warning("worker %d: request %d was claimed %d times without an answer; storing an error row",
                    self.index, request.id, request.attempts)
        self._answer(request, f"gave up after {request.attempts - 1} attempts: the worker sending it stopped each time")

    def _answer(self, request: Request, error_msg: str) -> None:
        """Store an error row for a request that will not be sent."""
        if not self.pending:
            self._oldest_pending_s = time.monotonic()
        self.pending.append(Response(request.id, request=request, error_msg=error_msg))

    # ---- delivery: signing and retries -----------------------------------------------------

    def _sign(self, request: Request) -> bool:
        """Add Standard Webhooks headers to a request that asks for them; False if it can't be sent."""
        if request.idempotency_key is None and request.signing_key_id is None:
            return True
        secrets_now = []
        if request.signing_key_id is not None:
            secrets_now = self._active_secrets(request.signing_key_id)
            if not secrets_now and self.queue is not None and time.monotonic() >= self._next_keys_reread_s:
                # A key made just before the request may not have reached us yet (its NOTIFY can
                # arrive after the claim): read the keys again, at most once a second.
                self._next_keys_reread_s = time.monotonic() + 1.0
                try:
                    self._signing_keys = self.queue.signing_keys()
                except PgnetCurlError as exc:
                    # Not sent now; its lease expires and it is claimed again.
                    self._on_db_error(exc)
                    return False
                secrets_now = self._active_secrets(request.signing_key_id)
            if not secrets_now:
                self._answer(request, f"not sent: signing key {request.signing_key_id!r} has no key that has not expired "
                                      f"(net.rotate_signing_key makes one)")
                return False
        msg_id = request.idempotency_key or f"msg_{request.id}"
        request.headers = {**request.headers, **signing.headers(msg_id, int(time.time()), request.body, secrets_now)}
        return True

    def _active_secrets(self, key_id: str) -> list[bytes]:
        now_epoch_s = time.time()
        return [secret for kid, secret, expires in self._signing_keys
                if kid == key_id and (expires is None or expires > now_epoch_s)]

    def _plan_retries(self, finished: list[Response]) -> None:
        """Mark the transient failures that have retries left: they go back to the queue."""
        defaults = self.settings
        for response in finished:
            request = response.request
            max_retries = defaults.max_retries if request.max_retries is None else request.max_retries
            if request.retries >= max_retries:
                continue
            if not retry.is_transient(response.status_code, response.curl_code, response.timed_out):
                continue
            retry_after = None
            if response.headers and response.status_code in (429, 503):
                retry_after = next((value for name, value in response.headers.items() if name.lower() == "retry-after"), None)
            response.retry_in_ms = retry.next_delay_ms(
                request.retries, max_retries, request.retry_backoff_ms or defaults.retry_backoff_ms,
                defaults.retry_backoff_cap_ms, retry_after, time.time())
            if response.retry_in_ms is not None:
                self.stats["retries"] += 1
                self.metrics.retries_scheduled_total.inc()

    # ---- write-back ------------------------------------------------------------------------

    def _maybe_flush(self, now: float) -> None:
        if not self.pending:
            return
        if (len(self.pending) >= self.settings.write_batch_size or self.driver.inflight == 0 or self._quiet
                or now - self._oldest_pending_s >= self.settings.flush_interval_ms / 1000):
            try:
                self._flush(everything=False)
            except PgnetCurlError as exc:
                self._on_db_error(exc)

    def _flush(self, everything: bool) -> None:
        """Write pending responses in batches of write_batch_size (all of them if everything)."""
        while self.pending:
            batch = self.pending[: self.settings.write_batch_size]
            started_s = time.monotonic()
            written = self._write(batch)
            del self.pending[: len(batch)]
            self._count_written(batch, written, time.monotonic() - started_s)
            self._oldest_pending_s = time.monotonic()
            if not everything and len(self.pending) < self.settings.write_batch_size:
                break

    def _count_written(self, batch: list[Response], written: int, duration_s: float) -> None:
        self.stats["written"] += written
        if self._concurrency_limited and written:
            # A finished request may free a host's concurrency that held rows back.
            self.want_claim = True
        self.stats["lease_lost"] += len(batch) - written
        self.metrics.write_batch_duration_seconds.observe(duration_s)
        self.metrics.write_batch_size.observe(len(batch))
        if len(batch) > written:
            self.metrics.lease_lost_total.inc(len(batch) - written)
        now_epoch_s, now = time.time(), time.monotonic()
        for response in batch:
            if response.retry_in_ms is None:
                self.tally.written(max(0.0, now_epoch_s - response.request.created_epoch_s))
            else:
                # Claim again when it is due (its not_before was set by the database before
                # now), not at the next safety poll.
                heapq.heappush(self._retries_due_s, now + response.retry_in_ms / 1000)

    def _write(self, batch: list[Response]) -> int:
        """Write a batch; if the database refuses it, write row by row so one bad row loses nothing."""
        try:
            return self.queue.write(batch, self.settings.notify_channel)
        except (DatabaseUnavailable, SchemaError):
            raise
        except PgnetCurlError as exc:
            if len(batch) == 1:
                return self._write_unstorable(batch[0], exc)
            log.warning("worker %d: a write-back batch was refused (%s); writing row by row", self.index, exc)
            return sum(self._write(row_batch) for row_batch in ([row] for row in batch))

    def _write_unstorable(self, response: Response, exc: Exception) -> int:
        """Store an error row for a response the database would not take as it was."""
        replacement = Response(response.id, status_code=response.status_code,
                               content_type=response.content_type,
                               error_msg=f"the response could not be stored: {exc}", request=response.request)
        return self.queue.write([replacement])

    # ---- database side ---------------------------------------------------------------------

    def _on_db_readable(self) -> None:
        try:
            self.conn.pgconn.consume_input()
        except psycopg.OperationalError as exc:
            self._on_db_error(DatabaseUnavailable(f"connection lost: {db_error_text(exc)}"))
            return
        pgconn = self.conn.pgconn
        while notify := pgconn.notifies():
            pgconn.notify_handler(notify)
        if self.conn.broken or pgconn.status != psycopg.pq.ConnStatus.OK:
            self._on_db_error(DatabaseUnavailable("connection lost"))

    def _on_notify(self, notify: psycopg.Notify) -> None:
        if notify.channel == db.WAKE_CHANNEL:
            if notify.pid == self._backend_pid:
                return  # our own call for help
            # A committed request wakes one worker of the N, chosen by the sender's backend pid,
            # so the others run no claim that finds nothing. A worker with more than it can take
            # sends 'help', and every worker claims; the safety poll covers a designated worker
            # that is down.
            workers = self.settings.workers
            if notify.payload == "help" or workers == 1 or notify.pid % workers == self.index - 1:
                self.want_claim = True
        elif notify.channel == db.CONTROL_CHANNEL and notify.payload == "restart":
            self._restart_requested = True
        elif notify.channel == db.CONTROL_CHANNEL and notify.payload == "signing_keys":
            self._reload_keys_requested = True
        elif notify.channel == db.CONTROL_CHANNEL and notify.payload == "installed":
            self._next_check_s = 0.0
        elif notify.channel == db.CONTROL_CHANNEL and notify.payload == "destination_limits":
            self._reload_limits_requested = True

    def _connect(self) -> None:
        try:
            conn = db.connect(self.settings.dsn, self.application_name, listen=True)
        except PgnetCurlError as exc:
            self._schedule_reconnect(exc)
            return
        queue = Queue(conn, self.owner)
        try:
            checked_oid, batch_size, ttl = queue.check()
            self.settings = self.settings.with_database_values(batch_size, ttl)
            try:
                queue_oid = self._usable(checked_oid, conn)
                if queue_oid is not None:
                    self._signing_keys = queue.signing_keys()
                    self._limits_active, self._concurrency_limited = queue.limits_active()
            except SchemaError:
                # Dropped between the check and these reads: connected, waiting for it.
                queue_oid = None
        except PgnetCurlError as exc:
            conn.close()
            self._schedule_reconnect(exc)
            return
        conn.add_notify_handler(self._on_notify)
        self.conn, self.queue = conn, queue
        self._backend_pid = conn.info.backend_pid
        self._db_fd = conn.fileno()
        self._watch(self._db_fd, select.POLLIN, _DB)
        self.metrics.worker_db_connected.set(1)
        if self._reconnect_delay_s > RECONNECT_MIN_S or self.stats["reconnects"]:
            log.info("worker %d reconnected to the database", self.index)
        self._reconnect_delay_s = RECONNECT_MIN_S
        self.want_claim = True
        # Responses finished while we were away are written now (those whose lease held).
        self._oldest_pending_s = 0.0
        self._next_check_s = time.monotonic() + self._check_interval_s()
        if checked_oid is not None and queue_oid is None and self._queue_oid is None and self._outdated_seen is None:
            # Dropped after the check saw it, before this worker served it: told as a drop while
            # serving is (_adopt_schema tells it when a served schema is gone).
            (log.info if self.index == 1 else log.debug)("%s (the schema was dropped)", schema.WAITING_FOR_SCHEMA)
        self._adopt_schema(queue_oid, fresh_session=True)
        self._write_flag_limits()

    def _write_flag_limits(self) -> None:
        """Worker 1 writes serve's --destination-limit rows into each schema it serves (a
        reinstall drops them); their NOTIFY tells every worker of the database."""
        if not (self.serving and self.index == 1 and self.settings.destination_limits
                and self._limits_written_oid != self._queue_oid):
            return
        try:
            self.queue.set_destination_limits(self.settings.destination_limits)
        except PgnetCurlError as exc:
            log.warning("worker %d could not write the --destination-limit rows (%s)", self.index, exc)
            return
        self._limits_written_oid = self._queue_oid
        log.info("destination limits set: %s", ", ".join(
            limit.host_pattern for limit in self.settings.destination_limits))

    def _schedule_reconnect(self, exc: PgnetCurlError) -> None:
        delay_s = self._reconnect_delay_s * random.uniform(0.8, 1.2)
        log.warning("worker %d: %s; retrying in %.1f s", self.index, exc, delay_s)
        self._reconnect_at_s = time.monotonic() + delay_s
        self._reconnect_delay_s = min(self._reconnect_delay_s * 2, RECONNECT_MAX_S)

    def _on_db_error(self, exc: PgnetCurlError) -> None:
        """Drop the connection and reconnect later; in-flight transfers carry on meanwhile.

        An error from a dropped or reinstalled schema (a missing table, "cached plan must not
        change result type") is no connection problem: when the check agrees, follow the schema.
        """
        if not isinstance(exc, DatabaseUnavailable) and self.conn is not None and self.serving:
            try:
                queue_oid = self._check()
                if queue_oid != self._queue_oid:
                    self._adopt_schema(queue_oid)
                    return
            except PgnetCurlError as check_exc:
                exc = check_exc
        self.stats["reconnects"] += 1
        self.metrics.db_reconnects_total.inc()
        self._disconnect()
        self._schedule_reconnect(exc)

    def _disconnect(self) -> None:
        if self.conn is None:
            return
        # By fd number: a broken connection cannot tell its fileno() any more.
        self._unwatch(self._db_fd)
        try:
            self.conn.close()
        except psycopg.Error:
            pass
        self.conn = self.queue = None
        self.metrics.worker_db_connected.set(0)
        self.metrics.worker_waiting_for_schema.set(0)

    @property
    def serving(self) -> bool:
        """Connected with the net schema there (not waiting for an install)."""
        return self._queue_oid is not None

    def _check_interval_s(self) -> float:
        if self.serving:
            return self.settings.settings_refresh_s
        return min(self.settings.settings_refresh_s, SCHEMA_WAIT_CHECK_S)

    def _check(self) -> int | None:
        """Re-read pg_net's settings; return the queue table's oid (None: no schema)."""
        queue_oid, batch_size, ttl = self.queue.check()
        before = self.settings
        self.settings = self.settings.with_database_values(batch_size, ttl)
        if self._reload_requested or self.settings != before:
            log.info("worker %d settings: batch_size=%d ttl=%s", self.index, self.settings.batch_size,
                     self.settings.ttl)
            self.want_claim = True
        self._reload_requested = False
        return self._usable(queue_oid, self.conn)

    def _usable(self, queue_oid: int | None, conn: psycopg.Connection) -> int | None:
        """queue_oid if the schema there is the version this worker needs, else None (wait).

        The version is read only when the schema is new to us: not on every check.
        """
        if queue_oid is None or (queue_oid == self._queue_oid and self.serving):
            return queue_oid
        try:
            installed = schema.installed_version(conn)
        except SchemaError:
            return None  # dropped again since the check: wait for the next install
        if installed is not None and installed >= _SCHEMA_VERSION:
            self._outdated_seen = None
            return queue_oid
        if installed != self._outdated_seen:
            self._outdated_seen = installed
            log.warning("worker %d: the net schema is version %s and this pgnet-curl needs version %d: "
                        "run pgnet-curl install; waiting", self.index, installed, _SCHEMA_VERSION)
        return None

    def _adopt_schema(self, queue_oid: int | None, fresh_session: bool = False) -> None:
        """Follow the schema appearing, disappearing, or being dropped and installed again."""
        changed = queue_oid != self._queue_oid
        self._queue_oid, was = queue_oid, self._queue_oid
        self.metrics.worker_waiting_for_schema.set(0 if self.serving else 1)
        if not changed:
            return
        # Only worker 1 tells: one line per change, not one per worker.
        say = log.info if self.index == 1 else log.debug
        if was is not None:
            lost = len(self.driver.abort_all()) + len(self.pending)
            self.pending.clear()
            if lost:
                log.warning("worker %d: the net schema was dropped with %d requests in flight or unwritten; "
                            "they are gone with it", self.index, lost)
        if queue_oid is None:
            say("%s (the schema was dropped)", schema.WAITING_FOR_SCHEMA)
        else:
            say("net schema %s: serving", "found" if was is None else "installed again")
        self.want_claim = self.serving
        self._next_check_s = time.monotonic() + self._check_interval_s()
        if self.serving and not fresh_session:
            # This session's prepared statements return the dropped schema's types ("cached
            # plan must not change result type"): a new session starts clean, as pg_net's does.
            self._disconnect()
            self._connect()

    # ---- housekeeping ----------------------------------------------------------------------

    def _periodic(self, now: float) -> None:
        if self._restart_requested:
            self._restart_session()
            if self.conn is None:
                return
        if self._retries_due_s and now >= self._retries_due_s[0]:
            while self._retries_due_s and now >= self._retries_due_s[0]:
                heapq.heappop(self._retries_due_s)
            self.want_claim = True
        try:
            if self._reload_requested or now >= self._next_check_s:
                self._adopt_schema(self._check())
                self._next_check_s = now + self._check_interval_s()
            # A reinstall renews the session, which may fail: then the reconnect takes over.
            if self.conn is None or not self.serving:
                return
            if now >= self._next_poll_s:
                self.want_claim = True
                self._next_poll_s = now + self.settings.poll_interval_s
                if self.index == 1:
                    self._sample_queue()
            if self._reload_keys_requested or now >= self._next_keys_s:
                # Also a safety net under the NOTIFYs of key and limit changes.
                self._reload_limits_requested = True
                self._reload_keys_requested = False
                self._next_keys_s = now + _SIGNING_KEYS_REFRESH_S
                self._signing_keys = self.queue.signing_keys()
            if self._reload_limits_requested:
                self._reload_limits_requested = False
                self._limits_active, self._concurrency_limited = self.queue.limits_active()
                self.want_claim = True
            if now >= self._next_ttl_sweep_s:
                self._sweep_expired()
                self._next_ttl_sweep_s = now + self.settings.ttl_sweep_interval_s
        except PgnetCurlError as exc:
            self._on_db_error(exc)

    def _restart_session(self) -> None:
        """net.worker_restart(): a new database session, so every pg_net.* setting applies anew.

        In-flight transfers carry on; finished responses are written first.
        """
        self._restart_requested = False
        log.info("worker %d restarting its database session (net.worker_restart)", self.index)
        try:
            self._flush(everything=True)
        except PgnetCurlError as exc:
            self._on_db_error(exc)
            return
        self._disconnect()
        self._connect()
        if self.conn is not None:
            log.info("worker %d settings: batch_size=%d ttl=%s", self.index, self.settings.batch_size,
                     self.settings.ttl)

    def _sample_queue(self) -> None:
        """Queue depth and oldest pending age, sampled at the poll by one worker (not per request)."""
        depth, oldest_age_s = self.queue.sample()
        self.metrics.queue_depth.set(depth)
        self.metrics.queue_oldest_pending_seconds.set(oldest_age_s or 0.0)

    def _sweep_expired(self) -> None:
        ttl_s = self.settings.ttl.total_seconds()
        for _ in range(_TTL_SWEEP_MAX_STATEMENTS):
            deleted = self.queue.delete_expired(ttl_s, self.settings.ttl_sweep_rows)
            self.metrics.responses_expired_total.inc(deleted)
            if deleted < self.settings.ttl_sweep_rows:
                break
        for _ in range(_TTL_SWEEP_MAX_STATEMENTS):
            if self.queue.delete_expired_archive(ttl_s, self.settings.ttl_sweep_rows) < self.settings.ttl_sweep_rows:
                break
        if self._limits_active:
            self.queue.delete_idle_buckets()
