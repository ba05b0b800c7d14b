"""`python -m bench ordering`: ordered delivery per key beside unordered requests, the arrival order
at the receiver, and the pace of one key alone.

1. keys x per_key requests committed at once, key i % keys for the i-th, first without an ordering
   key and then with one, each to an nginx that logs every request URI in the order it answers:
   the throughput of both, and for each key whether the receiver saw its requests in id order.
2. `single` requests of one key to a receiver answering in delay_ms: claim, send, write-back and
   the next claim, one request at a time; its rate.
"""

from __future__ import annotations

import re
import statistics

from .context import Bench, cpu_figures, make_result, response_check
from .measure import Progress, Visibility, now_s, wait_for_rows
from .runner import NginxTarget

# The i-th request goes to key i % keys, with n = i in its URL (ids follow i: one statement).
_BURST_SQL = ("select net.http_request('GET', %(url)s || '?k=' || (i %% %(keys)s) || '&n=' || i{ordering}) "
              "from generate_series(0, %(requests)s - 1) as i")
_ORDERING_ARG = ", ordering_key => 'k' || (i %% %(keys)s)"
_LOGGED = re.compile(r"k=(\d+)&n=(\d+)")
POLL_S = 0.005


_MEDIANS = ("rate_per_s", "commit_to_all_visible_s", "cpu_us_per_request", "worker_process_cpu_us_per_request",
            "worker_backend_cpu_us_per_request", "other_processes_cpu_pct")


def ordering(bench: Bench, keys: int, per_key: int, single: int, delay_ms: int, rounds: int = 1) -> dict:
    requests = keys * per_key
    runs: dict[str, list[dict]] = {"unordered": [], "ordered": []}
    # Alternated, as bench compare does: the machine's other load falls on both sides alike.
    for round_no in range(1, rounds + 1):
        for label, ordered in (("unordered", False), ("ordered", True)):
            runs[label].append(_burst(bench, requests, keys, ordered, f"{label}-{round_no}"))
    single_figures = _one_key(bench, single, delay_ms) if single else {}
    medians = {label: {name: statistics.median(run[name] for run in done) for name in _MEDIANS}
               for label, done in runs.items()}
    plain, keyed = medians["unordered"], medians["ordered"]
    figures = {
        "requests": requests, "keys": keys, "rounds": rounds,
        **{f"{label}_{name}": value for label, run in medians.items() for name, value in run.items()},
        **{f"{label}_rates_per_s": [run["rate_per_s"] for run in done] for label, done in runs.items()},
        "ordered_rate_vs_unordered": round(keyed["rate_per_s"] / plain["rate_per_s"], 3),
        "ordered_cpu_vs_unordered": round(keyed["cpu_us_per_request"] / plain["cpu_us_per_request"], 3),
        "responses_2xx": min(run["responses_2xx"] for done in runs.values() for run in done),
        "arrivals_logged": sum(run["arrivals"] for run in runs["ordered"]),
        "keys_out_of_order": sum(run["keys_out_of_order"] for run in runs["ordered"]),
        "requests_out_of_order": sum(run["requests_out_of_order"] for run in runs["ordered"]),
        **single_figures,
    }
    notes = [f"{rounds} round(s), unordered and ordered alternating; figures are medians. "
             f"{requests:,} net.http_request() calls in one statement and one COMMIT (request i to key i % {keys:,}, "
             f"so ids follow each key's order), to an nginx (1 worker) logging each request URI as it answers; "
             f"commit -> all visible, cold start. Unordered: the same calls without ordering_key.",
             "Order: for each key, the n of its requests (n = i, so id order) in the receiver's log order; "
             "a key is out of order when one n is below an earlier one.",
             f"One key: {single:,} requests with one ordering_key to the Python test server's /delay/{delay_ms}; "
             f"commit -> all visible, and the responses' stored order."]
    return make_result("ordering", {"keys": keys, "per_key": per_key, "single": single, "delay_ms": delay_ms,
                                    "rounds": rounds},
                       figures, {}, notes)


