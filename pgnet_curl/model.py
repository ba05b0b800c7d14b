"""The two records that flow through a worker: a claimed request and its response row."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    """A queued request as claimed from net.http_request_queue.

    Its repr (in tracebacks with local values) leaves out the URL, headers and body: secrets.
    """

    id: int
    method: str
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    body: bytes | None = field(repr=False)
    timeout_ms: int
    attempts: int = 1
    created_epoch_s: float = 0.0
    # Delivery options (the queue's `options`, sql/0007_delivery.sql); None means the server's default.
    retries: int = 0
    max_retries: int | None = None
    retry_backoff_ms: int | None = None
    notify_channel: str | None = None
    idempotency_key: str | None = None
    signing_key_id: str | None = None
    callback_oid: int | None = None
    # Claimed by the limited claim while some host's concurrency is limited: it may hold a slot
    # to release (sql/0008_destination_limits.sql).
    destination_leased: bool = False
    # Sent one at a time with the other requests of this key (sql/0012_ordering_and_circuits.sql).
    ordering_key: str | None = None
    # Claimed as its host's circuit probe (half-open): its outcome closes or reopens the circuit.
    circuit_probe: bool = False
    # The queue table's oid: which install of the net schema the request belongs to.
    queue_oid: int = 0


@dataclass(slots=True)
class Response:
    """One row for net._http_response, in pg_net's columns; its repr leaves out headers and body."""

    id: int
    status_code: int | None = None
    content_type: str | None = None
    headers: dict[str, str] | None = field(default=None, repr=False)
    content: str | None = field(default=None, repr=False)
    # The exact body when it is not text (see sql/0002_response_bytes.sql).
    content_bytes: bytes | None = field(default=None, repr=False)
    timed_out: bool = False
    # pg_net's text: libcurl's curl_easy_strerror, the timeout message, or one of ours.
    error_msg: str | None = None
    # curl's error buffer for this transfer, when it says more (see sql/0005_error_detail.sql).
    error_detail: str | None = None
    # Not stored as such: for retries and metrics.
    curl_code: int = 0
    # Set by the worker: try again in this many ms instead of storing the row.
    retry_in_ms: float | None = None
    # Set by the worker: a connection error, timeout or 5xx, counted towards the host's circuit.
    circuit_failure: bool = False
    duration_s: float = 0.0
    request: Request | None = None

    def needs_delivery_write(self, notify_channel: str | None) -> bool:
        """Whether storing this row takes more than the plain write_back: write_back_delivery (a
        retry, an archive, a NOTIFY, a callback, a probe's outcome), or write_back_ordered (a
        key's next request to let in)."""
        request = self.request
        return (self.retry_in_ms is not None or self.failed or notify_channel is not None
                or (request is not None and (request.notify_channel is not None or request.callback_oid is not None
                                             or request.ordering_key is not None or request.circuit_probe)))

    def ordered_only(self, notify_channel: str | None) -> bool:
        """Of the rows that need more than write_back: whether ordering is all it needs (write_back_ordered)."""
        request = self.request
        return (request is not None and request.ordering_key is not None and self.retry_in_ms is None
                and not self.failed and notify_channel is None and request.notify_channel is None
                and request.callback_oid is None and not request.circuit_probe)

    @property
    def failed(self) -> bool:
        """An error, a timeout or an HTTP status of 400 or more: kept for replay."""
        return self.status_code is None or self.timed_out or self.status_code >= 400
