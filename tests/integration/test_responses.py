"""Every request ends in one clear row: bodies, charsets, headers, redirects, caps, bad servers."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import threading

import psycopg
import pytest

from helpers import rss_bytes, wait_until
from serve_process import ServeProcess

_names = itertools.count(1)


@pytest.fixture(scope="module")
def served_db(pg_server, http_server):
    """One database and one `serve` for the module: each test waits for its own rows."""
    dbname = f"pgnet_responses_{os.getpid()}_{next(_names)}"
    dsn = pg_server.create_database(dbname)
    process = ServeProcess(dsn, "--max-response-bytes", str(32 * 1024 * 1024), workers=1).wait_ready()
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
    process.kill()
    pg_server.drop_database(dbname)


def fetch(db, url: str, timeout_ms: int = 5000, headers: dict | None = None) -> dict:
    """Queue a GET, wait for its row and return it as a dict."""
    request_id = db.execute(
        "select net.http_get(%s, headers => %s::jsonb, timeout_milliseconds => %s)",
        (url, json.dumps(headers or {}), timeout_ms),
    ).fetchone()[0]
    return wait_for_row(db, request_id, f"response row of {url}")


def wait_for_row(db, request_id: int, message: str) -> dict:
    """Wait for a request's response row and return it as a dict."""

    def stored():
        cur = db.execute("select * from net._http_response where id = %s", (request_id,))
        values = cur.fetchone()
        return dict(zip([c.name for c in cur.description], values)) if values else None

    return wait_until(stored, timeout_s=30, message=message)