def _burst(bench: Bench, requests: int, keys: int, ordered: bool, name: str) -> dict:
    """Commit `requests` at once (ordered or not) to a logging nginx; throughput, CPU, arrival order."""
    bench.db.reset()
    target = NginxTarget(bench.work_dir, name=f"nginx-{name}", log_requests=True)
    target.start()
    try:
        with (bench.serving() as serve, bench.db.connect(autocommit=False) as enqueue_conn,
              bench.db.connect() as poll_conn):
            visibility = Visibility(poll_conn, keep_times=False)
            meter = bench.cpu_meter(serve, [enqueue_conn, poll_conn])
            started_s = now_s()
            enqueue_conn.execute(_BURST_SQL.format(ordering=_ORDERING_ARG if ordered else ""),
                                 {"url": f"{target.url}/fast", "keys": keys, "requests": requests})
            enqueue_s = now_s() - started_s
            meter.start()
            enqueue_conn.commit()
            committed_s = now_s()
            progress = Progress(requests, "ordered" if ordered else "unordered")

            def on_poll(_now: float) -> None:
                bench.check_alive(serve)
                progress.update(visibility.seen_count)

            try:
                last_s = wait_for_rows(visibility, requests, bench.options.stall_timeout_s, POLL_S, on_poll)
            finally:
                progress.close(visibility.seen_count)
            used = meter.stop()
    finally:
        target.stop()
    duration_s = last_s - committed_s
    return {"rate_per_s": round(requests / duration_s, 1), "commit_to_all_visible_s": round(duration_s, 3),
            "enqueue_s": round(enqueue_s, 2), **cpu_figures(used, requests, None),
            **response_check(bench.db, 1, requests), **_order_check(target)}


def _order_check(target: NginxTarget) -> dict:
    """Per key, whether the receiver logged its requests in increasing n (id) order."""
    last_n: dict[int, int] = {}
    arrivals = inversions = 0
    bad_keys: set[int] = set()
    for line in target.access_log_path.read_text().splitlines():
        match = _LOGGED.search(line)
        if not match:
            continue
        arrivals += 1
        key, n = int(match.group(1)), int(match.group(2))
        if n < last_n.get(key, -1):
            inversions += 1
            bad_keys.add(key)
        last_n[key] = max(n, last_n.get(key, -1))
    return {"arrivals": arrivals, "keys_out_of_order": len(bad_keys), "requests_out_of_order": inversions}


def _one_key(bench: Bench, requests: int, delay_ms: int) -> dict:
    """One key's requests to a receiver answering in delay_ms: the pace of claim -> send -> write-back -> claim."""
    bench.db.reset()
    url = bench.slow_url(delay_ms)
    with (bench.serving() as serve, bench.db.connect(autocommit=False) as enqueue_conn,
          bench.db.connect() as poll_conn):
        visibility = Visibility(poll_conn, keep_times=False)
        ids = [row[0] for row in enqueue_conn.execute(
            "select net.http_request('GET', %s, ordering_key => 'the-one-key') from generate_series(1, %s)",
            (url, requests)).fetchall()]
        meter = bench.cpu_meter(serve, [enqueue_conn, poll_conn])
        meter.start()
        enqueue_conn.commit()
        committed_s = now_s()
        last_s = wait_for_rows(visibility, requests, bench.options.stall_timeout_s, POLL_S,
                               lambda _now: bench.check_alive(serve))
        used = meter.stop()
        stored = [row[0] for row in poll_conn.execute(
            "select id from net._http_response where id = any(%s) order by created, id", (ids,)).fetchall()]
    duration_s = last_s - committed_s
    cpu = cpu_figures(used, requests, None)
    return {"one_key_requests": requests, "one_key_delay_ms": delay_ms,
            "one_key_rate_per_s": round(requests / duration_s, 1),
            "one_key_commit_to_all_visible_s": round(duration_s, 3),
            "one_key_stored_in_id_order": stored == sorted(ids),
            "one_key_cpu_us_per_request": cpu["cpu_us_per_request"],
            **{f"one_key_{k}": v for k, v in response_check(bench.db, ids[0], ids[-1]).items()}}
