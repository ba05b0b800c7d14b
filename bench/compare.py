"""`python -m bench compare BASE`: the throughput scenario on two revisions, alternately, as ratios.

On a shared machine a figure from another day proves nothing: both sides here share one
PostgreSQL, one target and the settings, their rounds interleave, and each figure is given as
head / base.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import psycopg

from pgnet_curl.errors import PgnetCurlError

from . import context, report, revision, scenarios
from .args import DEFAULT_RESULTS_DIR, raise_interrupt, serve_flags
from .measure import Stalled, wait_for_quiet
from .runner import BenchError, Database, make_target, make_work_dir

# The table's rows: (label, key of a round's figures, decimals).
FIGURES = [
    ("req/s", "rate_per_s", 0),
    ("CPU µs/request: workers + their database sessions", "cpu_us_per_request", 1),
    ("– worker processes", "worker_process_cpu_us_per_request", 1),
    ("– worker database sessions", "worker_backend_cpu_us_per_request", 1),
    ("enqueue µs per net.http_get call", "enqueue_us_per_call", 2),
]
READING = ("head / base: above 1 for req/s is faster, below 1 for µs is cheaper; a ratio within the rounds' "
           "own spread is no change.")
# Above this share of the machine taken by other processes in a round, the table says so.
NOISY_PCT = 15.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.splitlines()[0])
    parser.add_argument("base", metavar="BASE", help="git revision to compare against (main, a sha, a tag)")
    parser.add_argument("--head", metavar="REV", help="build this revision as the head side instead of "
                                                      "serving the working tree as it is")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating (default 3)")
    parser.add_argument("--requests", type=int, default=20_000, help="committed at once per round (default 20,000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="serve --workers (default: nproc)")
    parser.add_argument("--target", choices=["nginx", "python"], default="nginx", help="HTTP server (default nginx)")
    parser.add_argument("--dsn", help="admin DSN of an existing PostgreSQL (a scratch database per side is created "
                                      "and dropped there); default: one embedded cluster, fsync on")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG=VALUE",
                        help="a serve flag for both sides, e.g. write-batch-size=1000 (repeatable)")
    parser.add_argument("--stall-timeout-s", type=float, default=60.0,
                        help="abort when no response row appears for this long (default 60 s)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each round wait up to this long for the machine to be < 15%% busy")
    parser.add_argument("--head-alongside", choices=sorted(context.ALONGSIDE_SQL),
                        help="on the head side only, a feature set up for other requests (a limit row for another "
                             "host, a signing key, 1 %% of requests with a SQL callback): with BASE = --head = the "
                             "same revision, what the feature costs the requests that do not use it")
    parser.add_argument("--head-delivery", choices=sorted(context.ENQUEUE_SQL), default="plain",
                        help="on the head side only, how requests are made: net.http_request with max_retries, a "
                             "notify_channel or a signing key instead of net.http_get: with BASE = --head = the same "
                             "revision, what that option costs the requests that use it")
    parser.add_argument("--json", type=Path, help="default: bench/results/compare-<time>.json")
    args = parser.parse_args(argv)
    for name in ("rounds", "requests", "workers"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    return args


def run_rounds(benches: dict[str, context.Bench], sides: dict[str, revision.Side], rounds: int,
               requests: int, wait_quiet_s: float = 0.0) -> dict[str, list[dict]]:
    """Run throughput on each side in turn, rounds times; a failed or incomplete round aborts all."""
    figures: dict[str, list[dict]] = {name: [] for name in benches}
    for number in range(1, rounds + 1):
        for name, bench in benches.items():
            where = f"round {number}/{rounds}, {name} {sides[name].label()}"
            print(f"{where} ...", file=sys.stderr, flush=True)
            busy_before_pct = wait_for_quiet(wait_quiet_s) if wait_quiet_s else None
            try:
                found = scenarios.throughput(bench, requests)["figures"]
            except (Stalled, BenchError, PgnetCurlError, psycopg.Error) as exc:
                raise BenchError(f"{where}: {exc}") from exc
            if found["responses_2xx"] != requests:
                raise BenchError(f"{where}: {found['responses_2xx']:,} of {requests:,} responses are 2xx "
                                 f"(e.g. {found['sample_failure']!r})")
            found["enqueue_us_per_call"] = round(1e6 / found["enqueue_rate_per_s"], 2)
            found["busy_before_pct"] = busy_before_pct
            figures[name].append(found)
            print(f"{where}: {found['rate_per_s']:,.0f} req/s, {found['cpu_us_per_request']} µs/request",
                  file=sys.stderr, flush=True)
    return figures


def median(rounds: list[dict], key: str) -> float | None:
    values = [found[key] for found in rounds if found.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(head: float | None, base: float | None) -> float | None:
    return None if head is None or not base else round(head / base, 3)


def summarize(sides: dict[str, dict]) -> dict:
    """Add each side's medians; return head / base of every figure."""
    for side in sides.values():
        side["median"] = {key: median(side["rounds"], key) for _, key, _ in FIGURES}
    return {key: ratio(sides["head"]["median"][key], sides["base"]["median"][key]) for _, key, _ in FIGURES}


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def markdown(result: dict) -> str:
    """The comparison as a markdown table, with what was compared and how in its heading."""
    settings, base, head = result["settings"], result["sides"]["base"], result["sides"]["head"]
    flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings["serve_flags"].items())
    lines = [
        f"#### bench compare: head {head['label']} / base {base['label']}", "",
        f"{settings['requests']:,} `net.http_get()` to {settings['target']} `/fast` committed in one transaction, "
        f"until all responses are visible; rounds alternating base, head, {settings['rounds']} per side; "
        f"`serve --workers {settings['workers']}{' ' + flags if flags else ''}`; {settings['postgres']}; "
        f"{settings['cores']} cores; {result['started_at']}."
        + (f" Head side with `{settings['head_alongside']}` alongside." if settings.get("head_alongside") else "")
        + (f" Head side's requests: `--delivery {settings['head_delivery']}`."
           if settings.get("head_delivery", "plain") != "plain" else ""), "",
        "| figure | base | head | head / base |", "|---|---:|---:|---:|",
    ]
    for label, key, decimals in FIGURES:
        row = [_number(side["median"][key], decimals) for side in (base, head)]
        lines.append(f"| {label}, median | {row[0]} | {row[1]} | {_number(result['ratio'][key], 2)} |")
        if key == "rate_per_s":
            each = [" · ".join(_number(found[key], decimals) for found in side["rounds"]) for side in (base, head)]
            lines.append(f"| req/s, each round | {each[0]} | {each[1]} | |")
    noise = [max((found.get("other_processes_cpu_pct") or 0.0 for found in side["rounds"]), default=0.0)
             for side in (base, head)]
    lines.append(f"| CPU of other processes, worst round | {noise[0]:.0f} % | {noise[1]:.0f} % | |")
    lines += ["", READING]
    if max(noise) > NOISY_PCT:
        lines += ["", f"**Noisy machine**: other processes took up to {max(noise):.0f} % of its CPU in a round; req/s "
                     "moves with that far more than CPU µs per request does (`--wait-quiet 600` waits them out)."]
    return "\n".join(lines) + "\n"


