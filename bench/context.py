"""What every scenario shares: options, serve's lifecycle, enqueueing, CPU figures, result shape."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psycopg

from .measure import CpuMeter, RssSampler
from .profile import PySpy
from .runner import REPO_DIR, BenchError, Database, PythonTarget, Serve

# How each request is made, by --delivery: pg_net's plain call, or net.http_request with one
# delivery option on (the requests still succeed at once: the figure is the option's cost).
ENQUEUE_SQL = {
    "plain": "select net.http_get(%s) from generate_series(1, %s)",
    "retries": "select net.http_request('GET', %s, max_retries => 3) from generate_series(1, %s)",
    "notify": "select net.http_request('GET', %s, notify_channel => 'bench_done') from generate_series(1, %s)",
    "signed": "select net.http_request('POST', %s, convert_to('{\"event\": 1}', 'UTF8'), "
              "signing_key_id => 'bench') from generate_series(1, %s)",
}
# With --alongside, a feature is set up for other requests while the measured ones stay as they
# are: what it costs them should be nothing (a limit row for another host, a signing key nobody
# uses here, or one request in CALLBACK_EVERY carrying a SQL callback).
ALONGSIDE_SQL = {
    "limit": "insert into net.destination_limits(host_pattern, max_concurrent, max_per_second) "
             "values ('other.invalid', 10, 100) on conflict do nothing",
    "signing-key": "select net.rotate_signing_key('others') "
                   "where not exists (select from net.signing_keys where key_id = 'others')",
    "callback": "create or replace function public.bench_done(request_id bigint) returns void "
                "language sql security definer as 'select'",
}
CALLBACK_EVERY = 100
CALLBACK_ENQUEUE_SQL = "select net.http_request('GET', %s, callback => 'public.bench_done') from generate_series(1, %s)"
CORES = os.cpu_count() or 1


@dataclass
class Options:
    """How the scenarios run: serve's flags, the target, polling and safety limits."""

    workers: int
    serve_flags: dict = field(default_factory=dict)
    target: str = "python"
    poll_ms: float = 1.0
    stall_timeout_s: float = 60.0
    txn_rows: int = 20_000
    enqueuers: int = 2
    delivery: str = "plain"
    alongside: str | None = None
    profile: str | None = None
    results_dir: Path = Path("bench/results")


