"""The circuit breaker's part in a worker: per-host failure counts in memory, the circuits the
database says are open, and at most one request at a time to a host whose last request failed,
each after the write-back of the failure before it (so that a host that goes down gets about N
attempts before its circuit opens, not a batch).

A successful request to a healthy host costs a couple of attribute reads here: a URL is parsed
only while some host is failing or held (then `watching` is true).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import retry
from ..model import Request, Response
from ..queue import Queue
from ..url_host import url_host
from .context import WorkerContext

# A probe found nothing to send (no request to the host is queued): look again this much later.
_PROBE_RECHECK_S = 1.0
# Consecutive failures after which a worker sends a host one request at a time, until one succeeds.
_GATE_AFTER_FAILURES = 1
# A host the database says is failing is not gated by a worker that saw it succeed this recently:
# the database's row may predate that success's reset.
_RECENT_SUCCESS_S = 2.0
_STATES = ("closed", "open", "half_open")


@dataclass
class _Failing:
    """A host with failures and no success since: its consecutive failures seen by this worker."""

    failures: int
    last_failure_s: float
    # When this run of failures began (monotonic): a success of a request sent before says nothing.
    since_s: float = 0.0
    # This worker's requests in flight to it (at most one, once it is failing).
    inflight: int = 0
    # Its last failure is not written back yet: the database's count is behind; send nothing more.
    unwritten: bool = False

    def busy(self) -> bool:
        return self.failures >= _GATE_AFTER_FAILURES and (self.inflight > 0 or self.unwritten)


def is_host_failure(response: Response) -> bool:
    """A failure the host is to blame for: a connection error, a timeout, a 5xx."""
    if response.status_code is not None:
        return response.status_code >= 500
    return response.timed_out or retry.is_network_failure(response.curl_code)


class Circuits:
    """Which hosts to hold requests for, and the failures that may open their circuits."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        # Failures 0 (--no-circuit-breaker): this worker counts none; it still holds the requests of
        # circuits other serves of the database opened, and probes them.
        self.params = ctx.circuit_params
        self.failing: dict[str, _Failing] = {}
        # Hosts whose circuit is open or half-open: their requests are held in the queue.
        self.held: set[str] = set()
        # Monotonic time at which an open circuit's cool-down ends (a probe is due), or None.
        self.probe_due_s: float | None = None
        # Hosts whose run of failures a success ended: the database forgets their counts too.
        self.resets: set[str] = set()
        # Claimed requests not to send: to hosts held now. Given back to the queue (no attempt counted).
        self.to_release: list[Request] = []
        # Waiting requests that may go now (their host's last failure is written back).
        self.ready: list[Request] = []
        # Per host, (request, when it began waiting) for requests claimed while one is in flight there.
        self._waiting: dict[str, list[tuple[Request, float]]] = {}
        self._inflight: dict[int, str] = {}
        # When some circuit last held requests (monotonic), for the sweep of held requests.
        self.held_until_s = 0.0
        # When this worker last saw a failing host succeed (monotonic), per host.
        self._succeeded_s: dict[str, float] = {}

    @property
    def watching(self) -> bool:
        return bool(self.failing or self.held)

    def waiting(self) -> list[Request]:
        return [request for entries in self._waiting.values() for request, _since_s in entries]

    def take_waiting(self) -> list[Request]:
        """Draining: what waits for a failing host goes now (a held host's goes back to the queue)."""
        requests = self.waiting() + self.take_ready()
        self._waiting.clear()
        return requests

    def forget(self) -> None:
        """The schema went: the requests waiting here belong to it."""
        self._waiting.clear()
        self._inflight.clear()
        self.to_release.clear()
        self.ready.clear()
        self.failing.clear()
        self.held.clear()
        self.probe_due_s = None

    def admit(self, request: Request) -> bool:
        """Whether to send a claimed request now; if not, it waits here or is given back. Call while watching."""
        host = url_host(request.url)
        if request.circuit_probe:
            return True
        if host in self.held:
            self.to_release.append(request)
            return False
        failing = self.failing.get(host)
        if failing is None:
            return True
        if failing.busy():
            self._waiting.setdefault(host, []).append((request, time.monotonic()))
            return False
        failing.inflight += 1
        self._inflight[request.id] = host
        return True

    def after_finish(self, finished: list[Response], now: float) -> list[Request]:
        """Count the host failures among finished transfers, mark them for the write-back, and
        return the waiting requests that may go now."""
        if not (self.failing or self._inflight):
            # The usual case, per finished batch: no host failing here; look for a failure only.
            for response in finished:
                if response.status_code is None or response.status_code >= 500:
                    break
            else:
                return []
        ready: list[Request] = []
        counting = self.params.failures > 0
        for response in finished:
            request = response.request
            host = self._inflight.pop(request.id, None) if self._inflight else None
            if host is not None and host in self.failing:
                self.failing[host].inflight -= 1
            if counting and is_host_failure(response):
                host = host or url_host(request.url)
                response.circuit_failure = True
                failing = self.failing.get(host)
                if failing is None:
                    self.failing[host] = failing = _Failing(0, now, now - response.duration_s)
                failing.failures += 1
                failing.last_failure_s = now
                failing.unwritten = True
            elif self.failing:
                host = host or url_host(request.url)
                failing = self.failing.get(host)
                # Only a request sent after the failures began shows the host is back.
                if failing is not None and now - response.duration_s >= failing.since_s:
                    del self.failing[host]
                    self.resets.add(host)
                    self._succeeded_s[host] = now
                    ready.extend(request for request, _since_s in self._waiting.pop(host, ()))
        return ready

    def written(self) -> None:
        """A write-back ended: the failures it stored are counted; for each host not held now, the
        next request waiting goes (to self.ready)."""
        for host, failing in self.failing.items():
            if not failing.unwritten:
                continue
            failing.unwritten = False
            waiting = self._waiting.get(host)
            if not waiting or host in self.held or failing.inflight:
                continue
            request, _since_s = waiting.pop(0)
            if not waiting:
                del self._waiting[host]
            failing.inflight += 1
            self._inflight[request.id] = host
            self.ready.append(request)

    def take_ready(self) -> list[Request]:
        ready, self.ready = self.ready, []
        return ready

    def on_state(self, rows: list[tuple], now: float) -> None:
        """Take the database's circuits (circuit_state): hold the open ones, watch the failing ones."""
        held = set()
        due = []
        for host, state, _failures, due_in_s in rows:
            if state == "closed":
                # Another worker saw it fail: send it one request at a time here too, and a success
                # seen here ends its run. Unless this worker just saw it succeed (the row predates
                # the reset that success sent).
                if now - self._succeeded_s.get(host, float("-inf")) >= _RECENT_SUCCESS_S:
                    failing = self.failing.setdefault(host, _Failing(0, now, now))
                    failing.failures = max(failing.failures, 1)
                continue
            held.add(host)
            if due_in_s is not None:
                due.append(now + max(0.0, due_in_s))
        self.hold(held)
        self.probe_due_s = min(due) if due else None
        if held:
            self.held_until_s = now + self.params.window_s

    def hold(self, hosts: set[str]) -> None:
        """These hosts' circuits are open: give back what waits for them."""
        self.held = hosts
        for host in hosts:
            self.to_release.extend(request for request, _since_s in self._waiting.pop(host, ()))

    def opened(self, hosts: list[str], now: float) -> None:
        """This worker's write-back opened these circuits."""
        if not hosts:
            return
        self.ctx.metrics.circuit_opens_total.inc(len(hosts))
        self.hold(self.held | set(hosts))
        self.probe_due_s = min(self.probe_due_s or float("inf"), now + self.params.cooldown_s)
        self.held_until_s = now + self.params.window_s

    def probed(self, now: float) -> None:
        """A probe claim ran: the state NOTIFY sets the next due time; until then look again later."""
        self.probe_due_s = now + _PROBE_RECHECK_S

    def expire(self, now: float) -> None:
        """Forget failures older than the window (no success needed). Give back requests that waited
        half the lease grace: waiting longer, their lease could pass to another worker."""
        if not (self.failing or self._succeeded_s or self._waiting):
            return
        for host in [host for host, failing in self.failing.items()
                     if failing.inflight == 0 and now - failing.last_failure_s > self.params.window_s]:
            del self.failing[host]
        if self._succeeded_s:
            self._succeeded_s = {host: at_s for host, at_s in self._succeeded_s.items()
                                 if now - at_s < _RECENT_SUCCESS_S}
        if not self._waiting:
            return
        patience_s = self.ctx.settings.lease_grace_s / 2
        for host, entries in list(self._waiting.items()):
            kept = [(request, since_s) for request, since_s in entries if now - since_s < patience_s]
            self.to_release.extend(request for request, since_s in entries if now - since_s >= patience_s)
            if kept:
                self._waiting[host] = kept
            else:
                del self._waiting[host]

    def flush(self, queue: Queue) -> None:
        """Give back held requests and forget ended runs of failures, in the database."""
        if self.to_release:
            queue.release([request.id for request in self.to_release])
            self.to_release.clear()
        if self.resets:
            queue.reset_circuits(sorted(self.resets))
            self.resets.clear()

    def publish(self, rows: list[tuple]) -> None:
        """Worker 1 sets the per-state gauges from the state it read."""
        counts = dict.fromkeys(_STATES, 0)
        for _host, state, _failures, _due in rows:
            counts[state] = counts.get(state, 0) + 1
        for state, count in counts.items():
            self.ctx.metrics.circuits(state).set(count)