def test_binary_body_with_every_byte_is_stored_whole(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/bytes/512"))
    assert row["status_code"] == 200
    assert row["content"] is None
    assert bytes(row["content_bytes"]) == bytes(i % 256 for i in range(512))
    assert row["content_type"] == "application/octet-stream"


def test_latin1_body_with_charset_is_decoded(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/text?charset=latin-1&text=caf%C3%A9%20%C2%BD"))
    assert row["content"] == "café ½"
    assert row["content_bytes"] is None
    assert row["content_type"] == "text/plain; charset=latin-1"


def test_utf8_without_charset_is_text(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/text?charset=utf-8&text=%E2%98%83&content_type=text/plain"))
    assert (row["content"], row["content_bytes"]) == ("☃", None)


def test_invalid_utf8_without_charset_keeps_the_bytes(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/text?charset=latin-1&text=caf%C3%A9&content_type=text/plain"))
    assert row["content"] is None
    assert bytes(row["content_bytes"]) == b"caf\xe9"


def test_empty_and_204_bodies_are_null(served_db, http_server):
    for path, status in (("/empty", 200), ("/status/204", 204)):
        row = fetch(served_db, http_server.url_for(path))
        assert (row["status_code"], row["content"], row["content_bytes"]) == (status, None, None)


@pytest.mark.parametrize("status", [201, 301, 404, 418, 503])
def test_any_status_is_a_response(served_db, http_server, status):
    row = fetch(served_db, http_server.url_for(f"/status/{status}"))
    assert (row["status_code"], row["content"], row["timed_out"], row["error_msg"]) == (
        status, f"status {status}", False, None)


def test_redirects_are_followed_and_final_headers_kept(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/redirect/3"))
    assert row["status_code"] == 200
    assert row["headers"]["X-Hop"] == "0"
    assert json.loads(row["content"])["path"] == "/redirect/0"


def test_redirect_to_a_non_http_scheme_is_an_error_row(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/redirect-to?url=file:///etc/passwd"))
    assert row["status_code"] is None
    assert row["error_msg"] == "Unsupported protocol"
    assert row["error_detail"] and "file" in row["error_detail"]


def test_too_many_redirects_is_an_error_row(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/redirect/15"))
    assert row["error_msg"] == "Number of redirects hit maximum amount"
    assert row["error_detail"] == "Maximum (10) redirects followed"


def test_repeated_response_headers_are_joined(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/headers?X-Multi=1&X-Multi=2&x-multi=3&X-Single=a"))
    assert row["headers"]["X-Multi"] == "1, 2, 3"
    assert row["headers"]["X-Single"] == "a"


def test_request_headers_are_sent_as_given(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/echo"),
                headers={"User-Agent": "mine/1", "X-Spaces": "a  b", "X-Empty": ""})
    sent = json.loads(row["content"])["headers"]
    assert [v for n, v in sent if n.lower() == "user-agent"] == ["mine/1"]
    assert ["X-Spaces", "a  b"] in sent
    assert ["X-Empty", ""] in sent


def test_body_over_the_cap_is_an_error_row(served_db, http_server):
    row = fetch(served_db, http_server.url_for(f"/large/{64 * 1024 * 1024}"), timeout_ms=30000)
    assert row["status_code"] is None and row["content"] is None
    assert row["error_msg"] == ("Maximum file size exceeded: the response is larger than the "
                                "33554432-byte cap (--max-response-bytes)")
    assert row["error_detail"] is None  # curl's buffer only repeats libcurl's text here


def test_streamed_body_over_the_cap_ends_early_and_memory_stays_bounded(pg_server, http_server):
    """No Content-Length to refuse up front: curl counts while receiving and stops at the cap."""
    cap_bytes, body_bytes, requests = 4 * 1024 * 1024, 256 * 1024 * 1024, 8
    dsn = pg_server.create_database(dbname := f"pgnet_cap_{os.getpid()}_{next(_names)}")
    process = ServeProcess(dsn, "--max-response-bytes", str(cap_bytes), workers=1).wait_ready()
    try:
        with psycopg.connect(dsn, autocommit=True) as db:
            fetch(db, http_server.url_for("/chunked/100000"))  # warm: a connection, a handle, a write-back
            worker = process.worker_pids()[0]
            before = rss_bytes(worker)
            peak = [before]
            done = threading.Event()

            def sample():
                while not done.wait(0.01):
                    peak[0] = max(peak[0], rss_bytes(worker) or 0)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                ids = [row[0] for row in db.execute(
                    "select net.http_get(%s, timeout_milliseconds => 30000) from generate_series(1, %s)",
                    (http_server.url_for(f"/chunked/{body_bytes}"), requests))]
                rows = [wait_for_row(db, request_id, "a capped response") for request_id in ids]
            finally:
                done.set()
                sampler.join()
    finally:
        process.kill()
        pg_server.drop_database(dbname)
    assert {(row["status_code"], row["content"], row["error_msg"]) for row in rows} == {
        (None, None, f"Maximum file size exceeded: the response is larger than the {cap_bytes}-byte cap "
                     f"(--max-response-bytes)")}
    # 2 GiB offered; at most the cap per transfer is ever held.
    assert peak[0] - before < requests * cap_bytes + 32 * 1024 * 1024, (before, peak[0])


def test_timeout_row_says_where_the_time_went(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/hang"), timeout_ms=300)
    assert row["timed_out"] is True
    assert row["status_code"] is None and row["content"] is None
    assert re.fullmatch(
        r"Timeout of 300 ms reached\. Total time: \d+\.\d{6} ms \(DNS time: \d+\.\d{6} ms, "
        r"TCP/SSL handshake time: \d+\.\d{6} ms, HTTP Request/Response time: \d+\.\d{6} ms\)",
        row["error_msg"],
    ), row["error_msg"]
    assert row["error_detail"].startswith("Operation timed out after ")


_PHASES = re.compile(r"Timeout of \d+ ms reached\. Total time: (?P<total>\d+\.\d{6}) ms \(DNS time: (?P<dns>\d+\.\d{6}) ms, "
                     r"TCP/SSL handshake time: (?P<handshake>\d+\.\d{6}) ms, "
                     r"HTTP Request/Response time: (?P<http>\d+\.\d{6}) ms\)")


def timeout_phases_ms(error_msg: str) -> dict[str, float]:
    match = _PHASES.fullmatch(error_msg)
    assert match, error_msg
    return {name: float(value) for name, value in match.groupdict().items()}


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_timeout_on_a_fresh_connection_reports_each_phase(served_db, host):
    from http_server import HttpTestServer

    with HttpTestServer() as server:  # nothing has connected to it: the connection is new
        row = fetch(served_db, f"http://{host}:{server.port}/hang", timeout_ms=300)
    assert row["timed_out"] is True
    phases = timeout_phases_ms(row["error_msg"])
    assert phases["dns"] > 0 and phases["handshake"] > 0 and phases["http"] > 0, row["error_msg"]
    assert phases["total"] >= 300
    # As pg_net counts: the gap between connect and the request being ready is in no phase.
    assert phases["dns"] + phases["handshake"] + phases["http"] <= phases["total"]


def test_concurrent_timeouts_on_fresh_connections_each_report_every_phase(served_db):
    from http_server import HttpTestServer

    with HttpTestServer() as server:
        ids = [row[0] for row in served_db.execute(
            "select net.http_get(%s, timeout_milliseconds => 300) from generate_series(1, 5)",
            (server.url_for("/hang"),)).fetchall()]
        rows = [wait_for_row(served_db, request_id, "a /hang row") for request_id in ids]
    for row in rows:
        phases = timeout_phases_ms(row["error_msg"])
        assert phases["dns"] > 0 and phases["handshake"] > 0 and phases["http"] > 0, row["error_msg"]


def test_timeout_on_a_reused_connection_reports_http_time_only(served_db):
    from http_server import HttpTestServer

    with HttpTestServer() as server:
        assert fetch(served_db, server.url_for("/echo"))["status_code"] == 200
        wait_until(lambda: server.open_connections == 1, message="the kept-alive connection")
        request_id = served_db.execute("select net.http_get(%s, timeout_milliseconds => 300)",
                                       (server.url_for("/hang"),)).fetchone()[0]
        server.wait_for_hits(1, "/hang")
        assert server.open_connections == 1  # /hang came on the kept-alive connection
        row = wait_for_row(served_db, request_id, "the /hang row")
    phases = timeout_phases_ms(row["error_msg"])
    assert (phases["dns"], phases["handshake"]) == (0, 0), row["error_msg"]
    assert phases["http"] > 0


def test_slowloris_server_times_out(served_db, http_server):
    row = fetch(served_db, http_server.url_for("/slowloris?ms=100"), timeout_ms=400)
    assert row["timed_out"] is True


# pg_net stores libcurl's text alone in error_msg; curl's detail goes to error_detail.
@pytest.mark.parametrize(
    "path, texts",
    [
        ("/disconnect", {("Server returned nothing (no headers, no data)", "Empty reply from server")}),
        ("/bad-header", {("Weird server reply", "Header without colon")}),
        ("/truncated", {("Transferred a partial file", "end of response with 990 bytes missing")}),
        ("/reset", {("Failure when receiving data from the peer", "Recv failure: Connection reset by peer")}),
        # curl calls it HTTP/0.9 on a fresh connection, a bad status line on a reused one.
        ("/garbage", {("Weird server reply", "Invalid status line"),
                      ("Unsupported protocol", "Received HTTP/0.9 when not allowed")}),
        ("/bad-status", {("Unsupported protocol", "Unsupported HTTP/1 subversion in response")}),
    ],
)
def test_misbehaving_servers_give_error_rows_and_the_worker_carries_on(served_db, http_server, path, texts):
    row = fetch(served_db, http_server.url_for(path))
    assert row["status_code"] is None
    assert row["timed_out"] is False
    assert (row["error_msg"], row["error_detail"]) in texts
    assert fetch(served_db, http_server.url_for("/echo"))["status_code"] == 200


def test_error_msg_matches_with_equals_as_with_pg_net(served_db, http_server):
    request_id = fetch(served_db, http_server.url_for("/disconnect"))["id"]
    found = served_db.execute(
        "select id from net._http_response where error_msg = 'Server returned nothing (no headers, no data)'"
        " and id = %s", (request_id,)).fetchall()
    assert found == [(request_id,)]
    result = served_db.execute("select (net._http_collect_response(%s)).message", (request_id,)).fetchone()[0]
    assert result == "Server returned nothing (no headers, no data)"


def test_refused_connection_keeps_pg_net_text(served_db):
    row = fetch(served_db, "http://127.0.0.1:1/")
    assert row["error_msg"] == "Couldn't connect to server"
    assert row["error_detail"].startswith("Failed to connect to 127.0.0.1")


def request_row(db, method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> dict:
    request_id = db.execute("select net.http_request(%s, %s, %s, headers => %s::jsonb)",
                            (method, url, body, json.dumps(headers or {}))).fetchone()[0]
    return wait_for_row(db, request_id, f"response row of {method} {url}")


def test_generic_request_sends_any_method_and_body(served_db, http_server):
    url = http_server.url_for("/echo")
    put = json.loads(request_row(served_db, "PUT", url, b"plain text", {"Content-Type": "text/plain"})["content"])
    assert (put["method"], put["body"]) == ("PUT", "plain text")
    assert ["Content-Type", "text/plain"] in put["headers"]
    binary = bytes(range(256))
    patch = json.loads(request_row(served_db, "PATCH", url, binary,
                                   {"Content-Type": "application/octet-stream"})["content"])
    assert patch["method"] == "PATCH" and base64.b64decode(patch["body_base64"]) == binary
    head = request_row(served_db, "HEAD", url)
    assert (head["status_code"], head["content"]) == (200, None)
    options = json.loads(request_row(served_db, "OPTIONS", url)["content"])
    assert options["method"] == "OPTIONS"


def test_generic_request_refuses_a_bad_method(served_db):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="method must be an HTTP method token"):
        served_db.execute("select net.http_request('BAD METHOD', 'http://127.0.0.1:1/')")
