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
    error_msg: str | None = None
    # Not stored: for metrics.
    duration_s: float = 0.0
    request: Request | None = None
