"""What the scenarios measure: response visibility by id, CPU time, RSS, percentiles, progress."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import psutil
import psycopg

log = logging.getLogger("bench.measure")

# Visibility is detected by this query, from a session with seqscans off so that both arms use
# the unique index on id: rows above the highest id seen so far, plus the holes below it.
_VISIBLE_SQL = "select id from net._http_response where id > %(above)s or id = any(%(holes)s::bigint[])"


class Stalled(Exception):
    """No new response row became visible for too long: the scenario is aborted."""


def now_s() -> float:
    """Return the clock every timestamp of the bench uses (monotonic, shared by threads)."""
    return time.perf_counter()


class Visibility:
    """Notice response rows as they become visible, by id, at a cost that grows with new rows only.

    The bench is the only client inserting requests and never rolls back, so every id up to the
    highest visible one will get a response: ids skipped by `id > above` are remembered as holes.
    """

    def __init__(self, conn: psycopg.Connection, keep_times: bool = True):
        conn.execute("set enable_seqscan = off")
        self.conn = conn
        self.keep_times = keep_times
        self.above = 0
        self.holes: set[int] = set()
        self.seen_count = 0
        self.seen_at_s: dict[int, float] = {}
        self.poll_starts_s: list[float] = []

    def poll(self) -> int:
        """Look for newly visible rows once; return how many were found."""
        started_s = now_s()
        rows = self.conn.execute(_VISIBLE_SQL, {"above": self.above, "holes": list(self.holes)}).fetchall()
        self.poll_starts_s.append(started_s)
        new = 0
        highest = self.above
        for (row_id,) in rows:
            if row_id > self.above:
                highest = max(highest, row_id)
            elif row_id in self.holes:
                self.holes.discard(row_id)
            else:
                continue
            new += 1
            if self.keep_times:
                self.seen_at_s[row_id] = started_s
        if highest > self.above:
            fresh = {row_id for (row_id,) in rows if row_id > self.above}
            self.holes.update(i for i in range(self.above + 1, highest) if i not in fresh)
            self.above = highest
        self.seen_count += new
        return new

    def resolution_ms(self) -> dict:
        """Return the mean and max gap between polls: how late a row may be noticed."""
        gaps_ms = [(b - a) * 1000 for a, b in zip(self.poll_starts_s, self.poll_starts_s[1:])]
        if not gaps_ms:
            return {"mean": None, "max": None}
        return {"mean": sum(gaps_ms) / len(gaps_ms), "max": max(gaps_ms)}


def wait_for_rows(visibility: Visibility, total: int, stall_timeout_s: float,
                  interval_s: float | Callable[[int], float],
                  on_poll: Callable[[float], None] | None = None, max_s: float = 24 * 3600) -> float:
    """Poll until total rows are visible; return the time of the poll that saw the last one.

    interval_s may be a function of the rows still missing (poll faster near the end).
    """
    started_s = last_found_s = now_s()
    while True:
        if visibility.poll():
            last_found_s = visibility.poll_starts_s[-1]
        if on_poll:
            on_poll(now_s())
        if visibility.seen_count >= total:
            return last_found_s
        now = now_s()
        if now - last_found_s > stall_timeout_s:
            raise Stalled(f"no new response row for {stall_timeout_s:g} s "
                          f"({visibility.seen_count:,} of {total:,} visible)")
        if now - started_s > max_s:
            raise Stalled(f"gave up after {max_s:.0f} s ({visibility.seen_count:,} of {total:,} visible)")
        time.sleep(interval_s(total - visibility.seen_count) if callable(interval_s) else interval_s)


# ---- CPU and memory -----------------------------------------------------------------------


def _cpu_s(process: psutil.Process) -> float:
    """CPU seconds of a process plus those of its children it has already reaped."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def tree_cpu_s(pid: int | None, attempts: int = 3) -> float | None:
    """Return the CPU seconds used so far by a process and all its descendants, dead or alive."""
    if pid is None:
        return None
    for attempt in range(attempts):
        try:
            root = psutil.Process(pid)
            total = _cpu_s(root)
            children = root.children(recursive=True)
        except psutil.Error as exc:
            # A child may vanish while the tree is read: try again; the root gone is final.
            if attempt == attempts - 1 or not psutil.pid_exists(pid):
                log.warning("cannot read the CPU time of pid %d and its children: %r", pid, exc)
                return None
            continue
        for child in children:
            try:
                total += _cpu_s(child)
            except psutil.Error:
                pass
        return total
    return None


def pids_cpu_s(pids: Iterable[int]) -> dict[int, float]:
    """Return {pid: CPU seconds} of the given processes that still exist."""
    found = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        found[pid] = times.user + times.system
    return found


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores; not idle, waiting for I/O or stolen)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - sum(getattr(times, name, 0.0)
                                         for name in ("iowait", "steal", "guest", "guest_nice"))


