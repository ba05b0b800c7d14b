"""Drive many HTTP transfers through one pycurl CurlMulti with socket and timer callbacks.

The driver knows nothing of the database: the caller adds Requests, forwards socket events
and timeouts from its own event loop, and takes finished Responses.
"""

from __future__ import annotations

import _socket
import io
import os
import socket
import time
from functools import partial
from typing import Callable

import pycurl

from . import PG_NET_COMPAT_VERSION, __version__
from .destination_policy import DestinationPolicy, denial_message
from .model import Request, Response
from .redact import setopt_error_text
from .response import curl_error_detail, curl_error_text, decode_body, parse_final_headers, timeout_message

USER_AGENT = f"pg_net/{PG_NET_COMPAT_VERSION} (pgnet-curl/{__version__})"
_HTTP_ONLY = pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
# Easy handles kept for reuse; beyond this, finished handles are closed.
_MAX_IDLE_HANDLES = 256

WatchFd = Callable[[int, int], None]
"""watch_fd(fd, what): what is pycurl.POLL_IN, POLL_OUT, POLL_INOUT or POLL_REMOVE."""


class _Transfer:
    """One request in flight and the buffers libcurl writes its answer into."""

    __slots__ = ("request", "headers", "body", "started_s", "dirty", "denials", "opened_after_denial")

    def __init__(self, request: Request):
        self.request = request
        # Set when the request changes a handle option beyond those every request sets.
        self.dirty = False
        self.headers = io.BytesIO()
        self.body = io.BytesIO()
        self.started_s = time.monotonic()
        # Why the destination policy refused addresses for this transfer, in order.
        self.denials: list[str] = []
        # An allowed socket was opened after a denial (another address of the same host, say).
        self.opened_after_denial = False


