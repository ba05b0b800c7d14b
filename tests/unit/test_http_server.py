"""Check the loopback test HTTP server with real clients (pycurl, http.client, sockets)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pycurl
import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:  # same module identity as tests/conftest.py
    sys.path.insert(0, str(TESTS_DIR))
import http_server  # noqa: E402

HttpTestServer = http_server.HttpTestServer

# libcurl names 8 CURLE_WEIRD_SERVER_REPLY; pycurl kept its old FTP name.
pytestmark = pytest.mark.timeout(30)


@dataclass
class Reply:
    """Hold what a pycurl transfer saw, for assertions."""

    status: int
    body: bytes
    header_lines: list[str] = field(default_factory=list)
    curl: pycurl.Curl | None = None

    def headers(self) -> list[tuple[str, str]]:
        """Return the final response's headers as (name, value) in order."""
        block: list[tuple[str, str]] = []
        for line in self.header_lines:
            if line.startswith("HTTP/"):
                block = []
            elif ":" in line:
                name, _, value = line.partition(":")
                block.append((name, value.strip()))
        return block

    def header(self, name: str) -> str | None:
        """Return the first value of a final-response header, or None."""
        for key, value in self.headers():
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict:
        """Decode an /echo body."""
        return json.loads(self.body)


def fetch(url: str, *, method: str | None = None, body: bytes | None = None,
          headers: list[str] = (), follow: bool = False, timeout_ms: int = 5000,
          curl: pycurl.Curl | None = None, **options) -> Reply:
    """Perform one request with pycurl and return what it received."""
    handle = curl or pycurl.Curl()
    handle.reset()
    received = []
    header_lines: list[str] = []
    handle.setopt(pycurl.URL, url)
    handle.setopt(pycurl.WRITEFUNCTION, received.append)
    handle.setopt(pycurl.HEADERFUNCTION,
                  lambda line: header_lines.append(line.decode("latin-1").rstrip("\r\n")))
    handle.setopt(pycurl.TIMEOUT_MS, timeout_ms)
    handle.setopt(pycurl.FOLLOWLOCATION, follow)
    handle.setopt(pycurl.HTTPHEADER, list(headers))
    if body is not None:
        handle.setopt(pycurl.POST, True)
        handle.setopt(pycurl.POSTFIELDSIZE_LARGE, len(body))
        stream = io.BytesIO(body)
        handle.setopt(pycurl.READDATA, stream)
        handle.setopt(pycurl.SEEKFUNCTION,  # lets 307/308 redirects resend the body
                      lambda offset, origin: stream.seek(offset, origin) and 0)
    if method == "HEAD":
        handle.setopt(pycurl.NOBODY, True)
    elif method is not None:
        handle.setopt(pycurl.CUSTOMREQUEST, method)
    for option, value in options.items():
        handle.setopt(getattr(pycurl, option), value)
    handle.perform()
    return Reply(handle.getinfo(pycurl.RESPONSE_CODE), b"".join(received),
                 header_lines, handle)


def curl_error(url: str, **kwargs) -> int:
    """Return the libcurl error code a request fails with."""
    with pytest.raises(pycurl.error) as raised:
        fetch(url, **kwargs)
    return raised.value.args[0]


def raw_exchange(server: HttpTestServer, payload: bytes, *,
                 until: bytes | None = None, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or `until` was seen."""
    with socket.create_connection((server.host, server.port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        received = bytearray()
        while until is None or received.count(until) == 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return bytes(received)


@pytest.fixture(scope="module")
def server():
    """Serve once per module; every test starts with clean counters."""
    with HttpTestServer() as running:
        yield running


@pytest.fixture(autouse=True)
def clean_counters(server):
    """Forget previous tests' hits and log."""
    server.reset()


# --- lifecycle and addresses ------------------------------------------------

def test_start_returns_self_listening_on_loopback_url():
    instance = HttpTestServer()
    assert instance.start() is instance
    try:
        assert instance.url == f"http://127.0.0.1:{instance.port}"
        assert instance.url_for("/fast") == instance.url + "/fast"
        assert fetch(instance.url_for("/fast")).body == b"ok"
    finally:
        instance.stop()
    instance.stop()  # idempotent
    with pytest.raises(pycurl.error):
        fetch(instance.url_for("/fast"), timeout_ms=1000)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "localhost", "example.com"])
def test_refuses_non_loopback_hosts(host):
    with pytest.raises(ValueError):
        HttpTestServer(host)


