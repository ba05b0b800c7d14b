"""`python -m bench circuit`: a destination that goes down for a while under load.

Requests go at a steady rate to two hosts: the bench target (nginx) and a switchable receiver on
127.0.0.3 (tests/switch_server.py: up, it answers 200; down, it resets every connection and counts
them). Twice: once with the second host up throughout (the baseline), once with it down for
down_s seconds. Figures: the other host's commit -> visible latency in both runs, the requests that
reached the down host while it was down (against N + the probes), and that every request ends with
a response and none in net.failed_requests.
"""

from __future__ import annotations

import sys
import threading
import time

from .context import Bench, cpu_figures, make_result
from .measure import Progress, Stalled, Visibility, latency_summary_ms, now_s
from .runner import HTTP_SERVER_SCRIPT, NginxTarget

DOWN_HOST = "127.0.0.3"
TICK_S = 0.01
POLL_S = 0.002
STATUS_EVERY_S = 0.1
DEFAULT_THRESHOLD = 10


def circuit(bench: Bench, rate_per_s: float, duration_s: float, down_at_s: float, down_s: float) -> dict:
    sys.path.insert(0, str(HTTP_SERVER_SCRIPT.parent))
    from switch_server import SwitchServer

    threshold = int(bench.options.serve_flags.get("circuit_failures", DEFAULT_THRESHOLD))
    other = bench.target if isinstance(bench.target, NginxTarget) else NginxTarget(bench.work_dir, "nginx-circuit").start()
    runs = {}
    try:
        for label, goes_down in (("baseline", False), ("down", True)):
            with SwitchServer(DOWN_HOST) as switch:
                runs[label] = _run(bench, other.url, switch, rate_per_s, duration_s,
                                   down_at_s if goes_down else None, down_s)
    finally:
        if other is not bench.target:
            other.stop()
    down, base = runs["down"], runs["baseline"]
    probes = max(0, down["most_opens"] - 1)
    figures = {
        "rate_per_s_per_host": rate_per_s, "duration_s": duration_s, "down_s": down_s, "threshold": threshold,
        **{f"{label}_other_host_latency_{key}_ms": run["other_latency"][key]
           for label, run in runs.items() for key in ("p50", "p95", "p99", "max")},
        "other_host_p99_down_vs_baseline": round(down["other_latency"]["p99"] / base["other_latency"]["p99"], 2),
        "reached_while_down": down["reached_while_down"],
        "probes_while_down": probes,
        "bound_n_plus_probes": threshold + probes,
        "within_bound": down["reached_while_down"] <= threshold + probes,
        "circuit_opened_after_s": down["opened_after_s"],
        "all_answered_after_return_s": down["all_answered_after_return_s"],
        **{f"{label}_{name}": run[name] for label, run in runs.items()
           for name in ("requests", "responses_200", "failed_requests", "cpu_us_per_request",
                        "other_processes_cpu_pct")},
    }
    notes = [f"{rate_per_s:g} requests/s to each of two hosts for {duration_s:g} s (a transaction every "
             f"{TICK_S * 1000:.0f} ms): the bench's nginx (net.http_get) and {DOWN_HOST} "
             f"(net.http_request with max_retries => 8), a receiver that resets every connection while down.",
             f"Down run: {DOWN_HOST} down from {down_at_s:g} s to {down_at_s + down_s:g} s. reached_while_down: "
             f"connections it reset meanwhile (the requests in flight when it went down are not counted: they "
             f"were sent while it was up). probes_while_down: the times the circuit opened again (each after a "
             f"failed probe). Latency: commit -> first poll that saw the row (polls every {POLL_S * 1000:g} ms)."]
    return make_result("circuit", {"rate_per_s": rate_per_s, "duration_s": duration_s, "down_at_s": down_at_s,
                                   "down_s": down_s}, figures, {}, notes)


