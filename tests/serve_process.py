"""Run `pgnet-curl serve` as a real subprocess, the way a user does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import psycopg

from helpers import wait_until


def connected_workers(dsn: str) -> int:
    """Worker sessions past their LISTEN: a session shows in pg_stat_activity before its first
    statement, and a NOTIFY sent before its LISTEN would be missed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and application_name like 'pgnet-curl worker%' "
            "and query <> '' and query not like '%listen pgnet_curl_wake%'"
        ).fetchone()[0]


class ServeProcess:
    """A `pgnet-curl serve` subprocess with its log in a file; own_group: in a process group of its
    own, which kill_group() kills at once (supervisor and workers)."""

    def __init__(self, dsn: str | None, *args: str, workers: int = 1, env: dict | None = None,
                 own_group: bool = False):
        self.dsn = dsn
        self.workers = workers
        self.log_file = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pgnet_curl", "serve", "--workers", str(workers),
               "--poll-interval", "0.5", *args]
        if dsn:
            cmd += ["--dsn", dsn]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=own_group,
        )
        self.own_group = own_group

    @property
    def log(self) -> str:
        with open(self.log_file.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_ready(self, expected_workers: int | None = None, timeout_s: float = 20) -> "ServeProcess":
        """Wait until this many workers (default: ours) hold database sessions, and each of our
        worker processes has logged its start line: it has then read the schema and serves it
        (or waits for it), and has written its --destination-limit rows. A session is counted
        from its first statement after LISTEN, while the worker is still reading the schema."""
        expected = self.workers if expected_workers is None else expected_workers

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log}")
            pids, log = self.worker_pids(), self.log
            return (len(pids) >= self.workers and all(f" started (pid {pid}," in log for pid in pids)
                    and connected_workers(self.dsn) >= expected)

        wait_until(ready, timeout_s, interval_s=0.05, message=f"{expected} connected workers, each started")
        return self

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait: the graceful path. Return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not stop within {timeout_s} s:\n{self.log}")

    def kill_group(self) -> None:
        """SIGKILL the whole process group at once: no supervisor is left to hand work back."""
        assert self.own_group, "kill_group() needs ServeProcess(..., own_group=True)"
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait(10)
