"""Loopback HTTP proxy that counts what goes through it: CONNECT tunnels and forwarded requests.

    with ConnectProxy(credentials="user:secret") as proxy:   # credentials: optional Basic auth
        ... --proxy proxy.url ...
        proxy.connects        # ["127.0.0.1:PORT", ...] tunnels opened, in order
        proxy.forwards        # ["http://127.0.0.1:PORT/x", ...] absolute-form requests relayed
        proxy.refused         # requests answered 407 (missing or wrong credentials)

Only loopback targets (127.0.0.1, localhost, ::1) are reached; others get 403. Threads, one
per client connection, daemon, bounded by socket timeouts; binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import selectors
import socket
import threading

from threaded_listener import ThreadedListener, close_quietly
from urllib.parse import urlsplit

SOCKET_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class ConnectProxy(ThreadedListener):
    """Tunnel CONNECT and relay absolute-form requests to loopback targets, counting each."""

    def __init__(self, credentials: str | None = None):
        super().__init__()
        self._expected_auth = ("Basic " + base64.b64encode(credentials.encode()).decode()
                               if credentials else None)
        self.connects: list[str] = []
        self.forwards: list[str] = []
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve_connection(self, client: socket.socket) -> None:
        client.settimeout(SOCKET_TIMEOUT_S)
        upstream = None
        with self._lock:
            self._sockets.add(client)
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = [line.split(":", 1) for line in header_lines if ":" in line]
            auth = next((value.strip() for name, value in headers if name.lower() == "proxy-authorization"), None)
            if self._expected_auth and auth != self._expected_auth:
                with self._lock:
                    self.refused += 1
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                path_line = None
            else:
                parts = urlsplit(target)
                host, port = parts.hostname or "", str(parts.port or 80)
                path_line = f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} {version}"
            if host not in LOOPBACK_HOSTS:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=SOCKET_TIMEOUT_S)
            with self._lock:
                self._sockets.add(upstream)
                (self.connects if path_line is None else self.forwards).append(target)
            if path_line is None:
                # The header tells whether it leaks into the stored response headers.
                client.sendall(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: test-proxy\r\n\r\n")
            else:
                kept = [f"{name}:{value}" for name, value in headers
                        if name.lower() not in ("proxy-authorization", "proxy-connection", "connection")]
                upstream.sendall("\r\n".join([path_line, *kept, "Connection: close", "", ""]).encode("latin-1"))
            if rest:
                upstream.sendall(rest)
            _pump(client, upstream)
        except OSError:
            return
        finally:
            with self._lock:
                self._sockets.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
            close_quietly(client)
            if upstream is not None:
                close_quietly(upstream)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            return None, b""
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def _pump(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side closes or stays silent for SOCKET_TIMEOUT_S."""
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ, upstream)
    selector.register(upstream, selectors.EVENT_READ, client)
    try:
        while True:
            ready = selector.select(SOCKET_TIMEOUT_S)
            if not ready:
                return
            for key, _ in ready:
                data = key.fileobj.recv(65536)
                if not data:
                    return
                key.data.sendall(data)
    finally:
        selector.close()

