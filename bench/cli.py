"""`python -m bench <scenario> [options]`: set up, run scenarios, print, save, always clean up."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import psycopg

from pgnet_curl.errors import PgnetCurlError

from . import circuit, context, ordering, report, scenarios
from .args import DEFAULT_RESULTS_DIR, raise_interrupt, serve_flags
from .measure import Stalled, wait_for_quiet
from .runner import REPO_DIR, BenchError, Database, make_target, make_work_dir



def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("setup")
    group.add_argument("--dsn", help="admin DSN of an existing PostgreSQL (the bench creates and drops a "
                                     "database pgnet_bench_<pid> there); default: a fresh embedded cluster")
    group.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="serve --workers (default: nproc)")
    group.add_argument("--max-inflight", type=int, help="serve --max-inflight")
    group.add_argument("--batch-size", type=int, help="serve --batch-size")
    group.add_argument("--serve-arg", action="append", default=[], metavar="FLAG=VALUE",
                       help="any other serve flag, e.g. write-batch-size=1000 (repeatable)")
    group.add_argument("--unlogged", action="store_true",
                       help="install the net tables unlogged, as pg_net's (default: logged, the default install)")
    group.add_argument("--target", choices=["python", "nginx"], default="python",
                       help="HTTP server answering /fast (slow requests always use the Python server)")
    group = common.add_argument_group("measurement")
    group.add_argument("--poll-ms", type=float, default=1.0,
                       help="pause between visibility polls in latency scenarios (default 1 ms)")
    group.add_argument("--stall-timeout-s", type=float, default=60.0,
                       help="abort when no response row appears for this long (default 60 s)")
    group.add_argument("--txn-rows", type=int, default=20_000, help="requests per enqueue statement (default 20,000)")
    group.add_argument("--delivery", choices=sorted(context.ENQUEUE_SQL), default="plain",
                       help="how requests are made: pg_net's net.http_get (plain), or net.http_request with "
                            "max_retries, a notify_channel or a signing key (default plain)")
    group.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                       help="before each scenario wait up to this long for the machine to be < 15%% busy")
    group.add_argument("--profile", nargs="?", const="cpu", choices=["cpu", "wall", "native"],
                       help="sample the workers with py-spy while the load runs: CPU only (default), wall "
                            "clock (waits included) or native (C frames too); perturbs the figures")
    group = common.add_argument_group("output")
    group.add_argument("--json", type=Path, help="write the results here instead of bench/results/<scenario>-<time>.json")
    group.add_argument("--plot", action="store_true", help="draw PNGs into bench/results/")
    group.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR, help=argparse.SUPPRESS)
    group.add_argument("--keep-work-dir", action="store_true", help="keep the temporary cluster and logs")
    return common


def summary(paths: list[str]) -> None:
    """Print saved results (JSON files) as markdown tables."""
    import json

    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        results.extend(data if isinstance(data, list) else [data])
    print(report.markdown_summary(results), end="")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="scenario")
    common = [_common_options()]
    p = sub.add_parser("throughput", parents=common, help="N requests committed at once: req/s to all visible")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=0, help="requests sent through serve first, unmeasured")
    p = sub.add_parser("sustained", parents=common, help="steady offered rate: achieved rate and latency")
    p.add_argument("--rate", type=float, default=500.0, help="requests per second offered (default 500)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--enqueuers", type=int, default=2, help="enqueuing connections (default 2)")
    p = sub.add_parser("trickle", parents=common, help="one request at a time: commit -> visible latency")
    p.add_argument("--requests", type=int, default=200)
    p = sub.add_parser("head-of-line", parents=common, help="190 fast + 10 slow (2 s) in one transaction")
    p.add_argument("--fast", type=int, default=190)
    p.add_argument("--slow", type=int, default=10)
    p = sub.add_parser("drain", parents=common, help="pre-filled queue: drain rate and worker RSS over time")
    p.add_argument("--requests", type=int, default=1_000_000)
    p = sub.add_parser("limits", parents=common, help="cost of per-destination limits; a backlog to one rate-limited host")
    p.add_argument("--requests", type=int, default=20_000, help="for the cost runs (default 20,000)")
    p.add_argument("--backlog", type=int, default=20_000, help="requests to the limited host (default 20,000; 0: skip)")
    p.add_argument("--rate", type=float, default=100.0, help="its limit, requests per second (default 100)")
    p.add_argument("--burst", type=float, help="its bucket size (default: the table's, max(1, rate / 10))")
    p = sub.add_parser("ordering", parents=common,
                       help="ordered delivery: throughput beside unordered, arrival order per key, one key's pace")
    p.add_argument("--keys", type=int, default=10_000, help="ordering keys (default 10,000)")
    p.add_argument("--per-key", type=int, default=10, help="requests per key (default 10)")
    p.add_argument("--single", type=int, default=1_000, help="requests of the one-key run (default 1,000)")
    p.add_argument("--delay-ms", type=int, default=1, help="its receiver's answer delay (default 1 ms)")
    p.add_argument("--rounds", type=int, default=3, help="unordered / ordered pairs, alternating (default 3)")
    p = sub.add_parser("circuit", parents=common,
                       help="a destination down for a while under load: what reaches it, the other host's latency")
    p.add_argument("--rate", type=float, default=500.0, help="requests per second to each host (default 500)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load (default 40)")
    p.add_argument("--down-at", type=float, default=5.0, help="seconds into the load it goes down (default 5)")
    p.add_argument("--down-for", type=float, default=30.0, help="seconds it stays down (default 30)")
    p = sub.add_parser("faults", parents=common,
                       help="a killed worker, a PostgreSQL crash, a dropped network, a killed serve, under load")
    p.add_argument("--rate", type=float, default=2000.0, help="requests per second offered (default 2,000)")
    p.add_argument("--steady-s", type=float, default=10.0, help="seconds of load between faults (default 10)")
    sub.add_parser("summary", help="print saved JSON results as markdown tables: summary FILE...")
    sub.add_parser("compare", help="throughput of the working tree against a revision, rounds alternating: "
                                   "compare BASE [options] (see compare --help)")
    p = sub.add_parser("all", parents=common, help="throughput, sustained, trickle and head-of-line in sequence")
    p.add_argument("--requests", type=int, default=20_000, help="for throughput (default 20,000)")
    p.add_argument("--rate", type=float, default=500.0, help="for sustained (default 500)")
    p.add_argument("--duration", type=float, default=10.0, help="for sustained (default 10)")
    p.add_argument("--enqueuers", type=int, default=2)
    p.add_argument("--trickle-requests", type=int, default=200)
    args = parser.parse_args(argv)
    for value in ("requests", "rate", "duration", "workers", "txn_rows"):
        if getattr(args, value, 1) is not None and getattr(args, value, 1) <= 0:
            parser.error(f"--{value.replace('_', '-')} must be positive")
    return args


def _plan(args: argparse.Namespace) -> list[tuple[str, callable]]:
    """The scenarios to run, as (name, function of the Bench)."""
    runs = {
        "throughput": lambda b: scenarios.throughput(b, args.requests, getattr(args, "warmup", 0)),
        "sustained": lambda b: scenarios.sustained(b, args.rate, args.duration),
        "trickle": lambda b: scenarios.trickle(b, getattr(args, "trickle_requests", None) or args.requests),
        "head-of-line": lambda b: scenarios.head_of_line(b, getattr(args, "fast", 190), getattr(args, "slow", 10)),
        "drain": lambda b: scenarios.drain(b, args.requests),
        "limits": lambda b: scenarios.limits(b, args.requests, args.backlog, args.rate, args.burst),
        "faults": lambda b: scenarios.faults(b, args.rate, args.steady_s),
        "ordering": lambda b: ordering.ordering(b, args.keys, args.per_key, args.single, args.delay_ms, args.rounds),
        "circuit": lambda b: circuit.circuit(b, args.rate, args.duration, args.down_at, args.down_for),
    }
    names = ["throughput", "sustained", "trickle", "head-of-line"] if args.scenario == "all" else [args.scenario]
    return [(name, runs[name]) for name in names]


def _emit(result: dict, args: argparse.Namespace, basename: str) -> None:
    """Print the result's table; save its JSON (unless --json gathers them) and its plot."""
    print(report.table(result), flush=True)
    if not args.json:
        print(f"  json: {report.write_json(result, args.results_dir / f'{basename}.json')}", flush=True)
    if args.plot:
        png = report.plot(result, args.results_dir / f"{basename}.png")
        if png:
            print(f"  plot: {png}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen scenarios; exit 0 when all ran (targets met or not), 1 on a failure, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        summary(argv[1:])
        return
    if argv[:1] == ["compare"]:
        from . import compare

        compare.main(argv[1:])
        return
    args = parse_args(argv)
    # The runner's threads (enqueuers, poller) hand the GIL over quickly: timestamps stay close to events.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_interrupt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    options = context.Options(
        workers=args.workers, serve_flags=serve_flags(args), target=args.target, poll_ms=args.poll_ms,
        stall_timeout_s=args.stall_timeout_s, txn_rows=args.txn_rows, enqueuers=getattr(args, "enqueuers", 2),
        profile=args.profile, results_dir=args.results_dir, delivery=args.delivery,
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    machine = report.machine_info()
    code = report.code_version(REPO_DIR)
    work_dir = make_work_dir()
    db = Database(args.dsn, work_dir, statement_timeout_s=max(120.0, 2 * args.stall_timeout_s),
                  unlogged=args.unlogged)
    target = make_target(args.target, work_dir)
    bench = None
    results, failures = [], 0
    try:
        print(f"setting up: {'PostgreSQL at --dsn' if args.dsn else 'embedded PostgreSQL (fsync on)'}, "
              f"{args.target} target, {args.workers} workers ...", file=sys.stderr, flush=True)
        db.start()
        target.start()
        bench = context.Bench(options, db, target, work_dir, stamp)
        for name, run in _plan(args):
            busy_before_pct = wait_for_quiet(args.wait_quiet) if args.wait_quiet else None
            try:
                result = run(bench)
            except (Stalled, BenchError, PgnetCurlError, psycopg.Error) as exc:
                failures += 1
                print(f"\n== {name} == ABORTED: {exc}", flush=True)
                if not isinstance(exc, (Stalled, BenchError)):
                    traceback.print_exc()
                continue
            result.update({
                "settings": {"workers": args.workers, **options.serve_flags, "target": args.target,
                             "tables": "unlogged" if args.unlogged else "logged",
                             "postgres": f"--dsn (server {db.server_version})" if args.dsn
                             else f"embedded {db.server_version}, fsync on"},
                "machine": {**machine, "busy_before_pct": busy_before_pct},
                "code": code,
                "started_at": stamp,
                "command": "python -m bench " + " ".join(argv),
            })
            result["targets"] = report.check_targets(result)
            results.append(result)
            _emit(result, args, f"{name}-{stamp}")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", file=sys.stderr, flush=True)
        failures = -1
    except (BenchError, PgnetCurlError, psycopg.Error) as exc:
        print(f"bench: {exc}", file=sys.stderr, flush=True)
        failures += 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if bench is not None:
            bench.close()
        target.stop()
        db.stop()
        if args.keep_work_dir:
            print(f"work dir kept: {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.json and results:
        report.write_json(results[0] if len(results) == 1 and args.scenario != "all" else results, args.json)
        print(f"json: {args.json}")
    sys.exit(130 if failures < 0 else 1 if failures else 0)
