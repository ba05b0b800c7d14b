"""What may appear in logs and error texts: URLs, DSNs and errors with their secrets removed."""

from __future__ import annotations

import io
import json
import logging

import psycopg
import pycurl
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgnet_curl import logs
from pgnet_curl.redact import db_error_text, safe_dsn, safe_url, scrub, setopt_error_text

SECRET = "s3cr3t-T0KEN"


@pytest.mark.parametrize("url, expected", [
    (f"http://user:{SECRET}@127.0.0.1:8080/p/a?token={SECRET}#{SECRET}", "http://127.0.0.1:8080/p/a"),
    (f"https://{SECRET}@example.test/x", "https://example.test/x"),
    (f"http://[::1]:81/?k={SECRET}", "http://[::1]:81/"),
    ("http://127.0.0.1", "http://127.0.0.1"),
    (f"http://h:99999/?{SECRET}", "<unparseable URL>"),
])
def test_safe_url_keeps_scheme_host_port_and_path_only(url, expected):
    assert safe_url(url) == expected


@pytest.mark.parametrize("dsn, expected", [
    (f"postgresql://app:{SECRET}@db.test:5433/main?sslmode=require",
     {"user": "app", "password": "***", "dbname": "main", "host": "db.test", "port": "5433", "sslmode": "require"}),
    (f"host=db.test password='{SECRET} x' user=app", {"host": "db.test", "password": "***", "user": "app"}),
    (f"postgresql://app@db.test/main?password={SECRET}",
     {"user": "app", "password": "***", "dbname": "main", "host": "db.test"}),
    ("host=db.test dbname=main", {"host": "db.test", "dbname": "main"}),
])
def test_safe_dsn_masks_the_password(dsn, expected):
    safe = safe_dsn(dsn)
    assert SECRET not in safe and conninfo_to_dict(safe) == expected


def test_safe_dsn_of_an_unparseable_dsn_shows_none_of_it():
    assert safe_dsn(f"host=db.test password={SECRET} junk") == "<unparseable DSN>"


@pytest.mark.parametrize("text", [
    f"could not reach http://user:{SECRET}@127.0.0.1:1/path",
    f"redirected to https://127.0.0.1/next?token={SECRET}&x=1",
    f"dsn host=h password={SECRET} port=1",
    f"dsn host=h password = '{SECRET} with spaces'",
    f"psql postgresql://app:{SECRET}@127.0.0.1/db",
])
def test_scrub_masks_userinfo_queries_and_passwords(text):
    scrubbed = scrub(text)
    assert SECRET not in scrubbed and "***" in scrubbed


def test_scrub_leaves_ordinary_text_alone():
    text = 'Failed to connect to 127.0.0.1 port 1 after 0 ms: password authentication failed for user "x"'
    assert scrub(text) == text


@pytest.mark.parametrize("dsn", [f"host=127.0.0.1 password={SECRET} more", f"postgresql://u:{SECRET}%zz@127.0.0.1/db"])
def test_dsn_parse_errors_lose_the_fragment_libpq_quotes(dsn):
    with pytest.raises(psycopg.ProgrammingError) as caught:
        conninfo_to_dict(dsn)
    assert SECRET in str(caught.value) or "more" in str(caught.value)  # libpq quotes it
    text = db_error_text(caught.value)
    assert SECRET not in text and "more" not in text
    assert "connection info string" in text or "percent-encoded" in text


@pytest.mark.parametrize("option, value", [
    (pycurl.HTTPHEADER, [f"X-Token: {SECRET}\u00e9"]),
    (pycurl.HTTPHEADER, [f"X-Token: {SECRET}\x00"]),
    (pycurl.URL, f"http://127.0.0.1/?token={SECRET}\u00e9"),
])
def test_setopt_errors_do_not_quote_the_value(option, value):
    with pytest.raises((UnicodeEncodeError, ValueError)) as caught:
        pycurl.Curl().setopt(option, value)
    text = setopt_error_text(caught.value)
    assert SECRET not in text and "\u00e9" not in text and "URL, method or a header" in text


def _log_through(log_format: str, level: str, logger_name: str, message: str, *args) -> str:
    stream = io.StringIO()
    logs.configure(level, log_format)
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)
    try:
        logging.getLogger(logger_name).debug(message, *args)
        logging.getLogger(logger_name).warning(message, *args)
        try:
            raise RuntimeError(f"from http://u:{SECRET}@127.0.0.1/?q={SECRET}")
        except RuntimeError:
            logging.getLogger(logger_name).exception(message, *args)
    finally:
        logs.configure("info", "text")
    return stream.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_lines_mask_urls_and_dsns_as_a_last_resort(log_format):
    out = _log_through(log_format, "debug", "pgnet_curl.worker", "got %s and %s",
                       f"http://u:{SECRET}@127.0.0.1/p?token={SECRET}", f"host=h password={SECRET}")
    assert SECRET not in out
    assert "http://***@127.0.0.1/p?***" in out and "password=***" in out
    if log_format == "json":
        entries = [json.loads(line) for line in out.splitlines()]
        assert [entry["level"] for entry in entries] == ["debug", "warning", "error"]
        assert "RuntimeError" in entries[-1]["exception"]


def test_debug_level_is_ours_only():
    out = _log_through("text", "debug", "psycopg", "connection attempt: %s", "x")
    assert "DEBUG" not in out and "WARNING psycopg" in out
    out = _log_through("text", "debug", "pgnet_curl.worker", "request %s", "x")
    assert "DEBUG pgnet_curl.worker" in out


def test_request_and_response_reprs_leave_out_url_headers_and_bodies():
    from pgnet_curl.model import Request, Response

    request = Request(1, "POST", f"http://u:{SECRET}@127.0.0.1/?t={SECRET}", {"Authorization": SECRET},
                      SECRET.encode(), 1000)
    response = Response(1, 200, "text/plain", {"Set-Cookie": SECRET}, SECRET, SECRET.encode(), request=request)
    assert SECRET not in repr(request) and SECRET not in repr(response)
    assert "id=1" in repr(response) and "method='POST'" in repr(response)
