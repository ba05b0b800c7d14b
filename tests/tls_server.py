"""Loopback server, TLS or plain, that says which protocol it served: h2 or http/1.1.

Every answer is 200 with the header ``X-Served-Protocol`` and a JSON body
``{"protocol": ..., "path": ..., "client_cert": <subject CN or null>}``. Over TLS it
offers the ALPN protocols it is given (h2 served with the ``h2`` package); over plain
TCP it speaks HTTP/1.1 only and records whether the client tried h2c.

    with ProtocolServer(ssl_context) as server:
        fetch(server.url_for("/x"))
        server.requests[-1]["protocol"]   # "h2" or "http/1.1"
        server.handshake_failures         # TLS handshakes the server refused or lost
        server.connections                # TCP connections accepted

Threads, one per connection, daemon, bounded by socket timeouts; binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading

from threaded_listener import ThreadedListener, close_quietly

import h2.config
import h2.connection
import h2.events

SOCKET_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024


def server_context(ca, *, alpn: tuple[str, ...] = ("h2", "http/1.1"), require_client_cert: bool = False,
                   identities: tuple[str, ...] = ("127.0.0.1", "localhost")) -> ssl.SSLContext:
    """A server SSLContext with a certificate from a trustme CA for the given names."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*identities).configure_cert(context)
    context.set_alpn_protocols(list(alpn))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(context)
    return context


class ProtocolServer(ThreadedListener):
    """Answer every request with the protocol it came over; log each request."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        super().__init__()
        self.ssl_context = ssl_context
        self._requests: list[dict] = []
        self.handshake_failures = 0

    def url_for(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def requests(self) -> list[dict]:
        with self._lock:
            return list(self._requests)


    def serve_connection(self, client: socket.socket) -> None:
        client.settimeout(SOCKET_TIMEOUT_S)
        sock = client
        with self._lock:
            self._sockets.add(client)
        try:
            if self.ssl_context:
                try:
                    sock = self.ssl_context.wrap_socket(client, server_side=True)
                except (ssl.SSLError, OSError):
                    with self._lock:
                        self.handshake_failures += 1
                    return
                with self._lock:
                    self._sockets.add(sock)
            if getattr(sock, "selected_alpn_protocol", lambda: None)() == "h2":
                self._serve_h2(sock)
            else:
                self._serve_http11(sock)
        except (ssl.SSLError, OSError):
            # A TLS 1.3 client certificate is checked after the handshake: a refusal lands here.
            with self._lock:
                self.handshake_failures += 1
        finally:
            with self._lock:
                self._sockets.discard(client)
                self._sockets.discard(sock)
            close_quietly(sock)

    def _record(self, protocol: str, method: str, path: str, headers: list[tuple[str, str]],
                sock: socket.socket) -> bytes:
        """Log a request; return the JSON body that answers it."""
        client_cert = _client_common_name(sock)
        with self._lock:
            self._requests.append({"protocol": protocol, "method": method, "path": path,
                                   "headers": headers, "client_cert": client_cert})
        return json.dumps({"protocol": protocol, "path": path, "client_cert": client_cert}).encode()

    def _serve_http11(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                if len(buffer) > MAX_HEAD_BYTES:
                    return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                if buffer.startswith(b"PRI * HTTP/2.0"):
                    self._record("h2c-prior-knowledge", "PRI", "*", [], sock)
                    return
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _version = request_line.split(" ", 2)
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in header_lines if ":" in line]
            fields = {name.lower(): value for name, value in headers}
            length = int(fields.get("content-length", "0"))
            while len(buffer) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            body = self._record("http/1.1", method, path, headers, sock)
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Served-Protocol: http/1.1\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            if fields.get("connection", "").lower() == "close":
                return

    def _serve_h2(self, sock: socket.socket) -> None:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        requests: dict[int, tuple[str, str, list]] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = [(_text(name), _text(value)) for name, value in event.headers]
                    pseudo = dict(headers)
                    requests[event.stream_id] = (pseudo.get(":method", ""), pseudo.get(":path", ""), headers)
                if isinstance(event, h2.events.StreamEnded) and event.stream_id in requests:
                    method, path, headers = requests.pop(event.stream_id)
                    body = self._record("h2", method, path, headers, sock)
                    connection.send_headers(event.stream_id, [
                        (":status", "200"), ("content-type", "application/json"),
                        ("x-served-protocol", "h2"), ("content-length", str(len(body))),
                    ])
                    connection.send_data(event.stream_id, body, end_stream=True)
                if isinstance(event, h2.events.ConnectionTerminated):
                    sock.sendall(connection.data_to_send())
                    return
            sock.sendall(connection.data_to_send())


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _client_common_name(sock: socket.socket) -> str | None:
    getpeercert = getattr(sock, "getpeercert", None)
    cert = getpeercert() if getpeercert else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None

