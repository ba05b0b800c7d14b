"""The load of a chaos run: requests committed at a steady rate, and the workers' memory meanwhile."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable

import psycopg

from helpers import rss_bytes

from .plan import Plan

# The load generator's table: the requests it committed, written in their transaction.
SETUP_SQL = "create table if not exists public.chaos_requests(n int primary key, request_id bigint not null)"
_ENQUEUE_SQL = """
insert into public.chaos_requests(n, request_id)
select n, net.http_request('POST', %(url)s || '/hook/' || n, convert_to('{"n": ' || n || '}', 'UTF8'),
                           headers => '{"Content-Type": "application/json"}',
                           timeout_milliseconds => %(timeout_ms)s, idempotency_key => 'evt-' || n)
from generate_series(%(first)s::int, %(last)s::int) as n
returning request_id
"""


class Load(threading.Thread):
    """Commit burst requests, then rate_per_s a second, to url until stopped (at most max_s), in a
    transaction every tick; a transaction a fault interrupted is tried again with the same n's."""

    TICK_S = 0.02
    MAX_BATCH = 1000

    def __init__(self, dsn: str, url: str, plan: Plan, max_s: float, burst: int = 0):
        super().__init__(name="chaos-load", daemon=True)
        self.dsn, self.url, self.plan = dsn, url, plan
        self.burst = burst
        self.max_total = burst + int(plan.rate_per_s * max_s)
        self.max_s = max_s
        self.sent = 0
        self.highest_id = 0
        self.confirmed = 0
        self.retries = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the run
            self.error = exc

    def _run(self) -> None:
        started_s = time.monotonic()
        deadline_s = started_s + self.max_s
        conn = None
        # The n's of a transaction a fault interrupted: tried again exactly, since its COMMIT may
        # have gone through (a wider range would count n's that were never inserted).
        interrupted: tuple[int, int] | None = None
        while self.sent < self.max_total and not self.stopping.is_set() and time.monotonic() < deadline_s:
            elapsed_s = time.monotonic() - started_s
            due = min(self.max_total, self.burst + int(self.plan.rate_per_s * elapsed_s) + 1) - self.sent
            if interrupted is None and due <= 0:
                time.sleep(self.TICK_S)
                continue
            first, last = interrupted or (self.sent + 1, self.sent + min(due, self.MAX_BATCH))
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, connect_timeout=3, application_name="chaos load")
                ids = self._commit(conn, first, last)
            except psycopg.OperationalError:
                # The server went away, maybe during COMMIT: the same n's again, once it is back.
                self.retries += 1
                interrupted = (first, last)
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.1)
                continue
            interrupted = None
            self.sent = last
            self.confirmed += last - first + 1
            self.highest_id = max(self.highest_id, *ids)
            time.sleep(self.TICK_S)
        if conn is not None:
            conn.close()

    def _commit(self, conn: psycopg.Connection, first: int, last: int) -> list[int]:
        params = {"url": self.url, "first": first, "last": last, "timeout_ms": self.plan.timeout_ms}
        try:
            ids = [row_id for (row_id,) in conn.execute(_ENQUEUE_SQL, params)]
        except psycopg.errors.UniqueViolation:
            # The COMMIT a fault interrupted had gone through.
            conn.rollback()
            ids = [row_id for (row_id,) in conn.execute(
                "select request_id from public.chaos_requests where n between %s and %s", (first, last))]
        conn.commit()
        return ids


class RssWatch(threading.Thread):
    """Sample the RSS of the current serve's workers every interval_s; growth is measured against
    the largest worker when mark_warm() is called."""

    def __init__(self, worker_pids: Callable[[], list[int]], interval_s: float = 0.25):
        super().__init__(name="chaos-rss", daemon=True)
        self.worker_pids = worker_pids
        self.interval_s = interval_s
        self.samples: dict[int, list[tuple[float, int]]] = defaultdict(list)
        self.stopping = threading.Event()
        self.warm_bytes = 0
        self.warm_at_s: float | None = None

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            for pid in self.worker_pids():
                rss = rss_bytes(pid)
                if rss is not None:
                    self.samples[pid].append((time.monotonic(), rss))

    def mark_warm(self, worker_pids: list[int]) -> None:
        self.warm_bytes = max((rss_bytes(pid) or 0 for pid in worker_pids), default=0)
        self.warm_at_s = time.monotonic()

    def growth(self) -> dict[int, int]:
        """Per worker process sampled since mark_warm(): its largest RSS minus the warm size."""
        if self.warm_at_s is None:
            return {}
        grown = {}
        for pid, samples in self.samples.items():
            after = [rss for at_s, rss in samples if at_s >= self.warm_at_s]
            if after:
                grown[pid] = max(after) - self.warm_bytes
        return grown
