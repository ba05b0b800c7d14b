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
from .measure import Progress, Stalled, latency_summary_ms, now_s
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
        # Every failed attempt to the host, as the database counted it (it is not reset while the
        # circuit is open): the requests that reached it while it was down.
        "requests_reached_while_down": down["most_failures"],
        "probes_while_down": probes,
        "bound_n_plus_probes": threshold + probes,
        "within_bound": down["most_failures"] <= threshold + probes,
        "connections_refused_while_down": down["reached_while_down"],
        "connections_refused_before_it_opened": down["reached_before_open"],
        "circuit_opened_after_s": down["opened_after_s"],
        "all_answered_after_return_s": down["all_answered_after_return_s"],
        **{f"{label}_{name}": run[name] for label, run in runs.items()
           for name in ("requests", "responses_200", "failed_requests", "cpu_us_per_request",
                        "worker_process_cpu_us_per_request", "worker_backend_cpu_us_per_request",
                        "database_total_cpu_us_per_request", "other_processes_cpu_pct")},
    }
    notes = [f"{rate_per_s:g} requests/s to each of two hosts for {duration_s:g} s (a transaction every "
             f"{TICK_S * 1000:.0f} ms): the bench's nginx (net.http_get) and {DOWN_HOST} "
             f"(net.http_request with max_retries => 8), a receiver that resets every connection while down.",
             f"Down run: {DOWN_HOST} down from {down_at_s:g} s to {down_at_s + down_s:g} s. "
             f"requests_reached_while_down: the failures net._destination_circuits counted for it (every failed "
             f"attempt, the requests in flight when it went down included; not reset while the circuit is open). "
             f"connections_refused_*: connections it reset meanwhile (libcurl connects twice for a request "
             f"whose kept-alive connection turns out dead). probes_while_down: the times the circuit opened again "
             f"(each after a failed probe). Latency: commit -> first poll that saw the row (the other host's outstanding ids, "
             f"polled every {POLL_S * 1000:g} ms)."]
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
        # Not measure.Visibility: the held requests would be thousands of holes below the highest
        # id seen, looked up at every poll. The other host's outstanding ids are few.
        seen_at_s: dict[int, float] = {}
        outstanding: set[int] = set()
        taken_other = 0
        answered = 0
        load = _Load(bench, f"{other_url}/fast", f"{switch.url}/fast", rate_per_s, duration_s)
        meter = bench.cpu_meter(serve, [poll_conn, status_conn, load.conn])
        meter.start()
        load.start()
        progress = Progress(total, "circuit down" if down_at_s is not None else "circuit baseline")
        went_down_s = came_back_s = opened_s = all_answered_s = None
        went_down_epoch_s = first_opened_epoch_s = None
        refused_before = reached_while_down = 0
        most_opens, most_failures, next_status_s = 0, 0, 0.0
        last_found_s = last_answered_s = now_s()
        try:
            while True:
                now = now_s()
                elapsed_s = now - load.started_s
                if down_at_s is not None and went_down_s is None and elapsed_s >= down_at_s:
                    refused_before = switch.refused
                    switch.down()
                    went_down_s, went_down_epoch_s = now, time.time()
                if went_down_s is not None and came_back_s is None and elapsed_s >= down_at_s + down_s:
                    reached_while_down = switch.refused - refused_before
                    switch.up()
                    came_back_s = now
                if now >= next_status_s:
                    next_status_s = now + STATUS_EVERY_S
                    row = status_conn.execute("select state, opens, extract(epoch from opened_at)::float8, failures "
                                              "from net._destination_circuits where host = %s", (DOWN_HOST,)).fetchone()
                    if row:
                        most_opens = max(most_opens, row[1])
                        if went_down_s is not None and came_back_s is None:
                            most_failures = max(most_failures, row[3])
                        if row[0] == "open" and opened_s is None and went_down_s is not None:
                            opened_s = now
                            first_opened_epoch_s = row[2]
                    count = status_conn.execute("select count(*) from net._http_response").fetchone()[0]
                    if count > answered:
                        answered, last_answered_s = count, now
                    progress.update(answered)
                    if not load.is_alive() and answered >= total:
                        all_answered_s = now
                        break
                    if now - last_answered_s > bench.options.stall_timeout_s:
                        raise Stalled(f"no new response for {bench.options.stall_timeout_s:g} s "
                                      f"({answered:,} of {total:,})")
                fresh = load.other_ids[taken_other:]
                taken_other += len(fresh)
                outstanding.update(fresh)
                if outstanding:
                    started_s = now_s()
                    for (row_id,) in poll_conn.execute("select id from net._http_response where id = any(%s)",
                                                       (list(outstanding),)).fetchall():
                        seen_at_s[row_id] = started_s
                        outstanding.discard(row_id)
                bench.check_alive(serve)
                if load.error:
                    raise load.error
                time.sleep(POLL_S)
        finally:
            progress.close(answered)
        used = meter.stop()
        ids = load.other_ids + load.down_ids
        responses_200, failed = poll_conn.execute(
            "select (select count(*) from net._http_response where id = any(%(ids)s) and status_code = 200), "
            "(select count(*) from net.failed_requests)", {"ids": ids}).fetchone()
    other_latency = latency_summary_ms((seen_at_s[i] - load.committed_at_s[i]) * 1000 for i in load.other_ids)
    return {
        "requests": len(ids), "responses_200": responses_200, "failed_requests": failed,
        "other_latency": {key: round(other_latency[key], 2) for key in ("p50", "p95", "p99", "max")},
        "reached_while_down": reached_while_down, "most_opens": most_opens, "most_failures": most_failures,
        "reached_before_open": (sum(went_down_epoch_s <= t < first_opened_epoch_s for t in switch.refused_at)
                                if first_opened_epoch_s else None),
        "opened_after_s": (round(first_opened_epoch_s - went_down_epoch_s, 3)
                           if first_opened_epoch_s and went_down_epoch_s else None),
        "all_answered_after_return_s": round(all_answered_s - came_back_s, 2) if came_back_s else None,
        **cpu_figures(used, len(ids), None),
    }
