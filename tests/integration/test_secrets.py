"""Secrets stay secret: header values, bodies, URL queries and userinfo, and the DSN's password
never reach pgnet-curl's logs (debug included, text and JSON), /metrics or the error_msg it writes."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from helpers import wait_until
from serve_process import ServeProcess

# Distinct per place, so a failure says which one leaked. The test server echoes none of them
# except on /echo, whose row the database is made to refuse (its content is the caller's data).
HEADER_SECRET = "hdr-9f2c41d7e3"
QUERY_SECRET = "qry-5b8e07a6c2"
PARAM_SECRET = "prm-3d1f96b4a8"
USER_SECRET = "usr-7a4c2e9b15"
BODY_SECRET = "bdy-2e6b58f1d0"
DB_SECRET = "dbp-8c3a71e5f4"
SECRETS = (HEADER_SECRET, QUERY_SECRET, PARAM_SECRET, USER_SECRET, BODY_SECRET, DB_SECRET)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def secret_url(http_server, path: str) -> str:
    """http://user:SECRET@127.0.0.1:port/path?token=SECRET (path may carry its own query)."""
    plain = http_server.url_for(path)
    scheme, rest = plain.split("://", 1)
    separator = "&" if "?" in path else "?"
    return f"{scheme}://user:{USER_SECRET}@{rest}{separator}token={QUERY_SECRET}"


def send(db, url: str, timeout_ms: int = 5000, headers: dict | None = None) -> int:
    """POST with a secret in a header, the URL (userinfo, query, params) and the body."""
    return db.execute(
        "select net.http_request('POST', %s, %s, %s, %s, %s)",
        (url, f"payload {BODY_SECRET}".encode(), json.dumps({"key": PARAM_SECRET}),
         json.dumps(headers or {"Authorization": f"Bearer {HEADER_SECRET}"}), timeout_ms),
    ).fetchone()[0]


def rows(db) -> dict[int, tuple]:
    return {id: (status, timed_out, error_msg) for id, status, timed_out, error_msg in db.execute(
        "select id, status_code, timed_out, error_msg from net._http_response").fetchall()}


def wait_for_rows(db, ids: list[int], timeout_s: float = 30) -> dict[int, tuple]:
    return wait_until(lambda: (found := rows(db)) and all(i in found for i in ids) and found, timeout_s,
                      message=f"responses of requests {ids}")


def wait_claimed(db, ids: list[int]) -> None:
    wait_until(lambda: db.execute("select count(*) from net.http_request_queue where id = any(%s) "
                                  "and lease_owner is not null", (ids,)).fetchone()[0] == len(ids),
               message=f"requests {ids} claimed")


def assert_no_secret(text: str, where: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{leaked} in {where}:\n{text}"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_logs_metrics_or_error_rows(db, db_dsn, serve, http_server, log_format):
    # Refuse the row of an echoed request, so psycopg's DETAIL would quote the secrets it holds.
    db.execute("alter table net._http_response add constraint no_marker "
               "check (content is null or content not like '%%refuse-me%%')")
    metrics_port = free_port()
    # Trust authentication ignores the password, but every message naming the DSN would show it.
    # --log-level and --log-format are options of the command group, so given by environment.
    process = serve(f"{db_dsn} password={DB_SECRET}", "--metrics-port", str(metrics_port),
                    "--metrics-host", "127.0.0.1", "--max-redirects", "2",
                    env={"PGNET_LOG_LEVEL": "debug", "PGNET_LOG_FORMAT": log_format})

    ids = {
        "http_500": send(db, secret_url(http_server, "/status/500")),
        "timeout": send(db, secret_url(http_server, "/delay/3000"), timeout_ms=200),
        "refused": send(db, f"http://user:{USER_SECRET}@127.0.0.1:1/x?token={QUERY_SECRET}"),
        "redirect_refused": send(db, secret_url(http_server, "/redirect-to?url=http://127.0.0.1:1/next")),
        "too_many_redirects": send(db, secret_url(http_server, "/redirect/5")),
        "invalid_header": send(db, secret_url(http_server, "/status/200"),
                               headers={"X-Token": f"{HEADER_SECRET}\u00e9"}),
        "refused_store": send(db, secret_url(http_server, "/echo/refuse-me")),
    }
    found = wait_for_rows(db, list(ids.values()))
    assert found[ids["http_500"]][0] == 500
    assert found[ids["timeout"]][1] is True
    assert found[ids["refused"]][2] == "Couldn't connect to server"
    assert found[ids["redirect_refused"]][2] == "Couldn't connect to server"
    assert "redirects" in found[ids["too_many_redirects"]][2].lower()
    assert found[ids["invalid_header"]][2].startswith("Invalid request: a character that is not ASCII")
    stored_error = found[ids["refused_store"]][2]
    assert_no_secret(stored_error, "the refused row's error_msg")
    assert stored_error.startswith("the response could not be stored") and "23514" in stored_error

    # In flight across net.worker_restart() and a SIGTERM drain.
    restart_ids = [send(db, secret_url(http_server, "/delay/800")) for _ in range(3)]
    wait_claimed(db, restart_ids)
    assert db.execute("select net.worker_restart()").fetchone()[0] is True
    wait_until(lambda: "restarting its database session" in process.log, message="the restart")
    drain_ids = [send(db, secret_url(http_server, "/delay/1500")) for _ in range(3)]
    wait_claimed(db, drain_ids)
    metrics_text = wait_until(lambda: (text := scrape(metrics_port)) and 'outcome="timeout"' in text and text,
                              message="the timeout counted in /metrics")
    assert process.stop() == 0
    found = wait_for_rows(db, restart_ids + drain_ids, timeout_s=5)
    assert {found[i][0] for i in restart_ids + drain_ids} == {200}

    log = process.log
    # Debug lines name each request by its safe URL: the logging under test is really on.
    assert f"{http_server.url_for('/status/500')} -> 500" in log
    assert "draining" in log and "stopped" in log
    assert "serving database" in log and "password=***" in log
    if log_format == "json":
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert {"debug", "info"} <= {entry["level"] for entry in entries}
    assert_no_secret(log, "the serve log")
    assert "DEBUG psycopg" not in log and '"logger": "psycopg' not in log
    assert_no_secret(metrics_text, "/metrics")
    assert_no_secret("\n".join(str(error) for _, _, error in rows(db).values()), "error_msg")
    details = db.execute("select string_agg(error_detail, E'\\n') from net._http_response").fetchone()[0]
    assert details, "curl's details are stored"
    assert_no_secret(details, "error_detail")


def test_bad_dsns_do_not_show_their_password(empty_db_dsn):
    refused = ServeProcess(f"postgresql://nobody:{DB_SECRET}@127.0.0.1:1/none?connect_timeout=2")
    assert refused.proc.wait(30) == 3
    assert "Connection refused" in refused.log
    # libpq quotes the piece it cannot parse: here a fragment of the password.
    unparseable = ServeProcess(f"host=127.0.0.1 port=1 password={DB_SECRET} {DB_SECRET}")
    assert unparseable.proc.wait(30) == 2
    assert "the DSN is not a valid connection string" in unparseable.log
    for process in (refused, unparseable):
        assert_no_secret(process.log, "the serve log")
        assert "Traceback" not in process.log
