"""The curl driver on its own, against the loopback server: handles reused cleanly."""

from __future__ import annotations

import inspect
import json
import os
import select
import subprocess
import sys
import time

import pycurl
import pytest

from helpers import wait_until
from http_server import HttpTestServer
from pgnet_curl.curl_driver import CurlDriver
from pgnet_curl.destination_policy import DestinationPolicy
from pgnet_curl.model import Request
from pgnet_curl.settings import Settings

EVENTS = {pycurl.POLL_IN: select.POLLIN, pycurl.POLL_OUT: select.POLLOUT,
          pycurl.POLL_INOUT: select.POLLIN | select.POLLOUT}


class Loop:
    """The smallest event loop that drives a CurlDriver, like the worker's."""

    def __init__(self, **driver_options):
        self.poller = select.epoll()
        self.fds: set[int] = set()
        self.driver = CurlDriver(self.watch, **driver_options)

    def watch(self, fd: int, what: int) -> None:
        if what == pycurl.POLL_REMOVE:
            if fd in self.fds:
                self.fds.discard(fd)
                self.poller.unregister(fd)
        elif fd in self.fds:
            self.poller.modify(fd, EVENTS[what])
        else:
            self.fds.add(fd)
            self.poller.register(fd, EVENTS[what])

    def run(self, request: Request, timeout_s: float = 10):
        self.driver.add(request)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            wait_s = 0.05 if self.driver.timer_deadline_s is None else max(0, self.driver.timer_deadline_s - time.monotonic())
            for fd, mask in self.poller.poll(min(wait_s, 0.05)):
                self.driver.socket_event(fd, bool(mask & (select.POLLIN | select.POLLERR | select.POLLHUP)),
                                         bool(mask & select.POLLOUT))
            if self.driver.timer_deadline_s is not None and time.monotonic() >= self.driver.timer_deadline_s:
                self.driver.timer_event()
            finished = self.driver.take_finished()
            if finished:
                return finished[0]
        raise AssertionError("no response in time")


@pytest.fixture(scope="module")
def server():
    with HttpTestServer() as running:
        yield running


def echo(response) -> dict:
    return json.loads(response.content)


def test_a_reused_handle_forgets_the_previous_method_body_and_headers(server):
    loop = Loop()
    url = server.url_for("/echo")
    post = loop.run(Request(1, "POST", url, {"X-Secret": "s", "Content-Type": "application/json"}, b'{"a": 1}', 5000))
    assert echo(post)["method"] == "POST" and echo(post)["body"] == '{"a": 1}'
    for method in ("GET", "HEAD", "PUT", "GET", "DELETE", "GET"):
        response = loop.run(Request(2, method, url, {}, None, 5000))
        assert response.status_code == 200
        if method == "HEAD":
            assert response.content is None
            continue
        got = echo(response)
        assert got["method"] == method
        assert got["body"] == ""
        assert "x-secret" not in [name.lower() for name, _ in got["headers"]]
    assert len(loop.driver._idle_handles) == 1, "one handle served every request"


def test_header_with_empty_value_and_user_agent(server):
    loop = Loop()
    got = echo(loop.run(Request(1, "GET", server.url_for("/echo"), {"X-Empty": ""}, None, 5000)))
    assert ["X-Empty", ""] in got["headers"]
    assert any(name == "User-Agent" and value.startswith("pg_net/0.20 (pgnet-curl/") for name, value in got["headers"])


def test_invalid_request_becomes_an_error_response(server):
    loop = Loop()
    loop.driver.add(Request(7, "GET", server.url_for("/echo"), {"X-Bad": "\udcff"}, None, 5000))
    [response] = loop.driver.take_finished()
    assert response.id == 7 and response.error_msg.startswith("Invalid request")
    assert loop.run(Request(8, "GET", server.url_for("/echo"), {}, None, 5000)).status_code == 200


def test_binary_body_with_nul_bytes_is_sent_whole(server):
    loop = Loop()
    body = bytes(range(256)) * 4
    response = loop.run(Request(1, "PUT", server.url_for("/echo"), {"Content-Type": "application/octet-stream"},
                                body, 5000))
    import base64

    assert base64.b64decode(echo(response)["body_base64"]) == body


