"""The destination policy in a real worker: denied addresses get an error row and no connection."""

from __future__ import annotations

import socket
import subprocess
import sys
from urllib.parse import quote

import pytest

from helpers import wait_until
from http_server import HttpTestServer

# libcurl's side: one PostgreSQL major is enough (see the curl_side marker).
pytestmark = pytest.mark.curl_side


class CountingListener:
    """A listening socket nobody accepts on: the kernel completes every handshake, we count them."""

    def __init__(self, host: str, port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0

    def count(self) -> int:
        """Accept what has arrived so far and return how many connections ever arrived."""
        for _ in range(1000):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            conn.close()
            self.accepted += 1
        return self.accepted

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener_v4():
    listener = CountingListener("127.0.0.1")
    yield listener
    listener.close()


@pytest.fixture
def listener_v6(listener_v4):
    """A listener on ::1 with the same port as listener_v4, so `localhost:PORT` reaches both."""
    listener = CountingListener("::1", listener_v4.port)
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def server_127_0_0_2():
    with HttpTestServer(host="127.0.0.2") as server:
        yield server


def get(db, url: str, timeout_ms: int = 3000) -> dict:
    """Queue a GET and return its response row once written."""
    request_id = db.execute("select net.http_get(%s, timeout_milliseconds => %s)", (url, timeout_ms)).fetchone()[0]

    def stored():
        cur = db.execute("select * from net._http_response where id = %s", (request_id,))
        values = cur.fetchone()
        return dict(zip([c.name for c in cur.description], values)) if values else None

    return wait_until(stored, timeout_s=20, message=f"response row of {url}")


def outcome(row: dict) -> tuple:
    return row["status_code"], row["timed_out"], row["error_msg"]


def test_default_policy_leaves_loopback_allowed(db, db_dsn, serve, http_server):
    # The default denials themselves are tested in an isolated network namespace
    # (tests/unit/test_curl_driver.py): a regression must not send a packet to 169.254.169.254.
    serve(db_dsn)
    assert get(db, http_server.url_for("/status/204"))["status_code"] == 204


def test_denied_cidr_gets_an_error_row_and_no_connection(db, db_dsn, serve, listener_v4, listener_v6):
    serve(db_dsn, env={"PGNET_DENY_CIDR": "127.0.0.0/8, ::1/128"})
    row = get(db, f"http://127.0.0.1:{listener_v4.port}/")
    assert outcome(row) == (None, False, "Destination denied by policy: 127.0.0.1 is in 127.0.0.0/8 (denied by --deny-cidr)")
    row = get(db, f"http://localhost:{listener_v4.port}/")
    assert (row["status_code"], row["timed_out"]) == (None, False)
    assert row["error_msg"].startswith("Destination denied by policy: ")
    # curl tries both of localhost's addresses; the row names each refusal.
    assert "::1 is in ::1/128 (denied by --deny-cidr)" in row["error_msg"]
    assert "127.0.0.1 is in 127.0.0.0/8 (denied by --deny-cidr)" in row["error_msg"]
    assert "other addresses" not in row["error_msg"]
    assert (listener_v4.count(), listener_v6.count()) == (0, 0)


def test_a_redirect_to_a_denied_address_is_refused(db, db_dsn, serve, server_127_0_0_2, listener_v4):
    serve(db_dsn, "--deny-private", "--allow-cidr", "127.0.0.2/32")
    allowed = get(db, server_127_0_0_2.url_for("/echo"))
    assert allowed["status_code"] == 200, "an allowed /32 inside the denied 127.0.0.0/8 goes through"
    target = f"http://127.0.0.1:{listener_v4.port}/"
    row = get(db, server_127_0_0_2.url_for(f"/redirect-to?url={quote(target, safe='')}"))
    assert outcome(row) == (None, False, (
        "Destination denied by policy: 127.0.0.1 is in 127.0.0.0/8 "
        "(denied by --deny-private; allow with --allow-cidr)"))
    assert server_127_0_0_2.hits("/redirect-to") == 1, "the first hop was sent"
    assert listener_v4.count() == 0


def test_one_allowed_address_of_a_name_is_enough(db, db_dsn, serve, http_server):
    serve(db_dsn, "--deny-cidr", "::1/128")
    row = get(db, f"http://localhost:{http_server.port}/status/204")
    assert outcome(row) == (204, False, None)


def test_an_invalid_cidr_stops_serve_with_exit_code_2(db_dsn):
    result = subprocess.run(
        [sys.executable, "-m", "pgnet_curl", "serve", "--dsn", db_dsn, "--allow-cidr", "10.0.0.0/8",
         "--deny-cidr", "192.168.0.0/33"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--deny-cidr must be a CIDR range like 10.0.0.0/8 or fd00::/8, got '192.168.0.0/33'" in result.stderr
    assert "Traceback" not in result.stderr
