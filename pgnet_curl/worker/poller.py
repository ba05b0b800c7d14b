"""The worker's one poller: every fd it waits on (curl's sockets, the database, the signal pipe) by kind."""

from __future__ import annotations

import select

import pycurl

CURL, DB, SIGNAL = "curl", "db", "signal"
# epoll and poll share these bit values. Errors and hang-ups count as readable: the reader
# (libcurl or libpq) finds out what happened.
READABLE = select.POLLIN | select.POLLERR | select.POLLHUP
WRITABLE = select.POLLOUT
_CURL_EVENTS = {
    pycurl.POLL_IN: select.POLLIN,
    pycurl.POLL_OUT: select.POLLOUT,
    pycurl.POLL_INOUT: select.POLLIN | select.POLLOUT,
}


class Poller:
    """epoll directly (poll where there is none): selectors costs more per call, and libcurl adds
    and removes a socket for every request on a kept-alive connection."""

    def __init__(self):
        self.kinds: dict[int, str] = {}
        self._poller = select.epoll() if hasattr(select, "epoll") else select.poll()
        self._uses_ms = not hasattr(select, "epoll")

    def poll(self, timeout_s: float) -> list[tuple[int, int]]:
        return self._poller.poll(timeout_s * 1000 if self._uses_ms else timeout_s)

    def watch(self, fd: int, events: int, kind: str) -> None:
        if fd in self.kinds:
            try:
                self._poller.modify(fd, events)
                self.kinds[fd] = kind
                return
            except OSError:
                # The fd number was closed and reused unannounced: register it afresh.
                self.unwatch(fd)
        self._poller.register(fd, events)
        self.kinds[fd] = kind

    def unwatch(self, fd: int) -> None:
        if self.kinds.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (OSError, KeyError, ValueError):
                pass

    def watch_curl_fd(self, fd: int, what: int) -> None:
        """Mirror libcurl's interest in a socket (its socket callback)."""
        if what == pycurl.POLL_REMOVE:
            if self.kinds.get(fd) is CURL:
                self.unwatch(fd)
            return
        self.watch(fd, _CURL_EVENTS[what], CURL)
