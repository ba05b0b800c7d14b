"""Micro-benchmarks of the worker's hot paths: claim, write-back, and the curl loop per request.

Run: .venv/bin/python -m pytest bench/test_micro.py --benchmark-enable -p no:cacheprovider
Uses PGNET_TEST_DSN (an admin DSN; a database pgnet_bench_micro is created and dropped) or an
embedded PostgreSQL, and tests/http_server.py in a process of its own.
"""

from __future__ import annotations

import os
import selectors
import shutil
import time

import psycopg
import pycurl
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgnet_curl import schema
from pgnet_curl.curl_driver import CurlDriver
from pgnet_curl.model import Request, Response
from pgnet_curl.queue import Queue

from .runner import NginxTarget, PythonTarget, make_work_dir

MICRO_DB = "pgnet_bench_micro"
OWNER = "bench-micro"
_POLL_TO_EVENTS = {
    pycurl.POLL_IN: selectors.EVENT_READ,
    pycurl.POLL_OUT: selectors.EVENT_WRITE,
    pycurl.POLL_INOUT: selectors.EVENT_READ | selectors.EVENT_WRITE,
}


@pytest.fixture(scope="module")
def work_dir():
    path = make_work_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dsn(work_dir) -> str:
    """A fresh database with the net schema on PGNET_TEST_DSN's server or an embedded one."""
    embedded = None
    admin_dsn = os.environ.get("PGNET_TEST_DSN")
    if not admin_dsn:
        from pgnet_curl.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(work_dir / "pg", port=0, fast_unsafe=False)
        admin_dsn = embedded.start()
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f"drop database if exists {MICRO_DB} with (force)")
            conn.execute(f"create database {MICRO_DB}")
        params = conninfo_to_dict(admin_dsn)
        params["dbname"] = MICRO_DB
        dsn = make_conninfo(**params)
        schema.install(dsn)
        yield dsn
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f"drop database if exists {MICRO_DB} with (force)")
    finally:
        if embedded:
            embedded.stop("fast")


@pytest.fixture(scope="module")
def target(work_dir):
    server = PythonTarget(work_dir / "http_server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["python", "nginx"])
def any_target(request, work_dir, target):
    """The Python test server, and nginx too when it is installed (the loop's cost without Python's)."""
    if request.param == "python":
        yield target
        return
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed")
    server = NginxTarget(work_dir).start()
    yield server
    server.stop()


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("truncate net.http_request_queue, net._http_response restart identity")
        yield connection


def _enqueue(conn: psycopg.Connection, url: str, count: int) -> None:
    conn.execute("select net.http_get(%s) from generate_series(1, %s)", (url, count))


@pytest.mark.parametrize("leased_ahead", [0, 2000])
def test_claim_200(benchmark, conn, target, leased_ahead):
    """Claim a 200-row batch, with leased_ahead older rows in flight (leased) in front of it."""
    queue = Queue(conn, OWNER)
    url = f"{target.url}/fast"
    if leased_ahead:
        _enqueue(conn, url, leased_ahead)
        assert len(Queue(conn, "in-flight").claim(leased_ahead, 3600.0)) == leased_ahead

    def setup():
        # Only the in-flight rows stay: each round claims from the same queue shape.
        conn.execute("delete from net.http_request_queue where lease_owner is distinct from 'in-flight'")
        _enqueue(conn, url, 200)
        return (), {}

    def claim():
        return queue.claim(200, 3600.0)

    claimed = benchmark.pedantic(claim, setup=setup, rounds=40, warmup_rounds=3)
    assert len(claimed) == 200
    benchmark.extra_info["us_per_request"] = round(benchmark.stats.stats.mean / 200 * 1e6, 2)


def test_write_back_500(benchmark, conn, target):
    """Store 500 responses and dequeue their requests in one statement."""
    queue = Queue(conn, OWNER)
    url = f"{target.url}/fast"
    headers = {"Content-Type": "text/plain", "Content-Length": "2"}

    def setup():
        conn.execute("truncate net.http_request_queue, net._http_response")
        _enqueue(conn, url, 500)
        claimed = queue.claim(500, 3600.0)
        responses = [Response(request.id, status_code=200, content_type="text/plain", headers=dict(headers),
                              content="ok") for request in claimed]
        return (responses,), {}

    written = benchmark.pedantic(queue.write, setup=setup, rounds=30, warmup_rounds=2)
    assert written == 500
    benchmark.extra_info["us_per_request"] = round(benchmark.stats.stats.mean / 500 * 1e6, 2)


class _CurlLoop:
    """The worker's curl side alone: a selector over CurlDriver's sockets and its timer."""

    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.fds: set[int] = set()
        self.driver = CurlDriver(self._watch)

    def _watch(self, fd: int, what: int) -> None:
        if what == pycurl.POLL_REMOVE:
            if fd in self.fds:
                self.fds.discard(fd)
                self.selector.unregister(fd)
            return
        if fd in self.fds:
            self.selector.modify(fd, _POLL_TO_EVENTS[what])
        else:
            self.selector.register(fd, _POLL_TO_EVENTS[what])
            self.fds.add(fd)

    def run(self, url: str, count: int, max_inflight: int, batch: int) -> list[Response]:
        """Send count GETs, never more than max_inflight at once, adding batch at a time.

        Same order as Worker._step: select, socket events, due timer, take finished, add more.
        """
        finished: list[Response] = []
        added = 0
        batch = min(batch, max_inflight)
        deadline_s = time.monotonic() + 60
        while len(finished) < count:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{len(finished)} of {count} transfers finished in 60 s")
            while added < count and self.driver.inflight + batch <= max_inflight:
                for i in range(min(batch, count - added)):
                    self.driver.add(Request(added + i + 1, "GET", url, {}, None, 5000))
                added += min(batch, count - added)
            timer_s = self.driver.timer_deadline_s
            timeout_s = 0.1 if timer_s is None else max(0.0, timer_s - time.monotonic())
            for key, mask in self.selector.select(timeout_s):
                self.driver.socket_event(key.fd, bool(mask & selectors.EVENT_READ),
                                         bool(mask & selectors.EVENT_WRITE))
            if self.driver.timer_deadline_s is not None and time.monotonic() >= self.driver.timer_deadline_s:
                self.driver.timer_event()
            finished.extend(self.driver.take_finished())
        return finished

    def close(self) -> None:
        self.driver.close()
        self.selector.close()


def test_curl_loop_1000(benchmark, any_target):
    """Send 1,000 GETs to /fast through one CurlDriver, 200 added at a time, 1,000 in flight at most."""
    loop = _CurlLoop()
    url = f"{any_target.url}/fast"
    cpu_s: list[float] = []

    def run():
        started_s = time.process_time()
        responses = loop.run(url, 1000, 1000, 200)
        cpu_s.append(time.process_time() - started_s)
        return responses

    try:
        responses = benchmark.pedantic(run, rounds=8, warmup_rounds=1)
    finally:
        loop.close()
    assert len(responses) == 1000
    assert all(response.status_code == 200 for response in responses), responses[0]
    benchmark.extra_info["us_per_request"] = round(benchmark.stats.stats.mean / 1000 * 1e6, 2)
    # The loop's own CPU (libcurl, kernel, Python), without the target's: comparable to serve's workers.
    benchmark.extra_info["cpu_us_per_request"] = round(sum(cpu_s[1:]) / len(cpu_s[1:]) / 1000 * 1e6, 2)
