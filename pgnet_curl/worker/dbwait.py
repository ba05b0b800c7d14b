"""A worker's statements wait for the server without stopping its transfers.

psycopg runs a statement by a generator that says what the socket must be ready for; its
Connection.wait drives that generator. Here the wait first polls the database's socket alone
for a short while (a healthy server answers in well under it), and past that hands the wait to
the worker loop, which polls curl's sockets too and moves the transfers on meanwhile. So a
database that goes silent (a network dropping packets, a stalled server) holds back claims and
write-backs, never the requests already in flight.
"""

from __future__ import annotations

import select
import time
from typing import Callable

import psycopg
from psycopg import errors as pg_errors
from psycopg.waiting import Ready, Wait

# A statement whose answer takes longer than this lets the transfers run while it waits.
_ALONE_S = 0.02
_POLL_EVENTS = {Wait.R: select.POLLIN, Wait.W: select.POLLOUT, Wait.RW: select.POLLIN | select.POLLOUT}
_NOT_READY = Ready(0)

# service(fd, events, timeout_s) -> poll revents of fd: waits up to timeout_s on fd and on the
# worker's other fds, handling those, and returns as soon as fd is ready (0 if it never was).
Service = Callable[[int, int, float], int]


class ServicedConnection(psycopg.Connection):
    """A psycopg connection whose waits for the server keep the worker's transfers moving."""

    service: Service | None = None

    def wait(self, gen, interval: float = 0.1, timeout: float | None = None):
        if self.service is None:
            return super().wait(gen, interval=interval, timeout=timeout)
        fd = self.pgconn.socket
        deadline_s = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        slow = False
        try:
            state = next(gen)
            poller.register(fd, _POLL_EVENTS[state])
            while True:
                events = _POLL_EVENTS[state]
                revents = 0 if slow else _revents(poller.poll(_ALONE_S * 1000))
                if not revents:
                    slow = True
                    left_s = interval if deadline_s is None else max(0.0, min(interval, deadline_s - time.monotonic()))
                    revents = self.service(fd, events, left_s)
                if not revents:
                    gen.send(_NOT_READY)
                else:
                    ready = (Ready.R if revents & (select.POLLIN | select.POLLERR | select.POLLHUP) else _NOT_READY) \
                        | (Ready.W if revents & select.POLLOUT else _NOT_READY)
                    state = gen.send(ready)
                    poller.modify(fd, _POLL_EVENTS[state])
                if deadline_s is not None and time.monotonic() >= deadline_s:
                    raise pg_errors._WaitTimeout("wait timeout expired")
        except StopIteration as done:
            return done.value


def _revents(ready: list[tuple[int, int]]) -> int:
    return ready[0][1] if ready else 0