def machine_steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests while this VM wanted to run."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def wait_for_quiet(max_wait_s: float, threshold_pct: float = 15.0, quiet_for_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until the machine is < threshold_pct busy for quiet_for_s; return busy %.

    On a shared machine other processes' CPU distorts the figures: this waits them out when it can.
    """
    cores = psutil.cpu_count() or 1
    deadline_s = now_s() + max_wait_s
    quiet_since_s = None
    while True:
        before_s, before = now_s(), machine_busy_s()
        time.sleep(1.0)
        busy_pct = 100 * (machine_busy_s() - before) / (now_s() - before_s) / cores
        if busy_pct < threshold_pct:
            quiet_since_s = quiet_since_s or before_s
            if now_s() - quiet_since_s >= quiet_for_s:
                return busy_pct
        else:
            quiet_since_s = None
            sys.stderr.write(f"waiting for a quiet machine: {busy_pct:.0f}% busy\n")
        if now_s() >= deadline_s:
            sys.stderr.write(f"machine still {busy_pct:.0f}% busy after waiting {max_wait_s:.0f} s: going on\n")
            return busy_pct


@dataclass
class CpuMeter:
    """CPU used over a window by process trees (by root pid) and sets of single processes.

    Trees count reaped children, so processes born and gone inside the window are included.
    Sets are resolved when the window ends (a pid first seen then started at zero).
    """

    trees: dict[str, Callable[[], int | None]]
    sets: dict[str, Callable[[], Iterable[int]]]
    _tree_start: dict[str, float | None] = field(default_factory=dict)
    _set_start: dict[str, dict[int, float]] = field(default_factory=dict)
    _start_s: float = 0.0
    _machine_start_s: float = 0.0
    _steal_start_s: float = 0.0

    def start(self, fresh: Iterable[str] = ()) -> None:
        """Open the window; groups named in fresh did not exist before and start at zero."""
        fresh = set(fresh)
        self._start_s = now_s()
        self._machine_start_s = machine_busy_s()
        self._steal_start_s = machine_steal_s()
        self._tree_start = {name: 0.0 if name in fresh else tree_cpu_s(root())
                            for name, root in self.trees.items()}
        self._set_start = {name: {} if name in fresh else pids_cpu_s(pids())
                           for name, pids in self.sets.items()}

    def stop(self) -> dict:
        """Close the window; return {group: CPU seconds or None when unreadable, "wall_s": ...}."""
        used: dict[str, float | None] = {"wall_s": now_s() - self._start_s,
                                         "machine_busy": machine_busy_s() - self._machine_start_s,
                                         "machine_steal": machine_steal_s() - self._steal_start_s}
        for name, root in self.trees.items():
            end, start = tree_cpu_s(root()), self._tree_start.get(name)
            used[name] = None if end is None or start is None else end - start
        for name, pids in self.sets.items():
            end = pids_cpu_s(pids())
            start = self._set_start.get(name, {})
            used[name] = sum(value - start.get(pid, 0.0) for pid, value in end.items()) if end else None
        return used


class RssSampler:
    """Sample the RSS of a changing set of processes from a background thread."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval_s: float, origin_s: float | None = None):
        self._pids = pids
        self.interval_s = interval_s
        self.origin_s = now_s() if origin_s is None else origin_s
        # pid -> [(seconds since origin, rss bytes)]
        self.series: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        t_s = now_s() - self.origin_s
        try:
            pids = list(self._pids())
        except Exception:  # noqa: BLE001 - the process may be gone between listing and reading
            return
        for pid in pids:
            try:
                rss = psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.series.setdefault(pid, []).append((round(t_s, 3), rss))

    def max_mb(self) -> float | None:
        values = [rss for points in self.series.values() for _, rss in points]
        return max(values) / 2**20 if values else None


# ---- statistics and display -----------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values (fraction 0..1)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary_ms(latencies_ms: Iterable[float]) -> dict:
    """Return count, min, p50, p95, p99, max and mean of latencies in ms."""
    values = sorted(latencies_ms)
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": values[0],
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, min_interval_s: float | None = None):
        self.total = max(total, 1)
        self.label = label
        self.tty = sys.stderr.isatty()
        self.min_interval_s = min_interval_s if min_interval_s is not None else (0.1 if self.tty else 5.0)
        self.started_s = now_s()
        self._last_shown_s = 0.0
        self._last = (self.started_s, 0)

    def update(self, done: int, force: bool = False) -> None:
        now = now_s()
        if not force and now - self._last_shown_s < self.min_interval_s:
            return
        previous_s, previous_done = self._last
        rate_per_s = (done - previous_done) / (now - previous_s) if now > previous_s else 0.0
        self._last, self._last_shown_s = (now, done), now
        width = 30
        filled = int(width * min(done, self.total) / self.total)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{self.total:,} "
                f"{rate_per_s:,.0f}/s {now - self.started_s:.1f} s")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