def test_a_reset_handle_keeps_the_tls_files(tmp_path):
    from tls_server import ProtocolServer, server_context
    import trustme

    ca = trustme.CA()
    client = ca.issue_cert("client.localhost", common_name="driver client")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    with ProtocolServer(server_context(ca, require_client_cert=True)) as tls:
        loop = Loop(ca_file=str(tmp_path / "ca.pem"), client_cert=str(tmp_path / "client.pem"))
        url = tls.url_for("/mtls")
        # A POST with headers marks the handle dirty: reset() then the constant options again.
        for method, body in (("POST", b"x"), ("GET", None), ("GET", None)):
            response = loop.run(Request(1, method, url, {"X-A": "1"} if body else {}, body, 5000))
            assert response.status_code == 200, response.error_msg
            assert json.loads(response.content) == {"protocol": "h2", "path": "/mtls", "client_cert": "driver client"}
        assert len(loop.driver._idle_handles) == 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_policy_sockets_leak_no_fds_whether_allowed_or_denied(server):
    loop = Loop(destination_policy=DestinationPolicy(deny_cidrs=["127.0.0.2/32", "::1/128"]))
    close = {"Connection": "close"}  # a new connection, so a new open-socket call, every time
    allowed = Request(1, "GET", server.url_for("/status/204"), close, None, 5000)
    denied = Request(2, "GET", f"http://127.0.0.2:{server.port}/", close, None, 5000)
    half_denied = Request(3, "GET", f"http://localhost:{server.port}/status/204", close, None, 5000)
    loop.run(allowed)
    loop.run(denied)
    before = open_fds()
    hits_before = server.hits("/status/204")
    for _ in range(50):
        assert loop.run(allowed).status_code == 204
        assert loop.run(denied).error_msg == (
            "Destination denied by policy: 127.0.0.2 is in 127.0.0.2/32 (denied by --deny-cidr)")
        assert loop.run(half_denied).status_code == 204, "::1 denied, 127.0.0.1 tried next"
    assert server.hits("/status/204") - hits_before == 100
    # The server runs in this process too: wait for it to close its side of the connections.
    wait_until(lambda: open_fds() <= before, timeout_s=5, message=f"fds back to {before} (now {open_fds()})")


def test_a_denied_address_then_a_refused_one_names_both_outcomes(server):
    loop = Loop(destination_policy=DestinationPolicy(deny_cidrs=["::1/128"]))
    response = loop.run(Request(1, "GET", "http://localhost:1/", {}, None, 5000))
    assert (response.status_code, response.timed_out, response.error_msg) == (None, False, (
        "Destination denied by policy: ::1 is in ::1/128 (denied by --deny-cidr); "
        "the other addresses: Couldn't connect to server"))


# Run in a new network namespace (only a downed loopback): if the policy ever let these
# through, the connection attempt fails there instead of reaching a real metadata service.
_ISOLATED_SCRIPT = """
import json, sys
sys.path[:0] = sys.argv[1:3]
from test_curl_driver import Loop
from pgnet_curl.model import Request
loop = Loop()
urls = ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/", "http://[fd00:ec2::254]/"]
print(json.dumps([loop.run(Request(i, "GET", url, {}, None, 3000)).error_msg for i, url in enumerate(urls)]))
"""


def test_default_policy_denies_metadata_addresses_before_connecting():
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        ["unshare", "--map-root-user", "--net", sys.executable, "-c", _ISOLATED_SCRIPT, here, os.path.dirname(here)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "Destination denied by policy: 169.254.169.254 is in 169.254.0.0/16 (denied by default; allow with --allow-cidr)",
        "Destination denied by policy: ::ffff:169.254.169.254 is in 169.254.0.0/16 (denied by default; allow with --allow-cidr)",
        "Destination denied by policy: fd00:ec2::254 is in fd00:ec2::254/128 (denied by default; allow with --allow-cidr)",
    ]


def test_default_response_cap_is_100_mib_in_serve_and_the_driver():
    assert Settings().max_response_bytes == 100 * 1024 * 1024
    assert inspect.signature(CurlDriver).parameters["max_response_bytes"].default == 100 * 1024 * 1024