class Bench:
    """What every scenario shares: the database, the target, the options, and serve's lifecycle."""

    def __init__(self, options: Options, db: Database, target, work_dir: Path, stamp: str,
                 serve_python: str = sys.executable, serve_cwd: Path = REPO_DIR):
        self.options = options
        # The code serve runs: this checkout by default, another revision's venv for `bench compare`.
        self.serve_python = serve_python
        self.serve_cwd = serve_cwd
        self.db = db
        self.target = target
        self.work_dir = work_dir
        self.stamp = stamp
        self._slow_target: PythonTarget | None = None

    def fast_url(self) -> str:
        return f"{self.target.url}/fast"

    def slow_url(self, delay_ms: int) -> str:
        """A slow endpoint: always the Python server (nginx cannot delay), started when first needed."""
        if isinstance(self.target, PythonTarget):
            return f"{self.target.url}/delay/{delay_ms}"
        if self._slow_target is None:
            self._slow_target = PythonTarget(self.work_dir / "slow_http_server.log").start()
        return f"{self._slow_target.url}/delay/{delay_ms}"

    def close(self) -> None:
        if self._slow_target is not None:
            self._slow_target.stop()

    @contextlib.contextmanager
    def serving(self, wait: bool = True) -> Iterator[Serve]:
        """Run `pgnet-curl serve` for the duration of the block; always stop it."""
        serve = Serve(self.db, self.options.workers, self.options.serve_flags,
                      self.work_dir / f"serve-{self.stamp}.log", python=self.serve_python, cwd=self.serve_cwd)
        try:
            serve.start(wait=wait)
            yield serve
        except BaseException:
            tail = serve.log_tail()
            if tail:
                print(f"--- last lines of pgnet-curl serve's log:\n{tail}---", flush=True)
            raise
        finally:
            serve.stop()

    def check_alive(self, serve: Serve) -> None:
        if serve.process.poll() is not None:
            raise BenchError(f"pgnet-curl serve exited with code {serve.process.returncode}:\n{serve.log_tail()}")

    def cpu_meter(self, serve: Serve, runner_conns: list[psycopg.Connection]) -> CpuMeter:
        """CPU of serve's workers, their sessions, the runner's sessions, the database, the target."""
        postmaster = self.db.postmaster_pid()
        runner_backends = [conn.info.backend_pid for conn in runner_conns]

        def worker_backends() -> list[int]:
            with self.db.connect() as conn:
                return serve.backend_pids(conn)

        return CpuMeter(
            trees={"workers": lambda: serve.pid, "database": lambda: postmaster, "target": lambda: self.target.pid},
            sets={"worker_backends": worker_backends, "runner_backends": lambda: runner_backends,
                  "runner": lambda: [os.getpid()]},
        )

    @contextlib.contextmanager
    def profiling(self, serve: Serve, scenario: str) -> Iterator[PySpy | None]:
        """Sample serve's workers with py-spy for the duration of the block, if --profile."""
        if not self.options.profile:
            yield None
            return
        serve.wait_ready()
        prefix = self.options.results_dir / f"{scenario}-{self.stamp}-pyspy"
        with PySpy(serve.worker_pids(), prefix, mode=self.options.profile) as spy:
            yield spy

    def enqueue(self, conn: psycopg.Connection, url: str, count: int) -> list[int]:
        """Queue count GETs in the connection's open transaction, txn_rows per statement."""
        ids: list[int] = []
        alongside = self.options.alongside
        if alongside:
            with self.db.connect() as setup:
                setup.execute(ALONGSIDE_SQL[alongside])
            if alongside == "callback":
                ids.extend(row_id for (row_id,) in conn.execute(CALLBACK_ENQUEUE_SQL, (url, count // CALLBACK_EVERY)))
        if self.options.delivery == "signed" and not conn.execute(
                "select exists (select from net.signing_keys where key_id = 'bench')").fetchone()[0]:
            conn.execute("select net.rotate_signing_key('bench')")
        while len(ids) < count:
            rows = conn.execute(ENQUEUE_SQL[self.options.delivery],
                                (url, min(self.options.txn_rows, count - len(ids)))).fetchall()
            ids.extend(row_id for (row_id,) in rows)
        return ids


def cpu_figures(used: dict, requests: int, rss: RssSampler | None) -> dict:
    """Turn CPU seconds over the window into µs per request, and the workers' largest RSS."""

    def per_request_us(*names):
        values = [used.get(name) for name in names]
        if any(value is None for value in values) or not requests:
            return None
        return round(sum(values) / requests * 1e6, 1)

    return {
        "cpu_us_per_request": per_request_us("workers", "worker_backends"),
        "worker_process_cpu_us_per_request": per_request_us("workers"),
        "worker_backend_cpu_us_per_request": per_request_us("worker_backends"),
        "database_total_cpu_us_per_request": per_request_us("database"),
        "runner_backend_cpu_us_per_request": per_request_us("runner_backends"),
        "target_cpu_us_per_request": per_request_us("target"),
        "runner_cpu_us_per_request": per_request_us("runner"),
        "cpu_window_s": round(used["wall_s"], 3),
        "machine_cpu_busy_pct": round(100 * used["machine_busy"] / used["wall_s"] / CORES, 1),
        "other_processes_cpu_pct": _other_pct(used),
        "machine_steal_pct": round(100 * used["machine_steal"] / used["wall_s"] / CORES, 1),
        "worker_rss_max_mb": round(rss.max_mb(), 1) if rss and rss.max_mb() else None,
    }


def _other_pct(used: dict) -> float | None:
    """Share of the machine's CPU used by processes that are not part of this bench (noise)."""
    ours = [used.get(name) for name in ("workers", "database", "target", "runner")]
    if any(value is None for value in ours):
        return None
    return round(max(0.0, 100 * (used["machine_busy"] - sum(ours)) / used["wall_s"] / CORES), 1)


# No request can travel commit -> NOTIFY -> claim -> HTTP -> write-back -> poll this fast: a latency
# below it means the runner took its commit timestamp late (descheduled between COMMIT and clock).
SUSPECT_LATENCY_MS = 0.5


def suspect_pct(latencies_ms: list[float]) -> float:
    """Share of latencies too short to be true (see SUSPECT_LATENCY_MS), in %."""
    return round(100 * sum(v < SUSPECT_LATENCY_MS for v in latencies_ms) / max(1, len(latencies_ms)), 2)


def response_check(db: Database, first_id: int, last_id: int) -> dict:
    """Count the scenario's responses by outcome (after the measurement)."""
    with db.connect() as conn:
        ok, failed = conn.execute(
            "select count(*) filter (where status_code between 200 and 299), "
            "count(*) filter (where status_code is null or status_code not between 200 and 299) "
            "from net._http_response where id between %s and %s", (first_id, last_id)).fetchone()
        sample_error = conn.execute(
            "select coalesce(error_msg, status_code::text) from net._http_response "
            "where id between %s and %s and (status_code is null or status_code not between 200 and 299) limit 1",
            (first_id, last_id)).fetchone()
    return {"responses_2xx": ok, "responses_failed": failed, "sample_failure": sample_error[0] if sample_error else None}


def make_result(name: str, parameters: dict, figures: dict, series: dict | None = None, notes: list | None = None,
            profile: PySpy | None = None) -> dict:
    result = {"scenario": name, "parameters": parameters, "figures": figures, "series": series or {},
              "notes": notes or []}
    if profile is not None:
        result["profile"] = profile.summary()
    return result
