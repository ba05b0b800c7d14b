"""Turning libcurl's report into pg_net's row: timeouts, headers, bodies, error texts."""

import pycurl
import pytest

from pgnet_curl.response import charset_of, curl_error_detail, curl_error_text, decode_body, parse_final_headers, timeout_message


# timeout_message takes curl's *_TIME_T figures, in microseconds.
def test_timeout_in_dns():
    assert timeout_message(1000, 0, 0, 0, 0, 1001500) == (
        "Timeout of 1000 ms reached. Total time: 1001.500000 ms (DNS time: 1001.500000 ms, "
        "TCP/SSL handshake time: 0.000000 ms, HTTP Request/Response time: 0.000000 ms)")


def test_timeout_in_handshake():
    message = timeout_message(500, 2000, 0, 0, 0, 500000)
    assert "DNS time: 2.000000 ms, TCP/SSL handshake time: 498.000000 ms, HTTP Request/Response time: 0.000000 ms" in message


def test_timeout_in_http_with_tls():
    message = timeout_message(2000, 1000, 3000, 10000, 11000, 2000000)
    assert message == (
        "Timeout of 2000 ms reached. Total time: 2000.000000 ms (DNS time: 1.000000 ms, "
        "TCP/SSL handshake time: 9.000000 ms, HTTP Request/Response time: 1989.000000 ms)")


def test_timeout_on_a_fresh_loopback_connection_keeps_every_microsecond():
    # 127.0.0.1 on a fresh connection: lookup 14 us, connect 172 us, request ready at 226 us.
    message = timeout_message(300, 14, 172, 0, 226, 301478)
    assert message == (
        "Timeout of 300 ms reached. Total time: 301.478000 ms (DNS time: 0.014000 ms, "
        "TCP/SSL handshake time: 0.158000 ms, HTTP Request/Response time: 301.252000 ms)")


def test_timeout_on_a_reused_connection_is_http_time():
    message = timeout_message(100, 0, 0, 0, 100, 100000)
    assert "DNS time: 0.000000 ms, TCP/SSL handshake time: 0.000000 ms" in message
    assert "HTTP Request/Response time: 99.900000 ms" in message


def test_final_headers_after_redirect_and_continue():
    raw = (b"HTTP/1.1 302 Found\r\nLocation: /b\r\nX-Hop: 1\r\n\r\n"
           b"HTTP/1.1 100 Continue\r\n\r\n"
           b"HTTP/1.1 200 OK\r\nX-Hop: 0\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Type: text/plain\r\n\r\n")
    assert parse_final_headers(raw) == {"X-Hop": "0", "Set-Cookie": "a=1, b=2", "Content-Type": "text/plain"}


def test_headers_drop_nul_and_keep_latin1():
    assert parse_final_headers(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nX-L: caf\xe9\r\n\r\n") == {"X-A": "ab", "X-L": "café"}


@pytest.mark.parametrize(
    "content_type, charset",
    [("text/plain; charset=ISO-8859-1", "iso8859-1"), ('text/html; charset="utf-8"', "utf-8"),
     ("application/json", None), (None, None), ("text/plain; charset=nonsense", None)],
)
def test_charset_of(content_type, charset):
    assert charset_of(content_type) == charset


def test_decode_body_rules():
    assert decode_body(b"", None) == (None, None)
    assert decode_body("é".encode(), None) == ("é", None)
    assert decode_body(b"caf\xe9", "text/plain; charset=latin-1") == ("café", None)
    assert decode_body(b"caf\xe9", "text/plain") == (None, b"caf\xe9")
    assert decode_body(b"a\x00b", "text/plain") == (None, b"a\x00b")


def test_error_texts_are_libcurls_alone():
    assert curl_error_text(pycurl.E_COULDNT_CONNECT) == "Couldn't connect to server"
    assert curl_error_text(pycurl.E_COULDNT_RESOLVE_HOST) == "Couldn't resolve host name"
    assert curl_error_text(pycurl.E_GOT_NOTHING) == "Server returned nothing (no headers, no data)"
    assert curl_error_text(pycurl.E_OPERATION_TIMEDOUT) == "Timeout was reached"


def test_error_detail_is_curls_buffer_when_it_says_more():
    assert curl_error_detail("Server returned nothing (no headers, no data)", "Empty reply from server") == (
        "Empty reply from server")
    assert curl_error_detail("Couldn't connect to server", " Failed to connect to 127.0.0.1 port 1 \n") == (
        "Failed to connect to 127.0.0.1 port 1")
    assert curl_error_detail("Timeout was reached", "timeout was reached") is None
    assert curl_error_detail("Weird server reply", "") is None
