"""Prometheus metrics, in multiprocess mode: workers record, the supervisor serves the sum.

Import this only after metrics_dir.prepare() (prometheus_client picks its storage on import).
No URL, header or body ever becomes a label (cardinality, secrets). Every metric has a
`database` label: one serve may serve several databases (DatabaseMetrics binds it).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

requests_total = Counter(
    "pgnet_curl_requests_total", "Requests finished, by method and outcome "
    "(success: 1xx-3xx; http_4xx; http_5xx; timeout; error).", ["database", "method", "outcome"])
http_duration_seconds = Histogram(
    "pgnet_curl_http_duration_seconds", "Time from handing a request to curl to its end.",
    buckets=_LATENCY_BUCKETS_S, labelnames=["database"])
queue_wait_seconds = Histogram(
    "pgnet_curl_queue_wait_seconds", "Time from a request's transaction start to its claim.",
    buckets=_LATENCY_BUCKETS_S, labelnames=["database"])
end_to_end_seconds = Histogram(
    "pgnet_curl_end_to_end_seconds", "Time from a request's transaction start to its response row.",
    buckets=_LATENCY_BUCKETS_S, labelnames=["database"])
write_batch_duration_seconds = Histogram(
    "pgnet_curl_write_batch_duration_seconds", "Duration of one write-back statement.",
    buckets=_LATENCY_BUCKETS_S, labelnames=["database"])
write_batch_size = Histogram(
    "pgnet_curl_write_batch_size", "Responses written by one write-back statement.", buckets=_BATCH_BUCKETS, labelnames=["database"])
inflight_requests = Gauge(
    "pgnet_curl_inflight_requests", "Requests in flight (summed over workers).", multiprocess_mode="livesum", labelnames=["database"])
queue_depth = Gauge(
    "pgnet_curl_queue_depth", "Requests waiting or in flight in net.http_request_queue (sampled).",
    multiprocess_mode="livemostrecent", labelnames=["database"])
queue_oldest_pending_seconds = Gauge(
    "pgnet_curl_queue_oldest_pending_seconds", "Age of the oldest request not yet answered (sampled).",
    multiprocess_mode="livemostrecent", labelnames=["database"])
workers_alive = Gauge(
    "pgnet_curl_workers_alive", "Worker processes running (set by the supervisor).", multiprocess_mode="livesum", labelnames=["database"])
worker_db_connected = Gauge(
    "pgnet_curl_worker_db_connected", "Workers holding a database connection.", multiprocess_mode="livesum", labelnames=["database"])
worker_waiting_for_schema = Gauge(
    "pgnet_curl_worker_waiting_for_schema", "Workers connected but waiting for the net schema to be installed.",
    multiprocess_mode="livesum", labelnames=["database"])
worker_writes_refused = Gauge(
    "pgnet_curl_worker_writes_refused", "Workers whose database refuses writes (read-only, disk full): their "
    "finished responses are kept in memory and written when it accepts them.",
    multiprocess_mode="livesum", labelnames=["database"])
unwritten_responses = Gauge(
    "pgnet_curl_unwritten_responses", "Finished responses kept in memory while the database refuses writes.",
    multiprocess_mode="livesum", labelnames=["database"])
worker_restarts_total = Counter(
    "pgnet_curl_worker_restarts_total", "Worker processes restarted after dying.", labelnames=["database"])
db_reconnects_total = Counter(
    "pgnet_curl_db_reconnects_total", "Database connections lost and re-established by workers.", labelnames=["database"])
lease_reclaims_total = Counter(
    "pgnet_curl_lease_reclaims_total", "Requests claimed again after another worker's lease expired.", labelnames=["database"])
lease_lost_total = Counter(
    "pgnet_curl_lease_lost_total", "Responses not written because the lease had passed to another worker.", labelnames=["database"])
retries_scheduled_total = Counter(
    "pgnet_curl_retries_scheduled_total", "Transient failures put back in the queue for another attempt.", labelnames=["database"])
responses_expired_total = Counter(
    "pgnet_curl_responses_expired_total", "Responses deleted after pg_net.ttl.", labelnames=["database"])
circuits = Gauge(
    "pgnet_curl_circuits", "Destination hosts by circuit state: closed (failures being counted), open "
    "(requests held), half_open (a probe in flight). Sampled at each poll.",
    multiprocess_mode="livemostrecent", labelnames=["database", "state"])
circuit_opens_total = Counter(
    "pgnet_curl_circuit_opens_total", "Circuits opened (or opened again after a failed probe).", labelnames=["database"])

METRIC_NAMES = frozenset({
    "pgnet_curl_requests_total", "pgnet_curl_http_duration_seconds", "pgnet_curl_queue_wait_seconds",
    "pgnet_curl_end_to_end_seconds", "pgnet_curl_write_batch_duration_seconds", "pgnet_curl_write_batch_size",
    "pgnet_curl_inflight_requests", "pgnet_curl_queue_depth", "pgnet_curl_queue_oldest_pending_seconds",
    "pgnet_curl_workers_alive", "pgnet_curl_worker_db_connected", "pgnet_curl_worker_waiting_for_schema",
    "pgnet_curl_worker_writes_refused", "pgnet_curl_unwritten_responses",
    "pgnet_curl_worker_restarts_total", "pgnet_curl_db_reconnects_total",
    "pgnet_curl_lease_reclaims_total", "pgnet_curl_lease_lost_total", "pgnet_curl_responses_expired_total",
    "pgnet_curl_retries_scheduled_total", "pgnet_curl_circuits", "pgnet_curl_circuit_opens_total",
})


_KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def method_label(method: str) -> str:
    """Known methods as themselves, any other token as OTHER: labels stay few."""
    return method if method in _KNOWN_METHODS else "OTHER"


def outcome(status_code: int | None, timed_out: bool) -> str:
    """Label a finished request without looking at anything user-controlled but its status."""
    if timed_out:
        return "timeout"
    if status_code is None:
        return "error"
    if status_code >= 500:
        return "http_5xx"
    if status_code >= 400:
        return "http_4xx"
    return "success"


class _LocalHistogram:
    """Bucket counts kept in plain Python, added to a prometheus Histogram in one go.

    Observing straight into a multiprocess Histogram costs a locked mmap write per call;
    at thousands of requests a second that is a visible share of a worker's CPU.
    """

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._upper_bounds = histogram._upper_bounds
        self._counts = [0] * len(self._upper_bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._upper_bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        # Histogram.observe adds to _sum and to the first bucket whose bound holds the value.
        for index, count in enumerate(self._counts):
            if count:
                self._histogram._buckets[index].inc(count)
                self._counts[index] = 0
        if self._sum:
            self._histogram._sum.inc(self._sum)
            self._sum = 0.0


class DatabaseMetrics:
    """Every metric with its database label set: what one worker (one database) records."""

    def __init__(self, database: str):
        self.database = database
        for name in ("http_duration_seconds", "queue_wait_seconds", "end_to_end_seconds",
                     "write_batch_duration_seconds", "write_batch_size", "inflight_requests", "queue_depth",
                     "queue_oldest_pending_seconds", "workers_alive", "worker_db_connected",
                     "worker_waiting_for_schema", "worker_writes_refused", "unwritten_responses",
                     "worker_restarts_total", "db_reconnects_total",
                     "lease_reclaims_total", "lease_lost_total", "retries_scheduled_total",
                     "responses_expired_total", "circuit_opens_total"):
            setattr(self, name, globals()[name].labels(database=database))

    def requests(self, method: str, result: str):
        return requests_total.labels(self.database, method, result)

    def circuits(self, state: str):
        return circuits.labels(self.database, state)


class Tally:
    """A worker's per-request observations, published to the shared metrics by flush()."""

    def __init__(self, bound: DatabaseMetrics):
        self._bound = bound
        self._requests: dict[tuple[str, str], int] = {}
        self._http_duration = _LocalHistogram(bound.http_duration_seconds)
        self._queue_wait = _LocalHistogram(bound.queue_wait_seconds)
        self._end_to_end = _LocalHistogram(bound.end_to_end_seconds)
        # True when something was observed since the last flush.
        self.pending = False

    def claimed(self, queue_wait_s: float) -> None:
        self._queue_wait.observe(queue_wait_s)
        self.pending = True

    def finished(self, method: str, status_code: int | None, timed_out: bool, duration_s: float) -> None:
        key = (method_label(method), outcome(status_code, timed_out))
        self._requests[key] = self._requests.get(key, 0) + 1
        self._http_duration.observe(duration_s)
        self.pending = True

    def written(self, end_to_end_s: float) -> None:
        self._end_to_end.observe(end_to_end_s)
        self.pending = True

    def flush(self) -> None:
        for (method, result), count in self._requests.items():
            self._bound.requests(method, result).inc(count)
        self._requests.clear()
        for histogram in (self._http_duration, self._queue_wait, self._end_to_end):
            histogram.flush()
        self.pending = False
