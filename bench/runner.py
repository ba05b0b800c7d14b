"""Start and stop what a benchmark needs: PostgreSQL, the HTTP target and `pgnet-curl serve`.

Every process started here is stopped by its own object's stop(), called from a finally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgnet_curl import schema

log = logging.getLogger("bench.runner")

REPO_DIR = Path(__file__).resolve().parent.parent
HTTP_SERVER_SCRIPT = REPO_DIR / "tests" / "http_server.py"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """Something the bench needs could not be started or reached."""


def _wait_exit(process: subprocess.Popen, timeout_s: float) -> bool:
    try:
        process.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def stop_process(process: subprocess.Popen | None, signo: int = signal.SIGTERM,
                 timeout_s: float = STOP_TIMEOUT_S, group: bool = False) -> None:
    """Ask a child to stop; kill it (and the process group it leads, if group) when it will not."""
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(signo)
    except ProcessLookupError:
        return
    try:
        stopped = _wait_exit(process, timeout_s)
    except KeyboardInterrupt:
        # Ctrl-C again while waiting: do not leave the process behind.
        _kill(process, group)
        raise
    if not stopped:
        log.warning("pid %d did not stop within %.0f s: killing it", process.pid, timeout_s)
        _kill(process, group)


def _kill(process: subprocess.Popen, group: bool) -> None:
    try:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:
        pass
    _wait_exit(process, 10)


def free_port() -> int:
    """Return a TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if process is not None and process.poll() is not None:
            raise BenchError(f"process {process.args[0]} exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


# ---- PostgreSQL ---------------------------------------------------------------------------------


class Database:
    """A scratch database with the net schema: in an embedded cluster, or on the --dsn server."""

    def __init__(self, admin_dsn: str | None, work_dir: Path, statement_timeout_s: float = 120.0,
                 dbname: str | None = None, install: Callable[[str], object] | None = None, unlogged: bool = False):
        """dbname: the scratch database's name (default: one per bench); install: puts schema net into it
        (default: this checkout's schema.install); unlogged: pg_net's unlogged tables, to measure what
        logging costs."""
        self.given_dsn = admin_dsn
        self.wanted_dbname = dbname
        self.install = install or (lambda dsn: schema.install(dsn, durable=False if unlogged else None))
        self.unlogged = unlogged
        # Every statement of the bench is bounded: a stuck database aborts the scenario.
        self.statement_timeout_s = statement_timeout_s
        self.work_dir = work_dir
        self.embedded = None
        self.admin_dsn = ""
        self.dsn = ""
        self.dbname = ""
        self.server_version = ""

    def start(self) -> str:
        """Start (or reach) the server, create the scratch database, install the schema."""
        if self.given_dsn:
            self.admin_dsn = self.given_dsn
            self.dbname = self.wanted_dbname or f"pgnet_bench_{os.getpid()}"
        else:
            from pgnet_curl.embedded import EmbeddedPostgres

            # fsync and synchronous_commit left on: honest commit costs.
            self.embedded = EmbeddedPostgres(self.work_dir / "pg", port=0, fast_unsafe=False)
            self.admin_dsn = self.embedded.start()
            self.dbname = self.wanted_dbname or "pgnet_bench"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{self.dbname}" with (force)')
            conn.execute(f'create database "{self.dbname}"')
            self.server_version = conn.execute("show server_version").fetchone()[0]
        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = self.dbname
        self.dsn = make_conninfo(**params)
        self.install(self.dsn)
        return self.dsn

    def connect(self, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(self.dsn, autocommit=autocommit, application_name="pgnet-bench",
                               connect_timeout=int(START_TIMEOUT_S),
                               options=f"-c statement_timeout={int(self.statement_timeout_s * 1000)}")

    def reset(self) -> None:
        """Empty the queue and the response table so that ids start again at 1."""
        with self.connect() as conn:
            conn.execute("truncate net.http_request_queue, net._http_response restart identity")

    def postmaster_pid(self) -> int | None:
        """Return the server's main process if it runs on this host (for its CPU), else None."""
        with self.connect() as conn:
            # Looked up while the session is open: its backend process exits with it.
            backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            try:
                parent = psutil.Process(backend_pid).parent()
            except psutil.Error:
                return None
        if parent is None or "postgres" not in parent.name():
            return None
        return parent.pid

    def backend_pids(self, conn: psycopg.Connection, application_like: str) -> list[int]:
        rows = conn.execute(
            "select pid from pg_stat_activity where datname = current_database() and application_name like %s",
            (application_like,),
        ).fetchall()
        return [pid for (pid,) in rows]

    def stop(self) -> None:
        if self.embedded is not None:
            try:
                self.embedded.stop("fast")
            except Exception as exc:  # noqa: BLE001 - cleanup: report and carry on
                log.warning("could not stop the embedded PostgreSQL: %s", exc)
        elif self.admin_dsn and self.dbname:
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                    conn.execute(f'drop database if exists "{self.dbname}" with (force)')
            except psycopg.Error as exc:
                log.warning("could not drop database %s: %s", self.dbname, exc)


# ---- HTTP targets ---------------------------------------------------------------------------------


class PythonTarget:
    """tests/http_server.py in a process of its own, so that its CPU is counted apart."""

    kind = "python"

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "PythonTarget":
        if not HTTP_SERVER_SCRIPT.exists():
            raise BenchError(f"{HTTP_SERVER_SCRIPT} is missing")
        with open(self.log_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(HTTP_SERVER_SCRIPT), "--host", "127.0.0.1", "--port", "0"],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.url = self._read_url().rstrip("/")
        return self

    def _read_url(self) -> str:
        """Read the base URL the server prints once it listens."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(START_TIMEOUT_S):
                raise BenchError(f"the Python test server printed no URL within {START_TIMEOUT_S:.0f} s")
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("http://127.0.0.1:"):
            raise BenchError(f"unexpected first line from the Python test server: {line!r} (see {self.log_path})")
        return line

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT, timeout_s=10)
        if self.process and self.process.stdout:
            self.process.stdout.close()


_NGINX_CONFIG = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    {access_log}
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /fast {{ default_type text/plain; return 200 "ok"; }}
        location / {{ return 404; }}
    }}
}}
"""


class NginxTarget:
    """A private nginx on 127.0.0.1 (one worker, keep-alive on) answering /fast with 200 "ok".

    log_requests: write each request's URI to access_log_path, in the order nginx answered them
    (buffered; complete once stop() returns).
    """

    kind = "nginx"

    def __init__(self, work_dir: Path, name: str = "nginx", log_requests: bool = False):
        self.prefix = work_dir / name
        self.log_requests = log_requests
        self.access_log_path = self.prefix / "access.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "NginxTarget":
        binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if not binary:
            raise BenchError("--target nginx: nginx is not installed (apt-get install nginx)")
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = self.prefix / "nginx.conf"
        access_log = (f"log_format uri '$request_uri'; access_log {self.access_log_path} uri buffer=256k flush=1s;"
                      if self.log_requests else "access_log off;")
        config.write_text(_NGINX_CONFIG.format(prefix=self.prefix, port=port, access_log=access_log))
        with open(self.prefix / "stderr.log", "ab") as out:
            self.process = subprocess.Popen(
                [binary, "-p", str(self.prefix), "-c", str(config), "-e", str(self.prefix / "error.log")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        wait_for_port(port, START_TIMEOUT_S, self.process)
        self.url = f"http://127.0.0.1:{port}"
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        # SIGQUIT: graceful; the master stops its workers.
        stop_process(self.process, signal.SIGQUIT, timeout_s=10, group=True)


def make_target(kind: str, work_dir: Path):
    return NginxTarget(work_dir) if kind == "nginx" else PythonTarget(work_dir / "http_server.log")


# ---- pgnet-curl serve ---------------------------------------------------------------------------


class Serve:
    """`pgnet-curl serve` as a subprocess in its own session; SIGTERM drains it.

    python and cwd choose the code served (another revision's virtualenv for `bench compare`);
    cwd matters because `python -m` imports from it first.
    """

    def __init__(self, db: Database, workers: int, options: dict, log_path: Path,
                 python: str = sys.executable, cwd: Path = REPO_DIR):
        self.db = db
        self.python = python
        self.cwd = cwd
        self.workers = workers
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.started_s = 0.0

    def command(self) -> list[str]:
        command = [self.python, "-m", "pgnet_curl", "serve", "--dsn", self.db.dsn, "--workers", str(self.workers)]
        for flag, value in self.options.items():
            if value is not None:
                command += [f"--{flag.replace('_', '-')}", str(value)]
        return command

    def start(self, wait: bool = True) -> "Serve":
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.cwd, start_new_session=True,
            )
        self.started_s = time.perf_counter()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Wait until every worker has its database session (they claim right after)."""
        deadline_s = time.monotonic() + START_TIMEOUT_S
        with self.db.connect() as conn:
            while time.monotonic() < deadline_s:
                if self.process.poll() is not None:
                    raise BenchError(f"pgnet-curl serve exited with code {self.process.returncode}:\n"
                                     f"{self.log_tail()}")
                # Workers' sessions only: serve's and the supervisor's short ones would count early.
                workers_connected = len(self.db.backend_pids(conn, "pgnet-curl worker%"))
                if workers_connected >= self.workers and len(self.worker_pids()) >= self.workers:
                    return
                time.sleep(0.02)
        raise BenchError(f"pgnet-curl serve: workers not connected after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def worker_pids(self) -> list[int]:
        try:
            return [child.pid for child in psutil.Process(self.process.pid).children()]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def backend_pids(self, conn: psycopg.Connection) -> list[int]:
        return self.db.backend_pids(conn, "pgnet-curl%")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Drain and stop serve; kill any worker that outlived it."""
        workers = []
        for pid in self.worker_pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                workers.append(psutil.Process(pid))
        stop_process(self.process, signal.SIGTERM, timeout_s=STOP_TIMEOUT_S, group=True)
        for worker in workers:
            # is_running() also tells a reused pid from our worker.
            with contextlib.suppress(psutil.NoSuchProcess):
                if worker.is_running():
                    log.warning("worker pid %d outlived serve: killing it", worker.pid)
                    worker.kill()


def make_work_dir() -> Path:
    """A temporary folder for the cluster, logs and configs; world-traversable for PostgreSQL."""
    path = Path(tempfile.mkdtemp(prefix="pgnet-bench-"))
    path.chmod(0o755)
    return path
