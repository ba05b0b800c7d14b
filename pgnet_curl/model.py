"""The two records that flow through a worker: a claimed request and its response row."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Request:
    """A queued request as claimed from net.http_request_queue."""

    id: int
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    timeout_ms: int
    attempts: int = 1
    created_epoch_s: float = 0.0
    # The queue table's oid: which install of the net schema the request belongs to.
    queue_oid: int = 0


@dataclass(slots=True)
class Response:
    """One row for net._http_response, in pg_net's columns."""

    id: int
    status_code: int | None = None
    content_type: str | None = None
    headers: dict[str, str] | None = None
    content: str | None = None
    # The exact body when it is not text (see sql/0002_response_bytes.sql).
    content_bytes: bytes | None = None
    timed_out: bool = False
    error_msg: str | None = None
    # Not stored: for metrics.
    duration_s: float = 0.0
    request: Request | None = None
