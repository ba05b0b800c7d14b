"""The benchmark scenarios: each starts `pgnet-curl serve`, offers load by SQL, measures, stops it.

Every time is taken with measure.now_s(). A request's commit time is when COMMIT returned to the
runner; a response's visibility time is the start of the first poll that returned its row.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from urllib.parse import urlsplit

from .context import SUSPECT_LATENCY_MS, Bench, cpu_figures, make_result, response_check, suspect_pct
from .measure import Progress, RssSampler, Stalled, Visibility, latency_summary_ms, now_s, wait_for_rows
from .runner import HTTP_SERVER_SCRIPT, BenchError

# Throughput polls every 100 ms (the plot's samples), every 5 ms for the last 10% (the end time).
THROUGHPUT_SAMPLE_S = 0.1
THROUGHPUT_FINE_S = 0.005
SUSTAINED_TICK_S = 0.01
SUSTAINED_MAX_BATCH = 1000
HOL_SLOW_DELAY_MS = 2000


# ---- 1. throughput ---------------------------------------------------------------------------------


def throughput(bench: Bench, requests: int, warmup: int = 0) -> dict:
    """Commit N requests at once; time from COMMIT to the last of N response rows visible.

    With warmup, that many requests go through serve first (connections opened), unmeasured.
    """
    bench.db.reset()
    with (bench.serving() as serve, bench.db.connect(autocommit=False) as enqueue_conn,
          bench.db.connect() as poll_conn):
        visibility = Visibility(poll_conn, keep_times=False)
        if warmup:
            bench.enqueue(enqueue_conn, bench.fast_url(), warmup)
            enqueue_conn.commit()
            wait_for_rows(visibility, warmup, bench.options.stall_timeout_s, 0.05, lambda _: bench.check_alive(serve))
            visibility.seen_count = 0
        meter = bench.cpu_meter(serve, [enqueue_conn, poll_conn])
        enqueue_started_s = now_s()
        ids = bench.enqueue(enqueue_conn, bench.fast_url(), requests)
        enqueue_s = now_s() - enqueue_started_s
        meter.start()
        commit_started_s = now_s()
        enqueue_conn.commit()
        committed_s = now_s()
        progress = Progress(requests, "throughput")
        samples: list[tuple[float, int]] = [(0.0, 0)]
        next_sample_s = committed_s

        def on_poll(now: float) -> None:
            nonlocal next_sample_s
            bench.check_alive(serve)
            progress.update(visibility.seen_count)
            if now >= next_sample_s:
                samples.append((round(visibility.poll_starts_s[-1] - committed_s, 4), visibility.seen_count))
                next_sample_s = now + THROUGHPUT_SAMPLE_S

        def interval_s(missing: int) -> float:
            return THROUGHPUT_FINE_S if missing <= requests * 0.1 else THROUGHPUT_SAMPLE_S

        with RssSampler(serve.worker_pids, 0.5, origin_s=committed_s) as rss, bench.profiling(serve, "throughput") as spy:
            try:
                last_s = wait_for_rows(visibility, requests, bench.options.stall_timeout_s, interval_s, on_poll)
            finally:
                progress.close(visibility.seen_count)
        used = meter.stop()
        samples.append((round(last_s - committed_s, 4), visibility.seen_count))
    duration_s = last_s - committed_s
    first_seen = next((t for t, n in samples if n > 0), None)
    figures = {
        "requests": requests,
        "rate_per_s": round(requests / duration_s, 1),
        "commit_to_all_visible_s": round(duration_s, 3),
        "first_response_visible_ms": round(first_seen * 1000, 1) if first_seen is not None else None,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_rate_per_s": round(requests / enqueue_s, 1),
        "commit_ms": round((committed_s - commit_started_s) * 1000, 2),
        "end_detection_resolution_ms": THROUGHPUT_FINE_S * 1000,
        **cpu_figures(used, requests, rss),
        **response_check(bench.db, ids[0], ids[-1]),
    }
    notes = [f"{requests:,} net.http_get() calls in one transaction ({bench.options.txn_rows:,} per statement), "
             f"one COMMIT; the clock starts when COMMIT returns. "
             + (f"{warmup:,} warm-up requests first." if warmup else "Cold start: serve has no connection yet."),
             "Visibility polled every 100 ms (every 5 ms for the last 10%) by id on the unique index."]
    return make_result("throughput", {"requests": requests, "warmup": warmup}, figures,
                   {"visible_over_time": samples, "worker_rss": _rss_series(rss)}, notes, spy)


# ---- 2. sustained ---------------------------------------------------------------------------------


class _Enqueuer(threading.Thread):
    """Offer rate_per_s requests per second for duration_s, in small transactions every tick."""

    def __init__(self, bench: Bench, url: str, rate_per_s: float, duration_s: float, start_s: float,
                 committed_at_s: dict[int, float], commit_sent_at_s: dict[int, float]):
        super().__init__(name="enqueuer", daemon=True)
        self.bench, self.url = bench, url
        self.rate_per_s, self.duration_s, self.start_s = rate_per_s, duration_s, start_s
        self.committed_at_s = committed_at_s
        self.commit_sent_at_s = commit_sent_at_s
        self.sent = 0
        self.transactions = 0
        self.finished_s = 0.0
        self.error: BaseException | None = None
        self.stop_requested = threading.Event()
        self.conn = bench.db.connect(autocommit=False)

    def run(self) -> None:
        try:
            with self.conn:
                self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        self.finished_s = now_s()

    def _run(self) -> None:
        end_s = self.start_s + self.duration_s
        total = round(self.rate_per_s * self.duration_s)
        next_tick_s = self.start_s
        while self.sent < total and not self.stop_requested.is_set():
            now = now_s()
            if now >= end_s + self.bench.options.stall_timeout_s:
                raise Stalled("the enqueuer fell a whole stall timeout behind its schedule")
            due = min(total, int(self.rate_per_s * (now - self.start_s)) + 1) - self.sent
            if due > 0:
                ids = self.bench.enqueue(self.conn, self.url, min(due, SUSTAINED_MAX_BATCH))
                sent_s = now_s()
                self.conn.commit()
                committed_s = now_s()
                for row_id in ids:
                    self.committed_at_s[row_id] = committed_s
                    self.commit_sent_at_s[row_id] = sent_s
                self.sent += len(ids)
                self.transactions += 1
            next_tick_s += SUSTAINED_TICK_S
            time.sleep(max(0.0, next_tick_s - now_s()))


def sustained(bench: Bench, rate_per_s: float, duration_s: float) -> dict:
    """Offer a steady rate for a while; report the achieved rate and commit → visible latency."""
    bench.db.reset()
    total = round(rate_per_s * duration_s)
    committed_at_s: dict[int, float] = {}
    commit_sent_at_s: dict[int, float] = {}
    enqueuers = max(1, bench.options.enqueuers)
    poll_s = bench.options.poll_ms / 1000
    with bench.serving() as serve, bench.db.connect() as poll_conn:
        visibility = Visibility(poll_conn)
        start_s = now_s() + 0.05
        threads = [_Enqueuer(bench, bench.fast_url(), rate_per_s / enqueuers, duration_s, start_s, committed_at_s,
                           commit_sent_at_s)
                   for _ in range(enqueuers)]
        meter = bench.cpu_meter(serve, [poll_conn] + [thread.conn for thread in threads])
        progress = Progress(total, "sustained")
        meter.start()
        with RssSampler(serve.worker_pids, 0.5, origin_s=start_s) as rss, bench.profiling(serve, "sustained") as spy:
            for thread in threads:
                thread.start()
            try:
                last_found_s = now_s()
                while True:
                    if visibility.poll():
                        last_found_s = visibility.poll_starts_s[-1]
                    progress.update(visibility.seen_count)
                    bench.check_alive(serve)
                    for thread in threads:
                        if thread.error:
                            raise BenchError(f"enqueuer failed: {thread.error!r}") from thread.error
                    sent = sum(thread.sent for thread in threads)
                    if all(not thread.is_alive() for thread in threads) and visibility.seen_count >= sent:
                        break
                    if sent > visibility.seen_count and now_s() - last_found_s > bench.options.stall_timeout_s:
                        raise Stalled(f"no new response row for {bench.options.stall_timeout_s:g} s "
                                      f"({visibility.seen_count:,} of {sent:,} visible)")
                    time.sleep(poll_s)
            finally:
                for thread in threads:
                    thread.stop_requested.set()
                for thread in threads:
                    thread.join(30)
                progress.close(visibility.seen_count)
        used = meter.stop()
    sent = sum(thread.sent for thread in threads)
    enqueue_end_s = max(thread.finished_s for thread in threads)
    first_commit_s = min(committed_at_s.values())
    by_commit = sorted((t, max(0.0, (visibility.seen_at_s[row_id] - t) * 1000)) for row_id, t in committed_at_s.items())
    latencies_ms = [latency_ms for _, latency_ms in by_commit]
    last_visible_s = max(visibility.seen_at_s.values())
    latency = latency_summary_ms(latencies_ms)
    # An upper bound: from the moment COMMIT was sent (includes the commit's own duration).
    from_sent = latency_summary_ms((visibility.seen_at_s[row_id] - t) * 1000 for row_id, t in commit_sent_at_s.items())
    figures = {
        "offered_rate_per_s": rate_per_s,
        "duration_s": duration_s,
        "requests": sent,
        "enqueued_rate_per_s": round(sent / (enqueue_end_s - first_commit_s), 1),
        "achieved_rate_per_s": round(sent / (last_visible_s - first_commit_s), 1),
        "transactions": sum(thread.transactions for thread in threads),
        **{f"latency_{key}_ms": round(value, 2) for key, value in latency.items() if key != "count"},
        **{f"latency_from_commit_sent_{key}_ms": round(from_sent[key], 2) for key in ("p50", "p95", "p99")},
        "poll_interval_mean_ms": _round(visibility.resolution_ms()["mean"], 3),
        "suspect_latency_pct": suspect_pct(latencies_ms),
        **cpu_figures(used, sent, rss),
        **response_check(bench.db, min(committed_at_s), max(committed_at_s)),
    }
    notes = [f"{enqueuers} enqueuer connection(s), a transaction every {SUSTAINED_TICK_S * 1000:.0f} ms each "
             f"holding the requests due by then.",
             f"Latency = first poll that saw the row - COMMIT returned; polls every {bench.options.poll_ms} ms "
             f"(mean gap {figures['poll_interval_mean_ms']} ms): resolution about one poll gap. "
             f"suspect_latency_pct: latencies < {SUSPECT_LATENCY_MS} ms, commit timestamps taken late; "
             f"latency_from_commit_sent_*: from COMMIT sent instead (an upper bound)."]
    return make_result("sustained", {"rate_per_s": rate_per_s, "duration_s": duration_s}, figures,
                   {"latencies_ms": sorted(round(v, 3) for v in latencies_ms),
                    "latency_by_commit_ms": [(round(t - start_s, 4), round(v, 2)) for t, v in by_commit],
                    "visible_over_time": _visible_over_time(visibility, start_s),
                    "worker_rss": _rss_series(rss)}, notes, spy)


# ---- 3. trickle -----------------------------------------------------------------------------------


def trickle(bench: Bench, requests: int) -> dict:
    """One request at a time: commit, wait for its row, next; commit → visible latency."""
    bench.db.reset()
    poll_s = bench.options.poll_ms / 1000
    latencies_ms: list[float] = []
    with bench.serving() as serve, bench.db.connect() as conn:
        visibility = Visibility(conn)
        meter = bench.cpu_meter(serve, [conn])
        progress = Progress(requests, "trickle")
        meter.start()
        with RssSampler(serve.worker_pids, 0.5) as rss, bench.profiling(serve, "trickle") as spy:
            try:
                for done in range(requests):
                    row_id = conn.execute("select net.http_get(%s)", (bench.fast_url(),)).fetchone()[0]
                    committed_s = now_s()
                    while row_id not in visibility.seen_at_s:
                        visibility.poll()
                        if now_s() - committed_s > bench.options.stall_timeout_s:
                            bench.check_alive(serve)
                            raise Stalled(f"request {row_id} got no response row in "
                                          f"{bench.options.stall_timeout_s:g} s")
                        if row_id not in visibility.seen_at_s:
                            time.sleep(poll_s)
                    latencies_ms.append((visibility.seen_at_s[row_id] - committed_s) * 1000)
                    progress.update(done + 1)
            finally:
                progress.close(len(latencies_ms))
        used = meter.stop()
    latency = latency_summary_ms(latencies_ms)
    figures = {
        "requests": requests,
        **{f"latency_{key}_ms": round(value, 2) for key, value in latency.items() if key != "count"},
        "poll_interval_mean_ms": _round(visibility.resolution_ms()["mean"], 3),
        "suspect_latency_pct": suspect_pct(latencies_ms),
        **cpu_figures(used, requests, rss),
        **response_check(bench.db, 1, requests),
    }
    notes = [f"Each request is one autocommit `select net.http_get(...)`; then the runner polls its row every "
             f"{bench.options.poll_ms} ms (mean gap {figures['poll_interval_mean_ms']} ms, one query round trip "
             f"included): latencies are late by at most about one gap."]
    return make_result("trickle", {"requests": requests}, figures,
                   {"latencies_ms": sorted(round(v, 3) for v in latencies_ms), "worker_rss": _rss_series(rss)},
                   notes, spy)


# ---- 4. head-of-line ------------------------------------------------------------------------------


def head_of_line(bench: Bench, fast: int = 190, slow: int = 10) -> dict:
    """Fast and slow requests in one transaction: are the fast ones visible before the slow ones end?

    Two rounds on the same serve: cold (no connection to the targets yet) and warm (connections kept).
    """
    bench.db.reset()
    slow_url = bench.slow_url(HOL_SLOW_DELAY_MS)
    rounds: dict[str, tuple[list[float], list[float]]] = {}
    with (bench.serving() as serve, bench.db.connect(autocommit=False) as enqueue_conn,
          bench.db.connect() as poll_conn):
        visibility = Visibility(poll_conn)
        meter = bench.cpu_meter(serve, [enqueue_conn, poll_conn])
        meter.start()
        with RssSampler(serve.worker_pids, 0.5) as rss, bench.profiling(serve, "head-of-line") as spy:
            for name in ("cold", "warm"):
                # Slow ones first: they get the lowest ids, so they are claimed first.
                slow_ids = bench.enqueue(enqueue_conn, slow_url, slow)
                fast_ids = bench.enqueue(enqueue_conn, bench.fast_url(), fast)
                enqueue_conn.commit()
                committed_s = now_s()
                wait_for_rows(visibility, visibility.seen_count + fast + slow, bench.options.stall_timeout_s,
                              bench.options.poll_ms / 1000, lambda _: bench.check_alive(serve))
                rounds[name] = (sorted((visibility.seen_at_s[i] - committed_s) * 1000 for i in fast_ids),
                                sorted((visibility.seen_at_s[i] - committed_s) * 1000 for i in slow_ids))
        used = meter.stop()
    figures = {"fast_requests": fast, "slow_requests": slow, "slow_delay_ms": HOL_SLOW_DELAY_MS}
    for name, (fast_ms, slow_ms) in rounds.items():
        figures.update({
            f"{name}_first_fast_visible_ms": round(fast_ms[0], 1),
            f"{name}_p50_fast_visible_ms": round(latency_summary_ms(fast_ms)["p50"], 1),
            f"{name}_last_fast_visible_ms": round(fast_ms[-1], 1),
            f"{name}_first_slow_visible_ms": round(slow_ms[0], 1),
            f"{name}_last_slow_visible_ms": round(slow_ms[-1], 1),
        })
    cold_fast_ms, cold_slow_ms = rounds["cold"]
    figures.update({
        "last_fast_visible_ms": max(figures["cold_last_fast_visible_ms"], figures["warm_last_fast_visible_ms"]),
        "fast_all_visible_before_slow": all(f[-1] < sl[0] for f, sl in rounds.values()),
        "poll_interval_mean_ms": _round(visibility.resolution_ms()["mean"], 3),
        **cpu_figures(used, 2 * (fast + slow), rss),
        **response_check(bench.db, 1, 2 * (fast + slow)),
    })
    notes = [f"{slow} x /delay/{HOL_SLOW_DELAY_MS} (Python server) then {fast} x /fast in one transaction, twice on "
             f"one serve: cold (connections to open) then warm; times from COMMIT returned to the poll that saw the "
             f"row (polls every {bench.options.poll_ms} ms). last_fast_visible_ms is the worse round."]
    return make_result("head-of-line", {"fast": fast, "slow": slow}, figures,
                   {"fast_visible_ms": [round(v, 2) for v in cold_fast_ms],
                    "slow_visible_ms": [round(v, 2) for v in cold_slow_ms],
                    "warm_fast_visible_ms": [round(v, 2) for v in rounds["warm"][0]],
                    "warm_slow_visible_ms": [round(v, 2) for v in rounds["warm"][1]]},
                   notes, spy)


# ---- 5. drain ------------------------------------------------------------------------------------


def drain(bench: Bench, requests: int) -> dict:
    """Pre-fill the queue with serve stopped, then start it: drain rate and worker RSS over time."""
    bench.db.reset()
    progress = Progress(requests, "pre-fill")
    enqueue_started_s = now_s()
    with bench.db.connect(autocommit=False) as conn:
        done = 0
        while done < requests:
            done += len(bench.enqueue(conn, bench.fast_url(), min(bench.options.txn_rows, requests - done)))
            conn.commit()
            progress.update(done)
    progress.close(done)
    enqueue_s = now_s() - enqueue_started_s
    samples: list[tuple[float, int]] = [(0.0, 0)]
    with bench.db.connect() as poll_conn:
        visibility = Visibility(poll_conn, keep_times=False)
        with bench.serving(wait=False) as serve:
            meter = bench.cpu_meter(serve, [poll_conn])
            meter.start(fresh={"workers", "worker_backends"})
            started_s = serve.started_s
            progress = Progress(requests, "drain")

            def on_poll(now: float) -> None:
                bench.check_alive(serve)
                progress.update(visibility.seen_count)
                samples.append((round(visibility.poll_starts_s[-1] - started_s, 3), visibility.seen_count))

            with RssSampler(serve.worker_pids, 1.0, origin_s=started_s) as rss, \
                    bench.profiling(serve, "drain") as spy:
                try:
                    last_s = wait_for_rows(visibility, requests, bench.options.stall_timeout_s,
                                           lambda missing: _drain_poll_s(missing, requests), on_poll)
                finally:
                    progress.close(visibility.seen_count)
            used = meter.stop()
    duration_s = last_s - started_s
    first_seen_s = next((t for t, n in samples if n > 0), None)
    rss_figures = _rss_flatness(rss, samples, requests)
    figures = {
        "requests": requests,
        "drain_s": round(duration_s, 2),
        "drain_rate_per_s": round(requests / duration_s, 1),
        "first_response_after_start_s": first_seen_s,
        "drain_rate_after_first_response_per_s":
            round(requests / (duration_s - first_seen_s), 1) if first_seen_s is not None else None,
        "prefill_s": round(enqueue_s, 1),
        **rss_figures,
        **cpu_figures(used, requests, rss),
        **response_check(bench.db, 1, requests),
    }
    notes = ["Queue pre-filled with serve stopped; the clock starts when `pgnet-curl serve` is spawned "
             "(process start-up included). Rows visible polled every second (100 ms before the first row, "
             "10 ms for the last 1%); worker RSS sampled every second."]
    return make_result("drain", {"requests": requests}, figures,
                   {"visible_over_time": samples, "worker_rss": _rss_series(rss)}, notes, spy)


def _drain_poll_s(missing: int, requests: int) -> float:
    """Poll every second, but every 100 ms before the first row and every 10 ms for the last 1%."""
    if missing >= requests:
        return 0.1
    return 0.01 if missing <= requests * 0.01 else 1.0


def _rss_flatness(rss: RssSampler, samples: list[tuple[float, int]], requests: int) -> dict:
    """RSS per worker when 10% was drained, at most, at the end: flat if it grew < 10 MB after 10%."""
    tenth_s = next((t for t, n in samples if n >= requests * 0.1), 0.0)
    growth_mb, at_tenth_mb, end_mb = [], [], []
    for points in rss.series.values():
        after = [value for t, value in points if t >= tenth_s]
        if not after:
            continue
        at_tenth_mb.append(after[0] / 2**20)
        end_mb.append(after[-1] / 2**20)
        growth_mb.append((max(after) - after[0]) / 2**20)
    if not growth_mb:
        return {}
    return {
        "worker_rss_at_10pct_mb": [round(v, 1) for v in at_tenth_mb],
        "worker_rss_end_mb": [round(v, 1) for v in end_mb],
        "worker_rss_growth_after_10pct_mb": round(max(growth_mb), 1),
        "worker_rss_flat": max(growth_mb) < 10,
    }


def _rss_series(rss: RssSampler | None) -> dict:
    if rss is None:
        return {}
    return {str(pid): [(t, round(value / 2**20, 2)) for t, value in points] for pid, points in rss.series.items()}


def _visible_over_time(visibility: Visibility, origin_s: float, step_s: float = 0.1) -> list[tuple[float, int]]:
    """Rows visible over time, one point per step, from the per-id visibility times."""
    times = sorted(visibility.seen_at_s.values())
    points, count, next_s = [], 0, origin_s
    for t in times:
        while t > next_s:
            points.append((round(next_s - origin_s, 3), count))
            next_s += step_s
        count += 1
    points.append((round(times[-1] - origin_s, 3) if times else 0.0, count))
    return points


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ---- 6. per-destination limits ----------------------------------------------------------------------

LIMITED_HOST = "127.0.0.2"
LIMITS_POLL_S = 0.01
PROBE_INTERVAL_S = 1.0
PROBES_PER_INTERVAL = 5


def limits(bench: Bench, requests: int, backlog: int, rate_per_s: float, burst: float | None) -> dict:
    """Cost of per-destination limits, then a backlog to one host limited to rate_per_s.

    Cost: throughput of `requests` with no limit table, with a table limiting another host only,
    and with a limit on the target host itself that never binds (every request takes a token and
    a concurrency slot). Backlog (skipped when 0): `backlog` requests to a second loopback host
    limited to rate_per_s, committed at once; its pace, its busiest 1 s window, and the
    commit -> visible latency of requests to the target host meanwhile.
    """
    runs = {}
    target_host = urlsplit(bench.target.url).hostname
    for label, row in (("no_table", None), ("other_host_limited", ("limits.example.com", 1, 1)),
                       ("target_limited_not_binding", (target_host, 1_000_000, 1e9))):
        _set_limits(bench, [row] if row else [])
        runs[label] = throughput(bench, requests)["figures"]
    _set_limits(bench, [])
    figures = {}
    for label, run in runs.items():
        figures[f"{label}_rate_per_s"] = run["rate_per_s"]
        figures[f"{label}_cpu_us_per_request"] = run["cpu_us_per_request"]
        figures[f"{label}_database_cpu_us_per_request"] = run["database_total_cpu_us_per_request"]
    series = {}
    if backlog:
        backlog_figures, series = _limited_backlog(bench, backlog, rate_per_s, burst)
        figures.update(backlog_figures)
    notes = [f"Cost: the throughput scenario ({requests:,} requests, cold start) three times: no row in "
             f"net.destination_limits (the plain claim), a row for another host (the limited claim, this host "
             f"unlimited), and a row for this host that never binds (a token and a lease row per request).",
             f"Backlog: {backlog:,} requests to {LIMITED_HOST} (an in-process loopback server recording arrival "
             f"times) limited to {rate_per_s:g}/s, burst {burst if burst else 'default'}; every "
             f"{PROBE_INTERVAL_S:g} s {PROBES_PER_INTERVAL} requests to the target host, their commit -> visible "
             f"latency polled every {LIMITS_POLL_S * 1000:.0f} ms. Windows are [t, t + 1 s) starting at each arrival."]
    return make_result("limits", {"requests": requests, "backlog": backlog, "rate_per_s": rate_per_s,
                                  "burst": burst}, figures, series, notes)


def _set_limits(bench: Bench, rows: list[tuple]) -> None:
    with bench.db.connect() as conn:
        conn.execute("delete from net.destination_limits")
        for pattern, concurrent, rate in rows:
            conn.execute("insert into net.destination_limits(host_pattern, max_concurrent, max_per_second) "
                         "values (%s, %s, %s)", (pattern, concurrent, rate))


def _limited_backlog(bench: Bench, backlog: int, rate_per_s: float, burst: float | None) -> tuple[dict, dict]:
    """Queue a backlog to a rate-limited host; measure its pace and other hosts' latency meanwhile."""
    sys.path.insert(0, str(HTTP_SERVER_SCRIPT.parent))
    from http_server import HttpTestServer

    bench.db.reset()
    with bench.db.connect() as conn:
        conn.execute("insert into net.destination_limits(host_pattern, max_per_second, burst) values (%s, %s, %s)",
                     (LIMITED_HOST, rate_per_s, burst))
    probe_latencies_ms: list[float] = []
    with (HttpTestServer(LIMITED_HOST, log_size=backlog) as limited_server, bench.serving() as serve,
          bench.db.connect(autocommit=False) as enqueue_conn, bench.db.connect() as poll_conn):
        limited_url = limited_server.url_for("/fast")
        ids = bench.enqueue(enqueue_conn, limited_url, backlog)
        meter = bench.cpu_meter(serve, [enqueue_conn, poll_conn])
        meter.start()
        enqueue_conn.commit()
        committed_s = now_s()
        progress = Progress(backlog, "limits")
        probes: dict[int, float] = {}
        next_probe_s = committed_s + PROBE_INTERVAL_S / 2
        deadline_s = committed_s + backlog / rate_per_s * 2 + bench.options.stall_timeout_s
        done = 0
        try:
            while done < backlog or probes:
                now = now_s()
                if now > deadline_s:
                    raise Stalled(f"{done:,} of {backlog:,} limited responses after {now - committed_s:.0f} s")
                bench.check_alive(serve)
                if now >= next_probe_s and done < backlog:
                    for probe_id in bench.enqueue(enqueue_conn, bench.fast_url(), PROBES_PER_INTERVAL):
                        probes[probe_id] = None
                    enqueue_conn.commit()
                    sent_s = now_s()
                    probes = {probe_id: sent_s if at is None else at for probe_id, at in probes.items()}
                    next_probe_s += PROBE_INTERVAL_S
                if probes:
                    seen = poll_conn.execute("select id from net._http_response where id = any(%s)",
                                             (list(probes),)).fetchall()
                    for (probe_id,) in seen:
                        probe_latencies_ms.append((now - probes.pop(probe_id)) * 1000)
                done = poll_conn.execute("select count(*) from net._http_response where id between %s and %s",
                                         (ids[0], ids[-1])).fetchone()[0]
                progress.update(done)
                time.sleep(LIMITS_POLL_S)
        finally:
            progress.close(done)
        used = meter.stop()
        arrivals_s = sorted(entry["at_s"] for entry in limited_server.requests if entry["path"] == "/fast")
    effective_burst = burst if burst else max(1.0, rate_per_s / 10)
    span_s = arrivals_s[-1] - arrivals_s[0] if len(arrivals_s) > 1 else 0.0
    windows = _window_counts(arrivals_s)
    probe = latency_summary_ms(probe_latencies_ms)
    figures = {
        "backlog_requests": backlog,
        "backlog_arrived": len(arrivals_s),
        "backlog_first_to_last_arrival_s": round(span_s, 2),
        "backlog_expected_s": round((backlog - effective_burst) / rate_per_s, 2),
        "backlog_achieved_rate_per_s": round((len(arrivals_s) - effective_burst) / span_s, 2) if span_s else None,
        "backlog_burst": effective_burst,
        "backlog_most_in_1s_window": max(windows, default=0),
        "backlog_windows_over_rate": sum(count > rate_per_s for count in windows),
        "backlog_windows_over_rate_plus_burst": sum(count > rate_per_s + effective_burst for count in windows),
        # After the first second the full bucket's burst is spent: the steady pace.
        "backlog_most_in_1s_window_after_first_s": max(
            (count for t, count in zip(arrivals_s, windows) if t >= arrivals_s[0] + 1.0), default=0),
        **{f"other_host_latency_{key}_ms": round(value, 2) for key, value in probe.items()
           if key in ("p50", "p95", "max")},
        "other_host_probes": probe.get("count", 0),
        **cpu_figures(used, backlog, None),
    }
    return figures, {"arrivals_per_s": _per_second(arrivals_s)}


