"""HTTPS as a user meets it: verification on, --ca-file, client certificates, HTTP/2 over ALPN."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trustme

from helpers import wait_until
from serve_process import connected_workers
from tls_server import ProtocolServer, server_context

# libcurl's side: one PostgreSQL major is enough (see the curl_side marker).
pytestmark = pytest.mark.curl_side


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and, as PEM files, its certificate and a client certificate with its key."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    client = ca.issue_cert("client.localhost", common_name="pgnet-curl client")
    files = {"ca": folder / "ca.pem", "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return ca, {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def h2_server(pki):
    """TLS server offering h2 and http/1.1 over ALPN."""
    with ProtocolServer(server_context(pki[0])) as server:
        yield server


@pytest.fixture(scope="module")
def http11_tls_server(pki):
    """TLS server offering http/1.1 only."""
    with ProtocolServer(server_context(pki[0], alpn=("http/1.1",))) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki):
    """TLS server that refuses clients without a certificate from the test CA."""
    with ProtocolServer(server_context(pki[0], require_client_cert=True)) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server():
    """Plain-HTTP server that records an h2c attempt."""
    with ProtocolServer() as server:
        yield server


def fetch(db, url: str, timeout_ms: int = 10000) -> dict:
    """Queue a GET, wait for its response row and return it as a dict."""
    request_id = db.execute("select net.http_get(%s, timeout_milliseconds => %s)", (url, timeout_ms)).fetchone()[0]

    def stored():
        cur = db.execute("select * from net._http_response where id = %s", (request_id,))
        values = cur.fetchone()
        return dict(zip([c.name for c in cur.description], values)) if values else None

    return wait_until(stored, timeout_s=30, message=f"response row of {url}")


def test_https_needs_the_ca_file_to_trust_the_server(db, db_dsn, serve, pki, h2_server):
    process = serve(db_dsn)
    row = fetch(db, h2_server.url_for("/untrusted"))
    assert row["status_code"] is None
    # pg_net's text (libcurl's strerror), and curl's detail beside it.
    assert row["error_msg"] == "SSL peer certificate or SSH remote key was not OK"
    assert "unable to get local issuer certificate" in row["error_detail"]
    # The request never reached the server: curl gave up in the handshake.
    assert "/untrusted" not in [request["path"] for request in h2_server.requests]
    process.kill()

    serve(db_dsn, "--ca-file", pki[1]["ca"])
    row = fetch(db, h2_server.url_for("/trusted"))
    assert row["error_msg"] is None
    assert row["status_code"] == 200
    assert json.loads(row["content"])["path"] == "/trusted"


def test_ca_path_directory_is_trusted(db, db_dsn, serve, pki, h2_server, tmp_path):
    # Hashed names as OpenSSL looks them up (openssl ships with ca-certificates, which libcurl needs).
    (tmp_path / "test-ca.pem").write_bytes(pki[0].cert_pem.bytes())
    subprocess.run(["openssl", "rehash", str(tmp_path)], check=True, capture_output=True, timeout=30)
    serve(db_dsn, "--ca-path", str(tmp_path))
    row = fetch(db, h2_server.url_for("/ca-path"))
    assert (row["status_code"], row["error_msg"]) == (200, None)


def test_a_certificate_for_another_host_is_refused(db, db_dsn, serve, pki):
    serve(db_dsn, "--ca-file", pki[1]["ca"])
    with ProtocolServer(server_context(pki[0], identities=("other.localhost",))) as server:
        row = fetch(db, server.url_for("/wrong-name", host="localhost"))
    assert row["status_code"] is None
    assert row["error_msg"] == "SSL peer certificate or SSH remote key was not OK"
    assert "no alternative certificate subject name matches" in row["error_detail"]
    assert "'localhost'" in row["error_detail"]
    assert server.requests == []


def test_http2_is_used_when_the_server_offers_it(db, db_dsn, serve, pki, h2_server, http11_tls_server):
    serve(db_dsn, "--ca-file", pki[1]["ca"])
    row = fetch(db, h2_server.url_for("/h2"))
    assert row["status_code"] == 200
    assert row["headers"]["x-served-protocol"] == "h2"
    assert json.loads(row["content"]) == {"protocol": "h2", "path": "/h2", "client_cert": None}
    assert row["content_type"] == "application/json"

    row = fetch(db, http11_tls_server.url_for("/h1"))
    assert row["status_code"] == 200
    assert row["headers"]["X-Served-Protocol"] == "http/1.1"
    assert json.loads(row["content"])["protocol"] == "http/1.1"


def test_a_burst_is_served_over_the_protocol_each_server_offers(db, db_dsn, serve, pki, h2_server,
                                                                 http11_tls_server):
    serve(db_dsn, "--ca-file", pki[1]["ca"])
    for server, protocol in ((h2_server, "h2"), (http11_tls_server, "http/1.1")):
        ids = [db.execute("select net.http_get(%s)", (server.url_for(f"/many/{n}"),)).fetchone()[0]
               for n in range(30)]
        rows = wait_until(
            lambda: (lambda r: r if len(r) == len(ids) else None)(db.execute(
                "select status_code, content from net._http_response where id = any(%s) order by id",
                (ids,)).fetchall()),
            timeout_s=30, message=f"30 {protocol} response rows",
        )
        assert [status for status, _ in rows] == [200] * 30
        assert [json.loads(content)["protocol"] for _, content in rows] == [protocol] * 30
        assert [json.loads(content)["path"] for _, content in rows] == [f"/many/{n}" for n in range(30)]

    # Open h2 connections are shared: a second burst opens none.
    connections_before = h2_server.connections
    ids = [db.execute("select net.http_get(%s)", (h2_server.url_for(f"/again/{n}"),)).fetchone()[0] for n in range(10)]
    wait_until(lambda: db.execute("select count(*) = 10 from net._http_response where id = any(%s) "
                                  "and status_code = 200", (ids,)).fetchone()[0], message="10 more rows")
    assert h2_server.connections == connections_before


def test_plain_http_stays_http11_without_h2c(db, db_dsn, serve, pki, plain_server):
    serve(db_dsn, "--ca-file", pki[1]["ca"])
    row = fetch(db, plain_server.url_for("/plain"))
    assert row["status_code"] == 200
    assert row["headers"]["X-Served-Protocol"] == "http/1.1"
    seen = [entry for entry in plain_server.requests if entry["path"] == "/plain"]
    assert [entry["protocol"] for entry in seen] == ["http/1.1"]
    names = {name.lower() for name, _ in seen[0]["headers"]}
    assert "upgrade" not in names and "http2-settings" not in names


def test_client_certificate_is_sent_when_configured(db, db_dsn, serve, pki, mtls_server):
    files = pki[1]
    process = serve(db_dsn, "--ca-file", files["ca"])
    refused_before = mtls_server.handshake_failures
    row = fetch(db, mtls_server.url_for("/no-cert"))
    assert row["status_code"] is None
    # TLS 1.3 refuses after the client's handshake ends: libcurl sees an alert or a reset.
    assert row["error_msg"].startswith(("Failure when receiving data", "Failed sending data", "SSL"))
    wait_until(lambda: mtls_server.handshake_failures > refused_before, message="the server to refuse the handshake")
    assert mtls_server.requests == []
    process.kill()

    serve(db_dsn, "--ca-file", files["ca"], "--client-cert", files["client_cert"],
          "--client-key", files["client_key"])
    row = fetch(db, mtls_server.url_for("/with-cert"))
    assert row["status_code"] == 200
    assert json.loads(row["content"]) == {"protocol": "h2", "path": "/with-cert", "client_cert": "pgnet-curl client"}


def test_tls_flags_come_from_env_vars_too(db, db_dsn, serve, pki, mtls_server):
    files = pki[1]
    serve(db_dsn, env={"PGNET_CA_FILE": files["ca"], "PGNET_CLIENT_CERT": files["client_cert"],
                       "PGNET_CLIENT_KEY": files["client_key"]})
    row = fetch(db, mtls_server.url_for("/env"))
    assert row["status_code"] == 200
    assert json.loads(row["content"])["client_cert"] == "pgnet-curl client"


@pytest.mark.parametrize("flags, message", [
    (["--ca-file", "{missing}"], "--ca-file {missing} is not a readable file"),
    (["--ca-file", "{client_key}"], "holds no usable PEM certificate"),
    (["--ca-path", "{ca}"], "--ca-path {ca} is not a readable directory"),
    (["--client-cert", "{client_cert}"], "must be a PEM certificate and its matching, unencrypted private key"),
    (["--client-key", "{client_key}"], "--client-key needs --client-cert"),
    (["--proxy", "socks5://user:pw@127.0.0.1:1080"], "--proxy must look like http://host:port, got 'socks5://***@127.0.0.1:1080'"),
])
def test_bad_tls_or_proxy_flags_stop_serve_with_exit_2(db_dsn, pki, tmp_path, flags, message):
    names = {**pki[1], "missing": str(tmp_path / "missing.pem")}
    result = subprocess.run(
        [sys.executable, "-m", "pgnet_curl", "serve", "--dsn", db_dsn, *[flag.format(**names) for flag in flags]],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert message.format(**names) in result.stderr
    assert "Traceback" not in result.stderr and "pw@" not in result.stderr
    assert connected_workers(db_dsn) == 0