def _ipv6_loopback_available() -> bool:
    """Tell whether ::1 can be bound here."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no ::1 on this machine")
def test_serves_ipv6_loopback():
    with HttpTestServer("::1") as v6:
        assert v6.url == f"http://[::1]:{v6.port}"
        reply = fetch(v6.url_for("/echo?v=6"))
        assert reply.status == 200
        assert reply.json()["args"] == {"v": ["6"]}
        assert v6.hits("/echo") == 1


def test_start_reports_a_busy_port(server):
    with pytest.raises(OSError):
        HttpTestServer(port=server.port).start()


def test_half_closed_client_still_gets_delayed_answer(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /delay/20 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        received = b"".join(iter(lambda: sock.recv(65536), b""))
    assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"delayed 20")


def test_stop_closes_hanging_connections():
    instance = HttpTestServer().start()
    sock = socket.create_connection((instance.host, instance.port), timeout=5)
    try:
        sock.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert instance.wait_for_hits(1, "/hang")
        started_s = time.monotonic()
        instance.stop()
        assert time.monotonic() - started_s < 2
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        sock.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_main_serves_until_interrupted(signum):
    process = subprocess.Popen(
        [sys.executable, str(TESTS_DIR / "http_server.py"), "--port", "0"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert fetch(url + "/fast").body == b"ok"
    finally:
        process.send_signal(signum)
        # Within the server's own bounded shutdown (SHUTDOWN_TIMEOUT_S), even on a loaded machine.
        assert process.wait(timeout=15) == 0
        process.stdout.close()


# --- /echo ------------------------------------------------------------------

def test_echo_round_trips_method_headers_query_and_body(server):
    payload = "héllo".encode() + b"\xff\x00"
    reply = fetch(server.url_for("/echo?a=1&a=2&b=&c=x%20y"), body=payload,
                  headers=["X-Custom: one", "x-custom: two", "Content-Type: app/x"])
    assert reply.status == 200
    assert reply.header("Content-Type") == "application/json"
    echoed = reply.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/echo"
    assert echoed["query"] == "a=1&a=2&b=&c=x%20y"
    assert echoed["args"] == {"a": ["1", "2"], "b": [""], "c": ["x y"]}
    custom = [pair for pair in echoed["headers"] if pair[0].lower() == "x-custom"]
    assert custom == [["X-Custom", "one"], ["x-custom", "two"]]
    assert base64.b64decode(echoed["body_base64"]) == payload
    assert echoed["body"] == payload.decode("utf-8", errors="replace")
    logged = server.requests[-1]
    assert logged["method"] == "POST" and logged["body"] == payload
    assert ("X-Custom", "one") in logged["headers"]


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_echo_reflects_any_method(server, method):
    reply = fetch(server.url_for("/echo/sub"), method=method)
    assert reply.json()["method"] == method
    assert reply.json()["path"] == "/echo/sub"


def test_echo_head_sends_headers_only(server):
    reply = fetch(server.url_for("/echo"), method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert int(reply.header("Content-Length")) > 0
    assert server.requests[-1]["method"] == "HEAD"


def test_large_post_with_expect_continue(server):
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    reply = fetch(server.url_for("/echo"), body=payload,
                  headers=["Expect: 100-continue"], timeout_ms=10_000)
    assert reply.status == 200
    assert any(line.startswith("HTTP/1.1 100") for line in reply.header_lines)
    assert base64.b64decode(reply.json()["body_base64"]) == payload


def test_chunked_upload_is_reassembled(server):
    pieces = [b"first,", b"second,", b"", b"third"]
    chunks = iter(pieces[:2] + pieces[3:])
    reply = fetch(server.url_for("/echo"), method="PUT",
                  headers=["Transfer-Encoding: chunked"],
                  UPLOAD=True, READFUNCTION=lambda size: next(chunks, b""))
    echoed = reply.json()
    assert echoed["method"] == "PUT"
    assert echoed["body"] == "first,second,third"


def test_raw_chunked_body_with_extensions_and_trailers(server):
    request = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n"
               b"3;name=value\r\nabc\r\n0\r\nTrailer: yes\r\n\r\n")
    response = raw_exchange(server, request)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"body": "abc"' in response


# --- keep-alive, pipelining, framing ----------------------------------------

def test_keep_alive_reuses_one_connection(server):
    handle = pycurl.Curl()
    first = fetch(server.url_for("/fast"), curl=handle)
    assert first.curl.getinfo(pycurl.NUM_CONNECTS) == 1
    for path in ("/echo", "/status/404", "/bytes/300", "/empty", "/fast"):
        reply = fetch(server.url_for(path), curl=handle)
        assert reply.curl.getinfo(pycurl.NUM_CONNECTS) == 0, path
    assert server.hits() == 6


def test_pipelined_requests_on_one_connection(server):
    requests = (b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
                b"GET /delay/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /status/201 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = raw_exchange(server, requests)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", response)
    assert statuses == [b"200", b"200", b"200", b"201"]
    assert response.index(b"delayed 1") < response.index(b"status 201")
    assert response.endswith(b"status 201")


def test_request_log_keeps_last_ten_thousand(server):
    total = 10_005
    request = b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
    closing = b"GET /fast?last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    response = raw_exchange(server, request * (total - 1) + closing)
    assert response.count(b"HTTP/1.1 200 OK") == total
    assert server.hits("/fast") == total
    logged = server.requests
    assert len(logged) == 10_000
    assert logged[-1]["query"] == "last"


def test_connection_close_is_honoured(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        connection.request("GET", "/echo", headers={"Connection": "close"})
        response = connection.getresponse()
        assert response.getheader("Connection") == "close"
        assert json.loads(response.read())["path"] == "/echo"
        assert response.will_close
    finally:
        connection.close()
    response = raw_exchange(server, b"GET /fast HTTP/1.0\r\n\r\n")
    assert response.endswith(b"ok")  # HTTP/1.0 without keep-alive: closed after


def test_http_client_keep_alive_and_head(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        connection.request("GET", "/fast")
        assert connection.getresponse().read() == b"ok"
        connection.request("HEAD", "/bytes/1000")
        head = connection.getresponse()
        assert head.getheader("Content-Length") == "1000" and head.read() == b""
        connection.request("GET", "/empty")
        assert connection.getresponse().read() == b""
        assert server.open_connections >= 1
    finally:
        connection.close()
    assert server.hits() == 3


def test_oversized_headers_get_431(server):
    response = raw_exchange(server, b"GET /fast HTTP/1.1\r\nX-Big: " + b"a" * 70_000
                            + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 431 ")
    assert server.hits() == 0


@pytest.mark.parametrize("request_bytes", [
    b"NOT A REQUEST\r\n\r\n",
    b"GET /fast HTTP/1.1\r\nno colon here\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
])
def test_malformed_requests_get_400(server, request_bytes):
    assert raw_exchange(server, request_bytes).startswith(b"HTTP/1.1 400 ")


# --- simple endpoints -------------------------------------------------------

def test_fast(server):
    reply = fetch(server.url_for("/fast"))
    assert (reply.status, reply.body) == (200, b"ok")
    assert reply.header("Content-Type") == "text/plain"


@pytest.mark.parametrize("code", [200, 201, 202, 301, 400, 404, 418, 500, 503, 599])
def test_status_codes_with_body(server, code):
    reply = fetch(server.url_for(f"/status/{code}"))
    assert reply.status == code
    assert reply.body == f"status {code}".encode()


@pytest.mark.parametrize("code", [204, 304])
def test_status_codes_without_body(server, code):
    reply = fetch(server.url_for(f"/status/{code}"))
    assert (reply.status, reply.body) == (code, b"")


def test_status_1xx_and_invalid(server):
    assert fetch(server.url_for("/status/101")).status == 200
    assert fetch(server.url_for("/status/600")).status == 400
    assert fetch(server.url_for("/status/abc")).status == 400


def test_unknown_path_is_404(server):
    reply = fetch(server.url_for("/no/such/thing"))
    assert (reply.status, reply.body) == (404, b"not found")
    assert server.hits("/no/") == 1


def test_empty(server):
    reply = fetch(server.url_for("/empty"))
    assert (reply.status, reply.body) == (200, b"")
    assert reply.header("Content-Length") == "0"


def test_bytes_are_exact(server):
    for length_bytes in (0, 1, 1000, 200_000):
        reply = fetch(server.url_for(f"/bytes/{length_bytes}"))
        assert reply.body == bytes(i % 256 for i in range(length_bytes))
        assert reply.header("Content-Type") == "application/octet-stream"
    reply = fetch(server.url_for("/bytes/3?content_type=image/png"))
    assert reply.header("Content-Type") == "image/png"


def test_large_body_streams_with_exact_size(server):
    length_bytes = 64 * 1024 * 1024
    received = [0, 0]

    def count(data: bytes) -> None:
        received[0] += len(data)
        received[1] += data.count(b"x")

    reply = fetch(server.url_for(f"/large/{length_bytes}"), timeout_ms=20_000,
                  WRITEFUNCTION=count)
    assert reply.status == 200
    assert received == [length_bytes, length_bytes]
    assert reply.curl.getinfo(pycurl.CONTENT_LENGTH_DOWNLOAD_T) == length_bytes


def test_chunked_body_has_no_length_and_exact_size(server):
    length_bytes = 4 * 1024 * 1024 + 7
    received = [0, 0]

    def count(data: bytes) -> None:
        received[0] += len(data)
        received[1] += data.count(b"x")

    reply = fetch(server.url_for(f"/chunked/{length_bytes}"), timeout_ms=20_000, WRITEFUNCTION=count)
    assert reply.status == 200
    assert reply.header("Transfer-Encoding") == "chunked" and reply.header("Content-Length") is None
    assert received == [length_bytes, length_bytes]


def test_large_body_respects_flow_control(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /large/1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert server.wait_for_write_pause(5)
        limit = http_server.WRITE_HIGH_WATER_BYTES + http_server.STREAM_CHUNK_BYTES
        assert server.write_buffer_bytes() <= limit
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("query, content_type, body", [
    ("charset=latin-1&text=caf%C3%A9", "text/plain; charset=latin-1", b"caf\xe9"),
    ("charset=utf-8&text=caf%C3%A9", "text/plain; charset=utf-8", b"caf\xc3\xa9"),
    ("charset=utf-16-le&text=hi", "text/plain; charset=utf-16-le", b"h\0i\0"),
    ("charset=latin-1&text=caf%C3%A9&content_type=text/plain", "text/plain", b"caf\xe9"),
])
def test_text_in_charset(server, query, content_type, body):
    reply = fetch(server.url_for(f"/text?{query}"))
    assert reply.header("Content-Type") == content_type
    assert reply.body == body


def test_text_unknown_charset_is_400(server):
    assert fetch(server.url_for("/text?charset=no-such&text=x")).status == 400


def test_headers_become_response_headers_in_order(server):
    reply = fetch(server.url_for("/headers?X-Multi=one&X-Other=o&X-Multi=two"
                                 "&Set-Cookie=a%3D1"))
    assert reply.status == 200
    sent = [(name, value) for name, value in reply.headers()
            if name in ("X-Multi", "X-Other", "Set-Cookie")]
    assert sent == [("X-Multi", "one"), ("X-Other", "o"), ("X-Multi", "two"),
                    ("Set-Cookie", "a=1")]
    assert fetch(server.url_for("/headers?X-Bad=a%0D%0AInjected:%201")).status == 400


# --- timing -----------------------------------------------------------------

def test_delay_waits_without_blocking_other_requests(server):
    multi = pycurl.CurlMulti()
    handles = []
    for _ in range(5):
        handle = pycurl.Curl()
        handle.setopt(pycurl.URL, server.url_for("/delay/300"))
        handle.setopt(pycurl.WRITEFUNCTION, lambda data: None)
        multi.add_handle(handle)
        handles.append(handle)
    started_s = time.monotonic()
    running = len(handles)
    while running:
        multi.select(0.1)
        _, running = multi.perform()
        if server.hits("/delay") == 5 and server.hits("/fast") == 0:
            assert fetch(server.url_for("/fast")).body == b"ok"  # loop not blocked
    elapsed_s = time.monotonic() - started_s
    assert 0.3 <= elapsed_s < 1.5
    assert [h.getinfo(pycurl.RESPONSE_CODE) for h in handles] == [200] * 5
    assert server.hits("/fast") == 1
    assert fetch(server.url_for("/delay/50")).body == b"delayed 50"


def test_slowloris_completes_when_fast_enough(server):
    reply = fetch(server.url_for("/slowloris?ms=1"))
    assert (reply.status, reply.body) == (200, b"slow")


def test_slowloris_trips_client_timeout(server):
    started_s = time.monotonic()
    assert curl_error(server.url_for("/slowloris"), timeout_ms=300) == pycurl.E_OPERATION_TIMEDOUT
    assert time.monotonic() - started_s < 2


def test_hang_trips_client_timeout(server):
    started_s = time.monotonic()
    assert curl_error(server.url_for("/hang"), timeout_ms=200) == pycurl.E_OPERATION_TIMEDOUT
    assert time.monotonic() - started_s < 2
    assert server.hits("/hang") == 1


# --- redirects ----------------------------------------------------------------

def test_redirect_chain_sends_one_hop_header_each(server):
    reply = fetch(server.url_for("/redirect/3"), follow=True)
    assert reply.status == 200
    hops = [line.split(":", 1)[1].strip() for line in reply.header_lines
            if line.lower().startswith("x-hop:")]
    assert hops == ["3", "2", "1", "0"]
    assert reply.header("X-Hop") == "0"
    assert reply.curl.getinfo(pycurl.EFFECTIVE_URL) == server.url_for("/redirect/0")
    assert reply.curl.getinfo(pycurl.REDIRECT_COUNT) == 3
    assert reply.json()["path"] == "/redirect/0"
    assert server.hits("/redirect/") == 4


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_status_is_selectable(server, code):
    reply = fetch(server.url_for(f"/redirect/2?status={code}"))
    assert reply.status == code
    assert reply.header("Location") == f"/redirect/1?status={code}"
    assert reply.header("X-Hop") == "2"


def test_307_redirect_keeps_method_and_body(server):
    reply = fetch(server.url_for("/redirect/1?status=307"), body=b"payload", follow=True)
    echoed = reply.json()
    assert (echoed["method"], echoed["body"]) == ("POST", "payload")


def test_redirect_to_arbitrary_url(server):
    reply = fetch(server.url_for("/redirect-to?url=file:///etc/passwd&status=301"))
    assert reply.status == 301
    assert reply.header("Location") == "file:///etc/passwd"
    error = curl_error(server.url_for("/redirect-to?url=file:///etc/passwd"),
                       follow=True,
                       REDIR_PROTOCOLS=pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    assert error == pycurl.E_UNSUPPORTED_PROTOCOL
    reply = fetch(server.url_for("/redirect-to?url=/fast"), follow=True)
    assert reply.body == b"ok"
    assert server.hits("/redirect-to") == 3


# --- misbehaviour -------------------------------------------------------------

@pytest.mark.parametrize("path, expected_errors", [
    ("/disconnect", {pycurl.E_GOT_NOTHING}),
    ("/reset", {pycurl.E_RECV_ERROR}),
    ("/garbage", {pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_FTP_WEIRD_SERVER_REPLY}),
    ("/bad-status", {pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_FTP_WEIRD_SERVER_REPLY}),
    ("/bad-header", {pycurl.E_FTP_WEIRD_SERVER_REPLY}),
    ("/truncated", {pycurl.E_PARTIAL_FILE}),
])
def test_misbehaviour_produces_client_error(server, path, expected_errors):
    assert curl_error(server.url_for(path)) in expected_errors
    assert server.hits(path) >= 1  # curl may retry once on a dead connection
    assert server.requests[0]["path"] == path


def test_misbehaviour_raw_bytes(server):
    get = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw_exchange(server, get % b"/disconnect") == b""
    assert raw_exchange(server, get % b"/garbage") == b"this is not http\r\n\r\n"
    assert raw_exchange(server, get % b"/bad-status") == b"HTTP/1.1 abc Weird\r\n\r\n"
    truncated = raw_exchange(server, get % b"/truncated")
    assert b"Content-Length: 1000\r\n" in truncated
    assert len(truncated.partition(b"\r\n\r\n")[2]) == 10
    bad_header = raw_exchange(server, get % b"/bad-header", until=b"\r\n\r\nok")
    assert b"\r\nThis header line has no colon\r\n" in bad_header
    with pytest.raises(ConnectionResetError):
        raw_exchange(server, get % b"/reset")


# --- counters ---------------------------------------------------------------

def test_hits_by_prefix_and_reset(server):
    for path in ("/fast", "/fast", "/status/200", "/status/404", "/echo"):
        fetch(server.url_for(path))
    assert server.hits() == 5
    assert server.hits("/fast") == 2
    assert server.hits("/status/") == 2
    assert server.hits("/status/4") == 1
    assert [entry["path"] for entry in server.requests] == [
        "/fast", "/fast", "/status/200", "/status/404", "/echo"]
    assert server.wait_for_hits(5) and not server.wait_for_hits(6, timeout_s=0.01)
    server.reset()
    assert server.hits() == 0 and server.requests == []


def test_the_log_stamps_arrival_and_answer_times(server):
    fetch(server.url_for("/delay/100"))
    entry = server.requests[-1]
    assert entry["answered_at_s"] - entry["at_s"] >= 0.1


def test_the_log_keeps_as_many_requests_as_asked():
    with HttpTestServer(log_size=3) as small:
        for n in range(5):
            fetch(small.url_for(f"/status/{200 + n}"))
        assert [entry["path"] for entry in small.requests] == ["/status/202", "/status/203", "/status/204"]
        assert small.hits("/status/") == 5