class _OwnedFd:
    """A socket fd handed to pycurl's open-socket callback, closed once pycurl has dup()ed it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __del__(self):
        os.close(self.fd)


# libcurl calls this for each address it tries (every A/AAAA answer, each redirect target, the
# proxy when one is set) right before connect(), and not at all when it reuses a kept-alive
# connection. SOCKET_BAD makes libcurl try the next address, or end the transfer with
# E_COULDNT_CONNECT. pycurl dup()s the fd of the object returned; libcurl owns and closes the dup.
def _open_socket(policy: DestinationPolicy, transfer: _Transfer, purpose: int, address) -> _OwnedFd | int:
    """Open a socket for an address the policy allows; record the reason and refuse otherwise."""
    if address.family in (socket.AF_INET, socket.AF_INET6):
        reason = policy.denial(address.addr[0])
    else:
        reason = f"address family {address.family} is not IPv4 or IPv6"
    if reason is not None:
        transfer.denials.append(reason)
        return pycurl.SOCKET_BAD
    if transfer.denials:
        transfer.opened_after_denial = True
    # _socket.socket: the C type, without socket.socket's Python-level __init__ and __del__.
    return _OwnedFd(_socket.socket(address.family, address.socktype, address.protocol).detach())


class CurlDriver:
    """A CurlMulti whose sockets and timer are watched by the caller's event loop."""

    def __init__(self, watch_fd: WatchFd, max_redirects: int = 10, max_host_connections: int = 0,
                 max_total_connections: int = 0, max_response_bytes: int = 100 * 1024 * 1024,
                 ca_file: str | None = None, ca_path: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, proxy: str | None = None,
                 destination_policy: DestinationPolicy | None = None):
        self._watch_fd = watch_fd
        self._policy = destination_policy or DestinationPolicy()
        # Given paths and proxy as (option, value) pairs; libcurl's defaults stand for the rest,
        # and with no PROXY set libcurl reads the http_proxy/https_proxy/no_proxy env vars.
        self._transport_options = [
            (option, value) for option, value in (
                (pycurl.CAINFO, ca_file), (pycurl.CAPATH, ca_path), (pycurl.SSLCERT, client_cert),
                (pycurl.SSLKEY, client_key), (pycurl.PROXY, proxy),
            ) if value
        ]
        self._multi = pycurl.CurlMulti()
        self._multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self._multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        if max_host_connections:
            self._multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, max_host_connections)
        if max_total_connections:
            self._multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max_total_connections)
            self._multi.setopt(pycurl.M_MAXCONNECTS, max_total_connections)
        self._max_redirects = max_redirects
        self._max_response_bytes = max_response_bytes
        self._transfers: dict[pycurl.Curl, _Transfer] = {}
        self._idle_handles: list[pycurl.Curl] = []
        self._finished: list[Response] = []
        # Monotonic time at which libcurl wants socket_action(SOCKET_TIMEOUT), or None.
        self.timer_deadline_s: float | None = None

    @property
    def inflight(self) -> int:
        return len(self._transfers)

    def inflight_ids(self) -> list[int]:
        return [transfer.request.id for transfer in self._transfers.values()]

    def add(self, request: Request) -> None:
        """Start sending a request; its Response comes out of take_finished()."""
        handle = self._idle_handles.pop() if self._idle_handles else self._new_handle()
        transfer = _Transfer(request)
        try:
            self._configure(handle, transfer)
        except (pycurl.error, TypeError, ValueError, UnicodeEncodeError) as exc:
            self._recycle(handle, dirty=True)
            self._finished.append(Response(request.id, error_msg=f"Invalid request: {setopt_error_text(exc)}",
                                           request=request))
            return
        self._transfers[handle] = transfer
        self._multi.add_handle(handle)

    def _new_handle(self) -> pycurl.Curl:
        handle = pycurl.Curl()
        self._set_constant_options(handle)
        return handle

    def _set_constant_options(self, handle: pycurl.Curl) -> None:
        """Options every request shares: set once per handle, again only after a reset()."""
        setopt = handle.setopt
        setopt(pycurl.NOSIGNAL, 1)
        setopt(pycurl.FOLLOWLOCATION, 1)
        setopt(pycurl.MAXREDIRS, self._max_redirects)
        setopt(pycurl.PROTOCOLS, _HTTP_ONLY)
        setopt(pycurl.REDIR_PROTOCOLS, _HTTP_ONLY)
        setopt(pycurl.USERAGENT, USER_AGENT)
        # Checked against Content-Length up front and, since libcurl 8.4, while receiving.
        setopt(pycurl.MAXFILESIZE_LARGE, self._max_response_bytes)
        # libcurl's defaults, set anyway so that no build or later change turns verification off.
        setopt(pycurl.SSL_VERIFYPEER, 1)
        setopt(pycurl.SSL_VERIFYHOST, 2)
        # h2 only where TLS ALPN offers it; plain http stays HTTP/1.1 (no h2c upgrade attempt).
        setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        for option, value in self._transport_options:
            setopt(option, value)
        # Once per handle, not per request: the callback finds the handle's transfer of the moment.
        setopt(pycurl.OPENSOCKETFUNCTION, partial(self._open_socket, handle))

    def _configure(self, handle: pycurl.Curl, transfer: _Transfer) -> None:
        """Set what this request changes; a plain GET needs no reset() of the handle afterwards."""
        request = transfer.request
        setopt = handle.setopt
        setopt(pycurl.URL, request.url)
        setopt(pycurl.WRITEFUNCTION, transfer.body.write)
        setopt(pycurl.HEADERFUNCTION, transfer.headers.write)
        setopt(pycurl.TIMEOUT_MS, request.timeout_ms)
        if request.headers:
            transfer.dirty = True
            # "Name;" is libcurl's way to send a header with an empty value.
            setopt(pycurl.HTTPHEADER, [
                f"{name}: {value}" if value != "" else f"{name};"
                for name, value in request.headers.items()
            ])
        method = request.method
        if request.body is not None:
            transfer.dirty = True
            # POSTFIELDS, not COPYPOSTFIELDS: pycurl refuses NUL bytes in the copying one; it
            # keeps a reference to the bytes for as long as the handle uses them.
            setopt(pycurl.POSTFIELDSIZE_LARGE, len(request.body))
            setopt(pycurl.POSTFIELDS, request.body)
            if method != "POST":
                setopt(pycurl.CUSTOMREQUEST, method)
        elif method == "HEAD":
            transfer.dirty = True
            setopt(pycurl.NOBODY, 1)
        elif method != "GET":
            transfer.dirty = True
            setopt(pycurl.CUSTOMREQUEST, method)

    def _recycle(self, handle: pycurl.Curl, dirty: bool) -> None:
        """Keep a finished handle for reuse, cleared of any per-request method, body or headers."""
        if len(self._idle_handles) >= _MAX_IDLE_HANDLES:
            handle.close()
            return
        if dirty:
            handle.reset()
            self._set_constant_options(handle)
        self._idle_handles.append(handle)

    def _open_socket(self, handle: pycurl.Curl, purpose: int, address) -> _OwnedFd | int:
        return _open_socket(self._policy, self._transfers[handle], purpose, address)

    def socket_event(self, fd: int, readable: bool, writable: bool) -> None:
        """Tell libcurl that fd is ready."""
        mask = (pycurl.CSELECT_IN if readable else 0) | (pycurl.CSELECT_OUT if writable else 0)
        self._multi.socket_action(fd, mask)

    def timer_event(self) -> None:
        """Run libcurl's timeouts; call when timer_deadline_s has passed."""
        self.timer_deadline_s = None
        self._multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)

    def take_finished(self) -> list[Response]:
        """Return the responses of every transfer that ended since the last call."""
        while True:
            queued, succeeded, failed = self._multi.info_read()
            for handle in succeeded:
                self._finish(handle, 0, "")
            for handle, code, message in failed:
                self._finish(handle, code, message)
            if not queued:
                break
        finished, self._finished = self._finished, []
        return finished

    def abort_all(self) -> list[Request]:
        """Stop every transfer in flight and return their requests (nothing is answered)."""
        requests = []
        for handle, transfer in list(self._transfers.items()):
            self._multi.remove_handle(handle)
            handle.close()
            requests.append(transfer.request)
        self._transfers.clear()
        return requests

    def close(self) -> None:
        self.abort_all()
        for handle in self._idle_handles:
            handle.close()
        self._idle_handles.clear()
        self._multi.close()

    def _finish(self, handle: pycurl.Curl, code: int, message: str) -> None:
        transfer = self._transfers.pop(handle)
        self._multi.remove_handle(handle)
        self._finished.append(self._response(handle, transfer, code, message))
        # The handle still points at these buffers' write(); free their memory now.
        transfer.body.close()
        transfer.headers.close()
        self._recycle(handle, transfer.dirty)

    def _response(self, handle: pycurl.Curl, transfer: _Transfer, code: int, message: str) -> Response:
        request = transfer.request
        duration_s = time.monotonic() - transfer.started_s
        if code == pycurl.E_OPERATION_TIMEDOUT:
            info = handle.getinfo
            return Response(
                request.id, timed_out=True, curl_code=code, duration_s=duration_s, request=request,
                error_msg=timeout_message(
                    request.timeout_ms, info(pycurl.NAMELOOKUP_TIME_T), info(pycurl.CONNECT_TIME_T),
                    info(pycurl.APPCONNECT_TIME_T), info(pycurl.PRETRANSFER_TIME_T), info(pycurl.TOTAL_TIME_T),
                ),
                error_detail=curl_error_detail("", message),
            )
        if code == pycurl.E_COULDNT_CONNECT and transfer.denials:
            message = denial_message(transfer.denials)
            if transfer.opened_after_denial:
                message += f"; the other addresses: {curl_error_text(code)}"
            # curl_code 0: a denial is final, never retried.
            return Response(request.id, error_msg=message, duration_s=duration_s, request=request)
        if code:
            text = curl_error_text(code)
            detail = curl_error_detail(text, message)
            if code == pycurl.E_FILESIZE_EXCEEDED:
                # Our cap, not pg_net's: the message names it and the flag that sets it.
                cap = self._max_response_bytes
                text = f"{text}: the response is larger than the {cap}-byte cap (--max-response-bytes)"
            return Response(request.id, error_msg=text, error_detail=detail, curl_code=code,
                            duration_s=duration_s, request=request)
        content_type = handle.getinfo(pycurl.CONTENT_TYPE)
        content, content_bytes = decode_body(transfer.body.getvalue(), content_type)
        return Response(
            request.id,
            status_code=handle.getinfo(pycurl.RESPONSE_CODE),
            content_type=content_type,
            headers=parse_final_headers(transfer.headers.getvalue()),
            content=content,
            content_bytes=content_bytes,
            duration_s=duration_s,
            request=request,
        )

    # libcurl callbacks: only record what libcurl asks for; never call back into libcurl here.
    def _on_socket(self, what: int, fd: int, multi, socketp) -> None:
        self._watch_fd(fd, what)

    def _on_timer(self, timeout_ms: int) -> None:
        self.timer_deadline_s = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