def _side_label(side: revision.Side) -> str:
    if side.rev == "working tree":
        return f"working tree at {side.label()}"
    if side.commit.startswith(side.rev) or side.rev.startswith(side.commit):
        return side.label()
    return f"`{side.rev}` = {side.label()}"


def main(argv: list[str]) -> None:
    """Build both sides, run the rounds, print the table and save the JSON; exit 1 on an abort."""
    args = parse_args(argv)
    sys.setswitchinterval(0.0005)  # as cli.main: the runner's timestamps stay close to events
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, raise_interrupt)
    started_s, stamp, started_at = time.monotonic(), time.strftime("%Y%m%d-%H%M%S"), time.strftime("%Y-%m-%d %H:%M")
    try:
        sides = {"base": revision.built(args.base, "base"),
                 "head": revision.built(args.head, "head") if args.head else revision.working_tree()}
    except BenchError as exc:
        sys.exit(f"bench compare: {exc}")
    options = context.Options(workers=args.workers, serve_flags=serve_flags(args), target=args.target,
                              stall_timeout_s=args.stall_timeout_s)
    work_dir = make_work_dir()
    target = make_target(args.target, work_dir)
    databases: list[Database] = []
    benches: dict[str, context.Bench] = {}
    code = 0
    try:
        print(f"setting up: {'PostgreSQL at --dsn' if args.dsn else 'embedded PostgreSQL (fsync on)'}, "
              f"{args.target} target; base {_side_label(sides['base'])}, head {_side_label(sides['head'])}",
              file=sys.stderr, flush=True)
        admin_dsn = args.dsn
        for name, side in sides.items():
            # The first side's start brings up the embedded cluster; the second joins it.
            db = Database(admin_dsn, work_dir, statement_timeout_s=max(120.0, 2 * args.stall_timeout_s),
                          dbname=f"pgnet_compare_{name}_{os.getpid()}", install=side.install)
            databases.append(db)
            db.start()
            admin_dsn = db.admin_dsn
        target.start()
        side_options = {"base": options, "head": dataclasses.replace(options, alongside=args.head_alongside,
                                                                     delivery=args.head_delivery)}
        benches = {name: context.Bench(side_options[name], db, target, work_dir, f"{stamp}-{name}",
                                       serve_python=side.python, serve_cwd=side.cwd)
                   for db, (name, side) in zip(databases, sides.items())}
        rounds = run_rounds(benches, sides, args.rounds, args.requests, args.wait_quiet)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", file=sys.stderr, flush=True)
        code = 130
    except (BenchError, PgnetCurlError, psycopg.Error) as exc:
        print(f"bench compare: aborted: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for bench in benches.values():
            bench.close()
        target.stop()
        for db in reversed(databases):  # the embedded cluster's owner last
            db.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if code:
        sys.exit(code)
    result = {
        "scenario": "compare", "command": "python -m bench compare " + " ".join(argv), "started_at": started_at,
        "settings": {"requests": args.requests, "rounds": args.rounds, "workers": args.workers,
                     "head_alongside": args.head_alongside, "head_delivery": args.head_delivery,
                     "wait_quiet_s": args.wait_quiet,
                     "target": args.target, "serve_flags": options.serve_flags, "cores": os.cpu_count(),
                     "postgres": f"--dsn (server {databases[0].server_version})" if args.dsn
                     else f"embedded PostgreSQL {databases[0].server_version}, fsync on"},
        "sides": {name: {"label": _side_label(side), "rev": side.rev, "commit": side.commit, "dirty": side.dirty,
                         "python": side.python, "module": side.module, "rounds": rounds[name]}
                  for name, side in sides.items()},
        "machine": report.machine_info(),
    }
    result["ratio"] = summarize(result["sides"])
    result["wall_s"] = round(time.monotonic() - started_s, 1)
    print(markdown(result), flush=True)
    path = report.write_json(result, args.json or DEFAULT_RESULTS_DIR / f"compare-{stamp}.json")
    print(f"json: {path}; wall time {result['wall_s']:.0f} s", flush=True)
