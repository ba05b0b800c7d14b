"""Loopback HTTP/1.1 test server with well-behaved and misbehaving endpoints.

Standard library only: a raw ``asyncio.BufferedProtocol`` running its own event
loop in a daemon thread, so tests control every byte on the wire, keep-alive and
pipelining, and can provoke each client-side failure deliberately. Binds only
loopback addresses (127.0.0.1 by default, ::1 when asked).

    with HttpTestServer() as server:          # or server = HttpTestServer().start()
        fetch(server.url_for("/echo?a=1"))
        assert server.hits("/echo") == 1      # counted before the answer is sent
        server.requests[-1]["headers"]        # last 10,000 requests, as dicts
        server.requests[-1]["at_s"]           # monotonic arrival ("answered_at_s": answer)
        server.wait_for_hits(3, "/hang")      # block instead of sleeping
        server.reset()                        # clear counters and log

Endpoints (the path decides, query parameters modify)::

    /echo[/...]           200 JSON describing the request (HEAD: headers only)
    /fast                 200 "ok", the cheapest possible answer (benchmarks)
    /status/<code>        that status; 204/304 without body; 1xx answered as 200
    /delay/<ms>           200 "delayed <ms>" after sleeping ms milliseconds
    /redirect/<n>         302 (?status=301|303|307|308) to /redirect/<n-1>,
                          /redirect/0 answers like /echo; every hop: X-Hop: <n>
    /redirect-to?url=U    302 (?status=...) to the arbitrary URL U; X-Hop: to
    /bytes/<n>            n bytes, byte i = i % 256 (?content_type= overrides)
    /large/<n>            n bytes of "x", streamed in 64 KiB chunks
    /chunked/<n>          n bytes of "x" with no Content-Length (chunked encoding)
    /text?text=T&charset=C
                          T encoded in C (default utf-8), ?content_type= overrides
    /headers?N=v&N=v2     each query pair becomes a response header, in order
    /empty                200 with Content-Length: 0
    /disconnect           closes without answering (curl: 52 empty reply)
    /reset                closes with a TCP RST (curl: 56 recv failure)
    /garbage              "this is not http" then close
    /bad-status           "HTTP/1.1 abc Weird" then close
    /bad-header           a header line without a colon and a bare CR in a value
    /truncated            Content-Length: 1000 but only 10 bytes, then close
    /flaky/<key>?fail=N&status=S&retry_after=V
                          the first N requests to this path get S (503), with
                          Retry-After: V if given; later ones get 200
    /hang                 never answers; held until the client or server goes
    /slowloris?ms=<n>     status line and headers one byte every n ms (200),
                          then a normal body; gives up (closes) after 30 s
    anything else         404 "not found"

Run ``python tests/http_server.py --port 8080`` to serve by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import http
import ipaddress
import json
import re
import signal
import socket
import struct
import threading
import time
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import parse_qs, parse_qsl

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_CHUNK_LINE_BYTES = 4096
REQUEST_LOG_SIZE = 10_000
STREAM_CHUNK_BYTES = 64 * 1024
RECEIVE_BUFFER_BYTES = 32 * 1024
YIELD_EVERY_CHUNKS = 16
WRITE_HIGH_WATER_BYTES = 256 * 1024
SLOWLORIS_LIMIT_S = 30.0
SLOWLORIS_DEFAULT_MS = 200
STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0

_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_X_CHUNK = b"x" * STREAM_CHUNK_BYTES
_PATTERN_CHUNK = bytes(range(256)) * (STREAM_CHUNK_BYTES // 256)
_FAST_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
)
_FAST_RESPONSE_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)
_REQUEST_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) (HTTP/1\.[01])")
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection",
                              "expect"})
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class _Request:
    """Hold one parsed request, framing decisions included."""

    __slots__ = ("method", "path", "query", "version", "headers", "body",
                 "keep_alive", "head_only", "content_length", "chunked",
                 "expect_continue", "entry")

    def __init__(self, method: str, path: str, query: str, version: str,
                 headers: list[tuple[str, str]]):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = b""
        self.head_only = method == "HEAD"
        self.keep_alive = version == "HTTP/1.1"
        self.content_length = 0
        self.chunked = False
        self.expect_continue = False
        self.entry: Optional[dict] = None  # its log entry, to stamp the answer's time


class _BadRequest(Exception):
    """Signal a request that must be answered with an error status and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes | bytearray) -> _Request:
    """Parse a request line and header block (without the final CRLFCRLF)."""
    request_line, _, header_block = head.decode("latin-1").partition("\r\n")
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise _BadRequest(400, "bad request line")
    method, target, version = match.groups()
    if target[0] != "/" and target.startswith(("http://", "https://")):
        slash = target.find("/", target.find("//") + 2)  # absolute-form
        target = target[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    headers: list[tuple[str, str]] = []
    request = _Request(method, path, query, version, headers)
    if not header_block:
        return request
    for line in header_block.split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name or name[-1] in " \t" or name[0] in " \t":
            raise _BadRequest(400, "bad header line")
        value = value.strip(" \t")
        headers.append((name, value))
        name_lower = name.lower()
        if name_lower in _FRAMING_HEADERS:
            _apply_framing_header(request, name_lower, value)
    return request


def _apply_framing_header(request: _Request, name_lower: str, value: str) -> None:
    """Record what a header means for body framing and keep-alive."""
    value_lower = value.lower()
    if name_lower == "content-length":
        if not value.isdigit() or not value.isascii():
            raise _BadRequest(400, "bad content-length")
        request.content_length = int(value)
    elif name_lower == "transfer-encoding":
        if value_lower.rsplit(",", 1)[-1].strip() != "chunked":
            raise _BadRequest(501, "unsupported transfer-encoding")
        request.chunked = True
    elif name_lower == "connection":
        if "close" in value_lower:
            request.keep_alive = False
        elif "keep-alive" in value_lower:
            request.keep_alive = True
    elif name_lower == "expect":
        request.expect_continue = value_lower == "100-continue"


def _response_head(status: int, headers: list[tuple[str, str]] = (),
                   keep_alive: bool = True) -> bytes:
    """Build a status line and header block ending in CRLFCRLF."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def _parse_count(text: Optional[str]) -> Optional[int]:
    """Parse a non-negative decimal path argument, or return None."""
    if text is None or not text.isdigit() or not text.isascii():
        return None
    return int(text)


class _Connection(asyncio.BufferedProtocol):
    """Serve one client connection: parse, count, answer, keep alive."""

    def __init__(self, server: "HttpTestServer"):
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.receive_view = memoryview(bytearray(RECEIVE_BUFFER_BYTES))
        self.request: Optional[_Request] = None  # head parsed, body pending
        self.body_length = 0  # -1: chunked
        self.chunk_body: Optional[bytearray] = None
        self.chunk_remaining: Optional[int] = None  # None: expecting size line
        self.busy = False  # an asynchronous response is in progress
        self.peer_done = False  # the client half-closed: no more requests
        self.closing = False
        self.task: Optional[asyncio.Task] = None
        self.write_resumed: Optional[asyncio.Future] = None

    # --- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        """Register the connection so stop() can close it."""
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self.server._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Lend a reusable receive buffer (avoids a fresh 256 KiB bytes per read)."""
        return self.receive_view

    def buffer_updated(self, nbytes: int) -> None:
        """Buffer input and answer every complete request unless busy."""
        self.buffer += self.receive_view[:nbytes]
        if not self.busy and not self.closing:
            self._process()

    def eof_received(self) -> Optional[bool]:
        """Finish a response in progress after a half-close, then close."""
        self.peer_done = True
        return True if self.busy else None  # True keeps the transport open

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """Forget the connection and stop any response still running."""
        self.closing = True
        self.server._connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        if self.write_resumed is not None and not self.write_resumed.done():
            self.write_resumed.set_exception(ConnectionResetError("connection lost"))
            self.write_resumed.exception()  # mark retrieved

    def pause_writing(self) -> None:
        """Make streaming responses wait until the client reads."""
        if self.write_resumed is None or self.write_resumed.done():
            self.write_resumed = asyncio.get_running_loop().create_future()
        self.server._write_paused.set()

    def resume_writing(self) -> None:
        """Let streaming responses continue."""
        if self.write_resumed is not None and not self.write_resumed.done():
            self.write_resumed.set_result(None)

    # --- parsing ---------------------------------------------------------

    def _process(self) -> None:
        """Parse and dispatch buffered requests until input or turn runs out."""
        try:
            while self.buffer and not self.busy and not self.closing:
                if self.request is None and not self._read_head():
                    return
                if self.body_length and not self._read_body():
                    return
                request, self.request = self.request, None
                self._dispatch(request)
        except _BadRequest as error:
            self._fail(error.status, str(error))

    def _read_head(self) -> bool:
        """Parse the next request head from the buffer if it is complete."""
        buffer = self.buffer
        while buffer.startswith(b"\r\n"):  # tolerate empty lines between requests
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise _BadRequest(431, "request header fields too large")
            return False
        request = _parse_head(buffer[:end])
        del buffer[:end + 4]
        if request.chunked:
            self.body_length = -1
            self.chunk_body = bytearray()
            self.chunk_remaining = None
        else:
            self.body_length = request.content_length
            if self.body_length > MAX_BODY_BYTES:
                raise _BadRequest(413, "request body too large")
        self.request = request
        if (request.expect_continue and self.body_length != 0
                and request.version == "HTTP/1.1"
                and (self.body_length < 0 or len(buffer) < self.body_length)):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _read_body(self) -> bool:
        """Attach the request body from the buffer if it is complete."""
        if self.body_length < 0:
            return self._read_chunked()
        if len(self.buffer) < self.body_length:
            return False
        if self.body_length:
            self.request.body = bytes(self.buffer[:self.body_length])
            del self.buffer[:self.body_length]
        return True

    def _read_chunked(self) -> bool:
        """Decode as many chunks as are buffered; True once the last arrived."""
        buffer = self.buffer
        while True:
            if self.chunk_remaining is None:
                end = buffer.find(b"\r\n", 0, MAX_CHUNK_LINE_BYTES)
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE_BYTES:
                        raise _BadRequest(400, "bad chunk size line")
                    return False
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                try:
                    self.chunk_remaining = int(size_text, 16)
                except ValueError:
                    raise _BadRequest(400, "bad chunk size") from None
                del buffer[:end + 2]
                if len(self.chunk_body) + self.chunk_remaining > MAX_BODY_BYTES:
                    raise _BadRequest(413, "request body too large")
            if self.chunk_remaining == 0:  # trailer section, ignored
                if buffer[:2] == b"\r\n":
                    del buffer[:2]
                else:
                    end = buffer.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
                    if end < 0:
                        if len(buffer) > MAX_HEADER_BYTES:
                            raise _BadRequest(431, "trailers too large")
                        return False
                    del buffer[:end + 4]
                self.request.body = bytes(self.chunk_body)
                self.chunk_body = None
                return True
            size = self.chunk_remaining
            if len(buffer) < size + 2:
                return False
            if buffer[size:size + 2] != b"\r\n":
                raise _BadRequest(400, "chunk not followed by CRLF")
            self.chunk_body += buffer[:size]
            del buffer[:size + 2]
            self.chunk_remaining = None

    # --- answering -------------------------------------------------------

    def _dispatch(self, request: _Request) -> None:
        """Count the request, then run its handler synchronously or as a task."""
        self.server._record(request)
        path = request.path
        if path == "/fast":  # the benchmark target: skip routing entirely
            if request.keep_alive:
                self.transport.write(_FAST_RESPONSE)
            else:
                self.transport.write(_FAST_RESPONSE_CLOSE)
                self._close()
            return
        _, _, rest = path.partition("/")
        name, slash, argument = rest.partition("/")
        handler = _ROUTES.get(name)
        if handler is None:
            self._send(request, 404, b"not found")
            return
        result = handler(self, request, argument if slash else None)
        if result is not None:
            self.busy = True
            self.task = asyncio.get_running_loop().create_task(self._finish(result))

    async def _finish(self, response: Awaitable[None]) -> None:
        """Await an asynchronous response, then resume pipelined requests."""
        try:
            await response
        except (asyncio.CancelledError, ConnectionError):
            self._close()
            return
        self.task = None
        self.busy = False
        if not self.closing:
            self._process()
        if self.peer_done and not self.busy:
            self._close()

    def _send(self, request: _Request, status: int, body: bytes = b"",
              content_type: Optional[str] = "text/plain",
              headers: list[tuple[str, str]] = ()) -> None:
        """Write a complete response with Content-Length and honour keep-alive."""
        all_headers = list(headers)
        if content_type is not None:
            all_headers.insert(0, ("Content-Type", content_type))
        if status not in (204, 304) and not 100 <= status < 200:
            all_headers.append(("Content-Length", str(len(body))))
        head = _response_head(status, all_headers, request.keep_alive)
        if request.entry is not None:
            request.entry["answered_at_s"] = time.monotonic()
        if request.head_only or status in (204, 304):
            self.transport.write(head)
        else:
            self.transport.write(head + body)
        if not request.keep_alive:
            self._close()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that could not be parsed, then close."""
        body = message.encode()
        self.transport.write(_response_head(
            status, [("Content-Type", "text/plain"),
                     ("Content-Length", str(len(body)))], keep_alive=False) + body)
        self._close()

    def _close(self) -> None:
        """Flush what was written, then close, ignoring further input."""
        self.closing = True
        self.transport.close()

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is above its high water."""
        if self.write_resumed is not None and not self.write_resumed.done():
            await self.write_resumed
        if self.closing and self.transport.is_closing():
            raise ConnectionResetError("connection closed")

    async def _stream(self, request: _Request, content_type: str,
                      length_bytes: int, chunk: bytes) -> None:
        """Send length_bytes of a repeating chunk without buffering the body."""
        head = _response_head(200, [("Content-Type", content_type),
                                    ("Content-Length", str(length_bytes))],
                              request.keep_alive)
        self.transport.write(head)
        remaining = length_bytes
        view = memoryview(chunk)
        chunks_sent = 0
        while remaining > 0:
            await self._drain()
            if chunks_sent % YIELD_EVERY_CHUNKS == 0:
                await asyncio.sleep(0)  # be fair to other connections on fast readers
            piece = view if remaining >= len(chunk) else view[:remaining]
            self.transport.write(piece)
            remaining -= len(piece)
            chunks_sent += 1
        if not request.keep_alive:
            self._close()

    # --- handlers: return None when done, or an awaitable to run ----------

    def _echo(self, request: _Request, argument: Optional[str]) -> None:
        """Describe the request back to the client as JSON."""
        body = json.dumps({
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "args": parse_qs(request.query, keep_blank_values=True),
            "headers": [[name, value] for name, value in request.headers],
            "body": request.body.decode("utf-8", errors="replace"),
            "body_base64": base64.b64encode(request.body).decode("ascii"),
        }).encode()
        extra = [("X-Hop", "0")] if request.path.startswith("/redirect/") else []
        self._send(request, 200, body, "application/json", extra)

    def _status(self, request: _Request, argument: Optional[str]) -> None:
        """Answer with the status code named in the path."""
        status = _parse_count(argument)
        if status is None or not 100 <= status <= 599:
            self._send(request, 400, b"bad status code")
            return
        if status < 200:  # an interim status cannot end an exchange
            status = 200
        self._send(request, status, f"status {status}".encode())

    def _delay(self, request: _Request, argument: Optional[str]):
        """Answer after a non-blocking sleep of the given milliseconds."""
        delay_ms = _parse_count(argument)
        if delay_ms is None:
            self._send(request, 400, b"bad delay")
            return None

        async def respond() -> None:
            await asyncio.sleep(delay_ms / 1000)
            self._send(request, 200, f"delayed {delay_ms}".encode())
        return respond()

    def _redirect(self, request: _Request, argument: Optional[str]) -> None:
        """Redirect to the next lower hop; hop 0 echoes."""
        hops = _parse_count(argument)
        if hops is None:
            self._send(request, 400, b"bad hop count")
        elif hops == 0:
            self._echo(request, argument)
        else:
            target = f"/redirect/{hops - 1}"
            if request.query:
                target += "?" + request.query
            self._send_redirect(request, target, str(hops))

    def _redirect_to(self, request: _Request, argument: Optional[str]) -> None:
        """Redirect to the arbitrary URL given as ?url=."""
        url = _query_value(request, "url")
        if not url or "\r" in url or "\n" in url:
            self._send(request, 400, b"missing or bad url")
            return
        self._send_redirect(request, url, "to")

    def _send_redirect(self, request: _Request, location: str, hop: str) -> None:
        """Send a redirect whose code comes from ?status= (default 302)."""
        status_text = _query_value(request, "status") or "302"
        status = _parse_count(status_text)
        if status not in (301, 302, 303, 307, 308):
            self._send(request, 400, b"bad redirect status")
            return
        self._send(request, status, f"redirect to {location}".encode(),
                   headers=[("Location", location), ("X-Hop", hop)])

    def _bytes(self, request: _Request, argument: Optional[str]):
        """Send n bytes where byte i is i % 256."""
        length_bytes = _parse_count(argument)
        if length_bytes is None:
            self._send(request, 400, b"bad length")
            return None
        content_type = _query_value(request, "content_type") or "application/octet-stream"
        return self._sized_body(request, content_type, length_bytes, _PATTERN_CHUNK)

    def _large(self, request: _Request, argument: Optional[str]):
        """Stream n bytes of 'x' with bounded memory."""
        length_bytes = _parse_count(argument)
        if length_bytes is None:
            self._send(request, 400, b"bad length")
            return None
        return self._sized_body(request, "application/octet-stream", length_bytes,
                                _X_CHUNK)

    def _chunked(self, request: _Request, argument: Optional[str]):
        """Stream n bytes of 'x' in chunked encoding: the client learns the size only by reading."""
        length_bytes = _parse_count(argument)
        if length_bytes is None:
            self._send(request, 400, b"bad length")
            return None

        async def respond() -> None:
            self.transport.write(_response_head(200, [("Content-Type", "application/octet-stream"),
                                                      ("Transfer-Encoding", "chunked")], request.keep_alive))
            chunk = b"%x\r\n%s\r\n" % (STREAM_CHUNK_BYTES, _X_CHUNK)
            remaining = length_bytes
            chunks_sent = 0
            while remaining > 0:
                await self._drain()
                if chunks_sent % YIELD_EVERY_CHUNKS == 0:
                    await asyncio.sleep(0)
                size = min(remaining, STREAM_CHUNK_BYTES)
                self.transport.write(chunk if size == STREAM_CHUNK_BYTES
                                     else b"%x\r\n%s\r\n" % (size, _X_CHUNK[:size]))
                remaining -= size
                chunks_sent += 1
            self.transport.write(b"0\r\n\r\n")
            if not request.keep_alive:
                self._close()
        return respond()

    def _sized_body(self, request: _Request, content_type: str,
                    length_bytes: int, chunk: bytes):
        """Send small bodies at once and stream anything bigger than a chunk."""
        if request.head_only or length_bytes <= len(chunk):
            # HEAD still announces the full length.
            head = _response_head(200, [("Content-Type", content_type),
                                        ("Content-Length", str(length_bytes))],
                                  request.keep_alive)
            self.transport.write(head if request.head_only
                                 else head + chunk[:length_bytes])
            if not request.keep_alive:
                self._close()
            return None
        return self._stream(request, content_type, length_bytes, chunk)

    def _text(self, request: _Request, argument: Optional[str]) -> None:
        """Send ?text= encoded in ?charset=."""
        charset = _query_value(request, "charset") or "utf-8"
        text = _query_value(request, "text") or ""
        try:
            body = text.encode(charset)
        except (LookupError, UnicodeEncodeError) as error:
            self._send(request, 400, f"cannot encode: {error}".encode())
            return
        content_type = (_query_value(request, "content_type")
                        or f"text/plain; charset={charset}")
        self._send(request, 200, body, content_type)

    def _headers(self, request: _Request, argument: Optional[str]) -> None:
        """Turn every query pair into a response header, in order."""
        pairs = parse_qsl(request.query, keep_blank_values=True)
        for name, value in pairs:
            if (not name or not set(name) <= _TOKEN_CHARS
                    or any(c in value for c in "\r\n\0")):
                self._send(request, 400, b"bad header name or value")
                return
        self._send(request, 200, b"headers", headers=pairs)

    def _empty(self, request: _Request, argument: Optional[str]) -> None:
        """Send 200 with an empty body."""
        self._send(request, 200, b"", content_type=None)

    def _disconnect(self, request: _Request, argument: Optional[str]) -> None:
        """Close without answering."""
        self._close()

    def _reset(self, request: _Request, argument: Optional[str]) -> None:
        """Close with a TCP RST by lingering zero seconds."""
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closing = True
        self.transport.abort()

    def _raw_then_close(self, payload: bytes) -> None:
        """Write raw bytes, then close."""
        self.transport.write(payload)
        self._close()

    def _garbage(self, request: _Request, argument: Optional[str]) -> None:
        """Answer something that is not HTTP."""
        self._raw_then_close(b"this is not http\r\n\r\n")

    def _bad_status(self, request: _Request, argument: Optional[str]) -> None:
        """Answer with a non-numeric status code."""
        self._raw_then_close(b"HTTP/1.1 abc Weird\r\n\r\n")

    def _bad_header(self, request: _Request, argument: Optional[str]) -> None:
        """Answer with a colon-less header line and a bare CR in a value."""
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"This header line has no colon\r\n"
            b"X-Injected: first\rInjected-Header: second\r\n"
            b"Content-Length: 2\r\n" + (b"" if request.keep_alive else b"Connection: close\r\n")
            + b"\r\n" + (b"" if request.head_only else b"ok"))
        if not request.keep_alive:
            self._close()

    def _truncated(self, request: _Request, argument: Optional[str]) -> None:
        """Promise 1000 bytes, send 10, close."""
        self._raw_then_close(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 1000\r\n\r\n0123456789")

    def _flaky(self, request: _Request, argument: Optional[str]) -> None:
        """Fail the first ?fail=N requests to this path with ?status= (503), then answer 200.

        ?retry_after=V adds a Retry-After: V header to the failures.
        """
        failures = _parse_count(_query_value(request, "fail") or "1")
        status = _parse_count(_query_value(request, "status") or "503")
        if failures is None or status is None or not 400 <= status <= 599:
            self._send(request, 400, b"bad fail or status")
            return
        with self.server._lock:
            seen = self.server._hits[request.path]
        if seen > failures:
            self._send(request, 200, f"ok after {seen - 1} failures".encode())
            return
        retry_after = _query_value(request, "retry_after")
        self._send(request, status, f"failure {seen} of {failures}".encode(),
                   headers=[("Retry-After", retry_after)] if retry_after else [])

    def _hang(self, request: _Request, argument: Optional[str]):
        """Never answer; stay open until the client or the server closes."""
        return asyncio.get_running_loop().create_future()

    def _slowloris(self, request: _Request, argument: Optional[str]):
        """Dribble the response head a byte at a time, bounded in total time."""
        interval_ms = _parse_count(_query_value(request, "ms") or str(SLOWLORIS_DEFAULT_MS))
        if interval_ms is None:
            self._send(request, 400, b"bad ms")
            return None

        async def respond() -> None:
            loop = asyncio.get_running_loop()
            deadline_s = loop.time() + SLOWLORIS_LIMIT_S
            body = b"" if request.head_only else b"slow"
            head = _response_head(200, [("Content-Type", "text/plain"),
                                        ("Content-Length", "4")], request.keep_alive)
            for index in range(len(head)):
                if loop.time() >= deadline_s:
                    self._close()
                    return
                self.transport.write(head[index:index + 1])
                await asyncio.sleep(interval_ms / 1000)
            self.transport.write(body)
            if not request.keep_alive:
                self._close()
        return respond()


Handler = Callable[[_Connection, _Request, Optional[str]], Any]
_ROUTES: dict[str, Handler] = {
    "echo": _Connection._echo,
    "status": _Connection._status,
    "delay": _Connection._delay,
    "redirect": _Connection._redirect,
    "redirect-to": _Connection._redirect_to,
    "bytes": _Connection._bytes,
    "large": _Connection._large,
    "chunked": _Connection._chunked,
    "text": _Connection._text,
    "headers": _Connection._headers,
    "empty": _Connection._empty,
    "disconnect": _Connection._disconnect,
    "reset": _Connection._reset,
    "garbage": _Connection._garbage,
    "bad-status": _Connection._bad_status,
    "bad-header": _Connection._bad_header,
    "truncated": _Connection._truncated,
    "flaky": _Connection._flaky,
    "hang": _Connection._hang,
    "slowloris": _Connection._slowloris,
}


def _query_value(request: _Request, name: str) -> Optional[str]:
    """Return the first value of a query parameter, or None."""
    for key, value in parse_qsl(request.query, keep_blank_values=True):
        if key == name:
            return value
    return None


class HttpTestServer:
    """Serve the test endpoints on a loopback address from a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_size: int = REQUEST_LOG_SIZE):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"refusing to bind non-loopback address {host!r}")
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._hit_changed = threading.Condition(self._lock)
        self._waiter_count = 0
        self._hits: collections.Counter[str] = collections.Counter()
        self._log: collections.deque[dict] = collections.deque(maxlen=log_size)
        self._connections: set[_Connection] = set()
        self._write_paused = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    # --- lifecycle -------------------------------------------------------

    def start(self) -> "HttpTestServer":
        """Start listening in a daemon thread; return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name=f"HttpTestServer:{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError("test HTTP server did not start in time")
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list) -> None:
        """Own the event loop: listen, signal readiness, serve until stopped."""
        if hasattr(signal, "pthread_sigmask"):  # Ctrl-C must reach the main thread
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(loop.create_server(
                lambda: _Connection(self), self.host, self.port,
                reuse_address=True, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as error:  # report to start(), not to the thread
            failure.append(error)
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Close the listener and every connection, then join the thread."""
        if self._stopped or self._thread is None:
            self._stopped = True
            return
        self._stopped = True
        if self._loop is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(SHUTDOWN_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(SHUTDOWN_TIMEOUT_S)

    async def _shutdown(self) -> None:
        """Stop accepting, abort open connections and cancel their responses."""
        self._server.close()
        for connection in list(self._connections):
            connection.closing = True
            if connection.task is not None:
                connection.task.cancel()
            connection.transport.abort()
        tasks = [c.task for c in list(self._connections) if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let connection_lost callbacks run

    def __enter__(self) -> "HttpTestServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- addresses -------------------------------------------------------

    @property
    def url(self) -> str:
        """Return the base URL, bracketing IPv6 literals."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url_for(self, path: str) -> str:
        """Return the absolute URL of a path on this server."""
        return self.url + path

    # --- observations ----------------------------------------------------

    def _record(self, request: _Request) -> None:
        """Count and log a request before it is answered."""
        entry = {"method": request.method, "path": request.path,
                 "query": request.query, "headers": request.headers,
                 "body": request.body, "at_s": time.monotonic()}
        request.entry = entry
        with self._lock:
            self._hits[request.path] += 1
            self._log.append(entry)
            if self._waiter_count:
                self._hit_changed.notify_all()

    def hits(self, path_prefix: str = "/") -> int:
        """Return how many requests arrived for paths starting with a prefix."""
        with self._lock:
            return sum(count for path, count in self._hits.items()
                       if path.startswith(path_prefix))

    def wait_for_hits(self, count: int, path_prefix: str = "/",
                      timeout_s: float = 5.0) -> bool:
        """Block until hits(path_prefix) >= count, so tests need no sleeps."""
        deadline_s = time.monotonic() + timeout_s
        with self._lock:
            while sum(n for path, n in self._hits.items()
                      if path.startswith(path_prefix)) < count:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return False
                self._waiter_count += 1
                try:
                    self._hit_changed.wait(remaining_s)
                finally:
                    self._waiter_count -= 1
            return True

    @property
    def requests(self) -> list[dict]:
        """Return a snapshot of the last 10,000 requests, oldest first."""
        with self._lock:
            return list(self._log)

    @property
    def open_connections(self) -> int:
        """Return how many client connections are currently open."""
        return len(self._connections)

    def wait_for_write_pause(self, timeout_s: float = 5.0) -> bool:
        """Block until a slow reader made some response wait (flow control)."""
        return self._write_paused.wait(timeout_s)

    def write_buffer_bytes(self) -> int:
        """Return how many response bytes sit in transport buffers right now."""
        async def measure() -> int:
            return sum(c.transport.get_write_buffer_size() for c in self._connections)
        return asyncio.run_coroutine_threadsafe(measure(), self._loop).result(
            SHUTDOWN_TIMEOUT_S)

    def reset(self) -> None:
        """Forget all counted hits, logged requests and flow-control pauses."""
        with self._lock:
            self._hits.clear()
            self._log.clear()
        self._write_paused.clear()


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """Turn SIGINT/SIGTERM into a clean shutdown of main()."""
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    """Serve the test endpoints until Ctrl-C, for manual use and benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # even if inherited as ignored
        signal.signal(signum, _raise_keyboard_interrupt)
    try:
        with HttpTestServer(args.host, args.port) as server:
            print(server.url, flush=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
