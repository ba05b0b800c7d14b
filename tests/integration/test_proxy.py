"""Requests through an HTTP proxy: --proxy, the *_proxy env vars libcurl reads, NO_PROXY, credentials."""

from __future__ import annotations

import json
import socket

import pytest
import trustme

from connect_proxy import ConnectProxy
from helpers import wait_until
from tls_server import ProtocolServer, server_context

# libcurl's side: one PostgreSQL major is enough (see the curl_side marker).
pytestmark = pytest.mark.curl_side

# Every proxy variable libcurl looks at, emptied so the tests' own environment cannot leak in.
NO_PROXY_ENV = {name: "" for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                                      "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")}


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory):
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("proxy-pki") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


@pytest.fixture(scope="module")
def tls_server(ca_file):
    with ProtocolServer(server_context(ca_file[0])) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server():
    with ProtocolServer() as server:
        yield server


@pytest.fixture
def proxy():
    with ConnectProxy() as running:
        yield running


def fetch(db, url: str) -> dict:
    """Queue a GET, wait for its response row and return it as a dict."""
    request_id = db.execute("select net.http_get(%s, timeout_milliseconds => 10000)", (url,)).fetchone()[0]

    def stored():
        cur = db.execute("select * from net._http_response where id = %s", (request_id,))
        values = cur.fetchone()
        return dict(zip([c.name for c in cur.description], values)) if values else None

    return wait_until(stored, timeout_s=30, message=f"response row of {url}")


def test_proxy_flag_tunnels_https_and_forwards_http(db, db_dsn, serve, ca_file, tls_server, plain_server, proxy):
    with ConnectProxy() as env_proxy:
        # --proxy wins over the environment.
        serve(db_dsn, "--ca-file", ca_file[1], "--proxy", proxy.url,
              env={**NO_PROXY_ENV, "HTTPS_PROXY": env_proxy.url, "http_proxy": env_proxy.url})
        row = fetch(db, tls_server.url_for("/via-proxy"))
        assert row["status_code"] == 200
        assert json.loads(row["content"]) == {"protocol": "h2", "path": "/via-proxy", "client_cert": None}
        assert proxy.connects == [f"127.0.0.1:{tls_server.port}"]
        # The proxy's own CONNECT answer is not part of the stored response.
        assert "Proxy-Agent" not in row["headers"] and "proxy-agent" not in row["headers"]

        row = fetch(db, plain_server.url_for("/plain-via-proxy"))
        assert row["status_code"] == 200
        assert proxy.forwards == [plain_server.url_for("/plain-via-proxy")]
        assert env_proxy.connects == [] and env_proxy.forwards == []


def test_proxy_credentials_are_used_and_never_logged(db, db_dsn, serve, ca_file, tls_server):
    with ConnectProxy(credentials="pgnet:s3cret-pass") as proxy:
        process = serve(db_dsn, "--ca-file", ca_file[1], "--proxy", f"http://pgnet:s3cret-pass@127.0.0.1:{proxy.port}",
                        env=NO_PROXY_ENV)
        row = fetch(db, tls_server.url_for("/with-auth"))
        assert row["status_code"] == 200
        assert proxy.connects == [f"127.0.0.1:{tls_server.port}"] and proxy.refused == 0
        assert f"proxy: http://***@127.0.0.1:{proxy.port}" in process.log
        assert "s3cret-pass" not in process.log


def test_wrong_proxy_credentials_give_an_error_row(db, db_dsn, serve, ca_file, tls_server):
    with ConnectProxy(credentials="pgnet:right") as proxy:
        serve(db_dsn, "--ca-file", ca_file[1], "--proxy", f"http://pgnet:wrong@127.0.0.1:{proxy.port}",
              env=NO_PROXY_ENV)
        row = fetch(db, tls_server.url_for("/bad-auth"))
    assert row["status_code"] is None
    # libcurl's code for a refused tunnel is CURLE_COULDNT_CONNECT, stored in pg_net's exact words.
    assert row["error_msg"] == "Couldn't connect to server"
    assert proxy.refused == 1 and proxy.connects == []
    assert all(entry["path"] != "/bad-auth" for entry in tls_server.requests)


def test_env_proxies_are_honoured_and_no_proxy_excludes_a_host(db, db_dsn, serve, ca_file, tls_server,
                                                              plain_server, proxy):
    process = serve(db_dsn, "--ca-file", ca_file[1],
                    env={**NO_PROXY_ENV, "HTTPS_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "localhost"})
    assert f"HTTPS_PROXY={proxy.url}" in process.log

    assert fetch(db, tls_server.url_for("/env-proxied"))["status_code"] == 200
    assert fetch(db, tls_server.url_for("/env-direct", host="localhost"))["status_code"] == 200
    assert proxy.connects == [f"127.0.0.1:{tls_server.port}"]

    assert fetch(db, plain_server.url_for("/env-plain-proxied"))["status_code"] == 200
    assert fetch(db, plain_server.url_for("/env-plain-direct", host="localhost"))["status_code"] == 200
    assert proxy.forwards == [plain_server.url_for("/env-plain-proxied")]
    served = {entry["path"] for entry in tls_server.requests + plain_server.requests}
    assert {"/env-proxied", "/env-direct", "/env-plain-direct", "/env-plain-proxied"} <= served


def test_upper_case_http_proxy_is_ignored_as_libcurl_does(db, db_dsn, serve, plain_server, proxy):
    serve(db_dsn, env={**NO_PROXY_ENV, "HTTP_PROXY": proxy.url})
    row = fetch(db, plain_server.url_for("/not-proxied"))
    assert row["status_code"] == 200
    assert proxy.forwards == [] and proxy.connects == []


def test_an_unreachable_proxy_is_an_error_row(db, db_dsn, serve, ca_file, tls_server):
    # Bound but not listening: connections to the port are refused, and no one else can take it.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        serve(db_dsn, "--ca-file", ca_file[1], "--proxy", f"http://127.0.0.1:{closed_port.getsockname()[1]}",
              env=NO_PROXY_ENV)
        row = fetch(db, tls_server.url_for("/proxy-down"))
    assert row["status_code"] is None
    assert row["error_msg"] == "Couldn't connect to server"