def _window_counts(times_s: list[float], window_s: float = 1.0) -> list[int]:
    """Arrivals in [t, t + window_s) for each arrival t (times sorted)."""
    counts, end = [], 0
    for start, t in enumerate(times_s):
        while end < len(times_s) and times_s[end] < t + window_s:
            end += 1
        counts.append(end - start)
    return counts


def _per_second(times_s: list[float]) -> list[tuple[int, int]]:
    if not times_s:
        return []
    buckets: dict[int, int] = {}
    for t in times_s:
        second = int(t - times_s[0])
        buckets[second] = buckets.get(second, 0) + 1
    return sorted(buckets.items())


# ---- 7. faults ------------------------------------------------------------------------------------


def faults(bench: Bench, rate_per_s: float, steady_s: float) -> dict:
    """tests/chaos.py's long run: a killed worker, a PostgreSQL crash, a dropped network and a
    killed serve under a sustained rate; lost, doubled, re-sent and recovery time per fault."""
    if bench.db.embedded is None:
        raise BenchError("faults crashes PostgreSQL: it needs the bench's embedded cluster (no --dsn)")
    sys.path.insert(0, str(HTTP_SERVER_SCRIPT.parent))
    from chaos import LONG, Chaos

    serve_args = tuple(part for flag, value in bench.options.serve_flags.items()
                       for part in (f"--{flag.replace('_', '-')}", str(value)))
    plan = dataclasses.replace(LONG, rate_per_s=rate_per_s, steady_s=steady_s, workers=bench.options.workers,
                               serve_args=serve_args)
    bench.db.reset()
    try:
        report = Chaos(bench.db.embedded, bench.db.dsn, bench.work_dir, plan,
                       say=lambda line: print(f"  {line}", file=sys.stderr, flush=True)).run()
    except (RuntimeError, AssertionError) as exc:  # the run's own failures: a start, a stalled load
        raise BenchError(f"the chaos run stopped: {exc}") from exc
    notes = [f"{plan.rate_per_s:g} requests/s (POST, idempotency key) to a loopback receiver answering in "
             f"{plan.answer_delay_ms} ms, after a burst of {plan.burst_per_worker} per worker; in turn, "
             f"{plan.steady_s:g} s apart: {', '.join(plan.faults)} (network: {plan.drop_s:g} s of silence). "
             f"Timeout {plan.timeout_ms} ms, --lease-grace {plan.lease_grace_s:g}. Recovery: from the fault "
             f"until every request committed before it has a response row. Duplicates are deliveries beyond "
             f"a request's first, counted against the fault before them.",
             *report.lines(), *(f"PROBLEM: {problem}" for problem in report.problems())]
    return make_result("faults", {"rate_per_s": rate_per_s, "steady_s": steady_s}, report.figures(), notes=notes)
