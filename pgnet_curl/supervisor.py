"""The supervisor: fork N worker processes, restart the ones that die, drain on SIGTERM."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass

from prometheus_client import multiprocess

from . import db, metrics, ops_server, schema
from .errors import DatabaseUnavailable, PgnetCurlError
from .queue import Queue
from .settings import Settings

log = logging.getLogger("pgnet_curl.supervisor")

_HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESTART_MIN_S, RESTART_MAX_S = 0.5, 30.0
# A worker that lived this long is healthy again: its restart backoff starts over.
HEALTHY_AFTER_S = 30.0
# After the drain deadline, workers get this much longer before SIGKILL.
KILL_MARGIN_S = 5.0
# /healthz names each database's durability (schema.persistence): read at start, then again in
# the background when the last read is older than this (the second while one is unknown: no
# schema yet, or unreachable), so a health check never waits on it.
DURABILITY_REFRESH_S, DURABILITY_UNKNOWN_REFRESH_S = 30.0, 1.0


@dataclass
class _Slot:
    """One worker position: its database, the process filling it now and its restart history."""

    index: int
    database: str
    settings: Settings
    pid: int | None = None
    started_s: float = 0.0
    failures: int = 0
    restart_at_s: float = 0.0


class Supervisor:
    """Keep settings.workers worker processes running for each database until told to stop.

    databases maps a label (for metrics and logs) to that database's settings; every database
    gets its own workers, connections and settings, so one that is down or lacks the schema
    holds back no other.
    """

    def __init__(self, databases: dict[str, Settings], metrics_host: str = "0.0.0.0",
                 metrics_port: int | None = None):
        self.databases = databases
        # Shared by all: the process-wide settings (drain timeout, worker count) are the same.
        self.settings = next(iter(databases.values()))
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self._ops_server = None
        self.slots = [_Slot(index, label, settings)
                      for label, settings in databases.items() for index in range(1, settings.workers + 1)]
        self._alive_gauges = {label: metrics.workers_alive.labels(database=label) for label in databases}
        self.stopping = False
        self._kill_at_s = 0.0
        # Workers' lease owner names are hostname:run_id:pid, so a dead child's leases can be named.
        self.run_id = secrets.token_hex(4)
        self.restarts = 0
        self._durability: dict[str, str | None] = {label: None for label in databases}
        self._durability_read_s = 0.0
        self._durability_reading = False
        self._durability_lock = threading.Lock()

    def check_database(self) -> dict[str, int | None]:
        """Fail fast on a bad DSN when serving one database; return {label: schema version}.

        Without a schema the workers start anyway and wait for it, as pg_net's worker runs
        before `create extension`. Of several databases, one that cannot be reached now is
        served when it can be (its workers reconnect with backoff).
        """
        versions = {}
        for label, settings in self.databases.items():
            try:
                conn = db.connect(settings.dsn, "pgnet-curl supervisor")
            except PgnetCurlError as exc:
                if len(self.databases) == 1:
                    raise
                log.warning("database %s: %s; serving the others meanwhile", label, exc)
                versions[label] = None
                continue
            unreadable = ""
            try:
                versions[label] = schema.installed_version(conn)
                if versions[label] is not None:
                    with db.database_errors("reading the net tables' persistence"):
                        self._durability[label] = schema.persistence(conn)
            except DatabaseUnavailable:
                raise
            except PgnetCurlError as exc:
                # A schema net this role may not read (an empty one, another extension's) is
                # not ours: the workers wait for `pgnet-curl install` as without one.
                versions[label] = None
                unreadable = f" (schema net here is not one this role can read: {exc})"
            finally:
                conn.close()
            if versions[label] is None:
                log.warning("database %s: %s%s", label, schema.WAITING_FOR_SCHEMA, unreadable)
            else:
                mode = self._durability[label]
                log.log(logging.INFO if mode == "durable" else logging.WARNING, "database %s is %s: %s",
                        label, mode, schema.DURABILITY.get(mode, "unknown"))
        self._durability_read_s = time.monotonic()
        return versions

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT and every worker has exited; return the exit code."""
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        try:
            if self.metrics_port is not None:
                # Started with the signals blocked, so they all reach sigtimedwait below.
                self._ops_server = ops_server.start(self.metrics_host, self.metrics_port, self.health)
            for slot in self.slots:
                self._spawn(slot)
            log.info("serving %d database(s) with %d workers (max_inflight=%d each)", len(self.databases),
                     len(self.slots), self.settings.max_inflight)
            while not (self.stopping and not self._alive()):
                received = signal.sigtimedwait(_HANDLED_SIGNALS, self._wait_timeout_s())
                if received is not None:
                    self._on_signal(received.si_signo)
                self._reap()
                self._restart_due()
                if self.stopping and time.monotonic() >= self._kill_at_s:
                    self._signal_workers(signal.SIGKILL)
        finally:
            if self._ops_server is not None:
                self._ops_server.shutdown()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED_SIGNALS)
        log.info("all workers stopped")
        return 0

    def health(self) -> tuple[bool, dict]:
        """Healthy when every worker runs and holds its database connection."""
        alive = len(self._alive())
        connected = ops_server.gauge_sum("pgnet_curl_worker_db_connected")
        waiting = ops_server.gauge_sum("pgnet_curl_worker_waiting_for_schema")
        details = {"workers": len(self.slots), "alive": alive, "connected": connected,
                   "durability": self._durability_now()}
        if waiting:
            details["waiting_for_schema"] = waiting
        if self.stopping:
            return False, {**details, "reason": "shutting down"}
        if alive < len(self.slots):
            return False, {**details, "reason": f"{alive} of {len(self.slots)} workers running"}
        refused = ops_server.gauge_sum("pgnet_curl_worker_writes_refused")
        if refused:
            unwritten = ops_server.gauge_sum("pgnet_curl_unwritten_responses")
            return False, {**details, "unwritten_responses": unwritten,
                           "reason": f"the database refuses writes: {unwritten} responses kept in memory, retrying"}
        if connected < alive:
            return False, {**details, "reason": f"{connected} of {alive} workers connected to the database"}
        if waiting:
            return False, {**details, "reason": schema.WAITING_FOR_SCHEMA}
        return True, details

    def _durability_now(self) -> dict[str, str | None]:
        """Each database's persistence as last read (None: unknown or no schema); start a new read
        in the background when that one is stale."""
        refresh_s = DURABILITY_UNKNOWN_REFRESH_S if None in self._durability.values() else DURABILITY_REFRESH_S
        with self._durability_lock:
            stale = not self._durability_reading and time.monotonic() - self._durability_read_s >= refresh_s
            self._durability_reading |= stale
        if stale:
            threading.Thread(target=self._read_durability, name="durability", daemon=True).start()
        return dict(self._durability)

    def _read_durability(self) -> None:
        try:
            for label, settings in self.databases.items():
                try:
                    conn = db.connect(settings.dsn, "pgnet-curl supervisor")
                    try:
                        with db.database_errors("reading the net tables' persistence"):
                            self._durability[label] = schema.persistence(conn)
                    finally:
                        conn.close()
                except PgnetCurlError as exc:
                    log.debug("database %s: could not read its durability (%s); keeping the last known", label, exc)
        finally:
            with self._durability_lock:
                self._durability_reading = False
                self._durability_read_s = time.monotonic()

    def _alive(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid is not None]

    def _wait_timeout_s(self) -> float:
        now = time.monotonic()
        deadlines = [now + 1.0]
        deadlines += [slot.restart_at_s for slot in self.slots if slot.pid is None and not self.stopping]
        if self.stopping:
            deadlines.append(self._kill_at_s)
        return max(0.01, min(deadlines) - now)

    def _on_signal(self, signo: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                log.warning("second stop signal: ending the drain now")
            else:
                log.info("stop requested: draining workers (up to %.0f s)", self.settings.drain_timeout_s)
                self.stopping = True
                self._kill_at_s = time.monotonic() + self.settings.drain_timeout_s + KILL_MARGIN_S
            self._signal_workers(signal.SIGTERM)
        elif signo == signal.SIGHUP:
            log.info("SIGHUP: workers re-read their settings")
            self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, signo: int) -> None:
        for slot in self._alive():
            try:
                os.kill(slot.pid, signo)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    self._on_exit(slot, status)

    def _on_exit(self, slot: _Slot, status: int) -> None:
        pid = slot.pid
        multiprocess.mark_process_dead(pid)
        slot.pid = None
        self._count_alive(slot.database)
        if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) != 0:
            self._release_leases_of(slot, pid)
        if self.stopping:
            return
        lived_s = time.monotonic() - slot.started_s
        slot.failures = 1 if lived_s >= HEALTHY_AFTER_S else slot.failures + 1
        delay_s = min(RESTART_MIN_S * 2 ** (slot.failures - 1), RESTART_MAX_S)
        slot.restart_at_s = time.monotonic() + delay_s
        if os.WIFSIGNALED(status):
            how = f"was killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exited with code {os.waitstatus_to_exitcode(status)}"
        log.warning("worker %d of database %s %s after %.1f s; restarting in %.1f s", slot.index, slot.database,
                    how, lived_s, delay_s)

    def _count_alive(self, database: str) -> None:
        self._alive_gauges[database].set(sum(1 for slot in self._alive() if slot.database == database))

    def _release_leases_of(self, slot: _Slot, pid: int) -> None:
        """Hand a dead worker's claimed requests back now instead of at lease expiry, and wake the
        other workers for them."""
        from .worker import lease_owner

        owner = lease_owner(socket.gethostname(), self.run_id, pid)
        try:
            conn = db.connect(slot.settings.dsn, "pgnet-curl supervisor")
            try:
                queue = Queue(conn, owner)
                released = queue.release_all()
                # Unleased rows look new, and new rows wait for a wake; so do the rows whose wake
                # went to the dead worker (one is chosen per commit): wake every other one.
                queue.ask_for_help()
            finally:
                conn.close()
        except PgnetCurlError as exc:
            log.warning("could not release the requests of worker pid %d (%s); their leases will expire", pid, exc)
            return
        if released:
            log.info("released %d requests claimed by dead worker pid %d", released, pid)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None and now >= slot.restart_at_s:
                self.restarts += 1
                metrics.worker_restarts_total.labels(database=slot.database).inc()
                self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(_worker_main(slot.settings, slot.index, self.run_id, slot.database))
        slot.pid, slot.started_s = pid, time.monotonic()
        self._count_alive(slot.database)


def _worker_main(settings: Settings, index: int, run_id: str, database: str) -> int:
    """Entry point of a forked worker process."""
    from .worker import Worker

    # SIGTERM/SIGINT/SIGHUP stay blocked until the worker has its handlers in place.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    try:
        return Worker(settings, index, run_id, database).run()
    except BaseException:  # noqa: BLE001 - a worker must report, never unwind into the parent's code
        log.exception("worker %d crashed", index)
        return 1
    finally:
        logging.shutdown()