class _Load(threading.Thread):
    """Commit the requests due every tick: one to each host per 1 / rate s."""

    def __init__(self, bench: Bench, other_url: str, down_url: str, rate_per_s: float, duration_s: float):
        super().__init__(name="circuit-load", daemon=True)
        self.conn = bench.db.connect(autocommit=False)
        self.other_url, self.down_url = other_url, down_url
        self.rate_per_s, self.duration_s = rate_per_s, duration_s
        self.committed_at_s: dict[int, float] = {}
        self.other_ids: list[int] = []
        self.down_ids: list[int] = []
        self.error: BaseException | None = None
        self.started_s = now_s()

    def run(self) -> None:
        try:
            with self.conn:
                self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc

    def _run(self) -> None:
        total = round(self.rate_per_s * self.duration_s)
        sent = 0
        next_tick_s = self.started_s
        while sent < total:
            due = min(total, int(self.rate_per_s * (now_s() - self.started_s)) + 1) - sent
            if due > 0:
                other = [r[0] for r in self.conn.execute(
                    "select net.http_get(%s) from generate_series(1, %s)", (self.other_url, due)).fetchall()]
                down = [r[0] for r in self.conn.execute(
                    "select net.http_request('GET', %s, max_retries => 8) from generate_series(1, %s)",
                    (self.down_url, due)).fetchall()]
                self.conn.commit()
                committed_s = now_s()
                for row_id in other + down:
                    self.committed_at_s[row_id] = committed_s
                self.other_ids += other
                self.down_ids += down
                sent += due
            next_tick_s += TICK_S
            time.sleep(max(0.0, next_tick_s - now_s()))


def _run(bench: Bench, other_url: str, switch, rate_per_s: float, duration_s: float, down_at_s: float | None,
         down_s: float) -> dict:
    bench.db.reset()
    with bench.db.connect() as conn:
        conn.execute("delete from net._destination_circuits")
    total = 2 * round(rate_per_s * duration_s)
    with bench.serving() as serve, bench.db.connect() as poll_conn, bench.db.connect() as status_conn:
        visibility = Visibility(poll_conn)
        load = _Load(bench, f"{other_url}/fast", f"{switch.url}/fast", rate_per_s, duration_s)
        meter = bench.cpu_meter(serve, [poll_conn, status_conn, load.conn])
        meter.start()
        load.start()
        progress = Progress(total, "circuit down" if down_at_s is not None else "circuit baseline")
        went_down_s = came_back_s = opened_s = all_answered_s = None
        refused_before = reached_while_down = 0
        most_opens, next_status_s = 0, 0.0
        last_found_s = now_s()
        try:
            while True:
                now = now_s()
                elapsed_s = now - load.started_s
                if down_at_s is not None and went_down_s is None and elapsed_s >= down_at_s:
                    refused_before = switch.refused
                    switch.down()
                    went_down_s = now
                if went_down_s is not None and came_back_s is None and elapsed_s >= down_at_s + down_s:
                    reached_while_down = switch.refused - refused_before
                    switch.up()
                    came_back_s = now
                if now >= next_status_s:
                    next_status_s = now + STATUS_EVERY_S
                    row = status_conn.execute("select state, opens from net._destination_circuits where host = %s",
                                              (DOWN_HOST,)).fetchone()
                    if row:
                        most_opens = max(most_opens, row[1])
                        if row[0] == "open" and opened_s is None and went_down_s is not None:
                            opened_s = now
                if visibility.poll():
                    last_found_s = visibility.poll_starts_s[-1]
                progress.update(visibility.seen_count)
                bench.check_alive(serve)
                if load.error:
                    raise load.error
                if not load.is_alive() and visibility.seen_count >= total:
                    all_answered_s = visibility.poll_starts_s[-1]
                    break
                if now - last_found_s > bench.options.stall_timeout_s:
                    raise Stalled(f"no new response for {bench.options.stall_timeout_s:g} s "
                                  f"({visibility.seen_count:,} of {total:,})")
                time.sleep(POLL_S)
        finally:
            progress.close(visibility.seen_count)
        used = meter.stop()
        ids = load.other_ids + load.down_ids
        responses_200, failed = poll_conn.execute(
            "select (select count(*) from net._http_response where id = any(%(ids)s) and status_code = 200), "
            "(select count(*) from net.failed_requests)", {"ids": ids}).fetchone()
    other_latency = latency_summary_ms((visibility.seen_at_s[i] - load.committed_at_s[i]) * 1000 for i in load.other_ids)
    return {
        "requests": len(ids), "responses_200": responses_200, "failed_requests": failed,
        "other_latency": {key: round(other_latency[key], 2) for key in ("p50", "p95", "p99", "max")},
        "reached_while_down": reached_while_down, "most_opens": most_opens,
        "opened_after_s": round(opened_s - went_down_s, 2) if opened_s and went_down_s else None,
        "all_answered_after_return_s": round(all_answered_s - came_back_s, 2) if came_back_s else None,
        **cpu_figures(used, len(ids), None),
    }
