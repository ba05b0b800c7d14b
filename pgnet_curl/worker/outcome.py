"""What happens to a request around its transfer: signed before it goes (or answered with an error
row instead), and after it ends, put back for a retry when the failure is transient."""

from __future__ import annotations

import logging
import time

from .. import retry, signing
from ..model import Request, Response
from ..queue import Queue
from .context import WorkerContext

log = logging.getLogger("pgnet_curl.worker")

# A key named by a request but not known here is looked for again at most this often.
_KEYS_REREAD_S = 1.0


class Outcome:
    """The delivery options' steps; a plain request passes through both in a couple of attribute reads."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        # (key_id, secret, expiry epoch or None) of the signing keys, read at connect and on change.
        self.signing_keys: list[tuple[str, bytes, float | None]] = []
        self._next_keys_reread_s = 0.0

    def before_send(self, request: Request, queue: Queue | None) -> Response | None:
        """None: send the request (with its signature headers, if it asks for them). A Response:
        store that error row instead. Raises PgnetCurlError if the keys could not be read (queue
        None: not connected, nothing is read)."""
        if request.attempts > self.ctx.settings.max_attempts:
            log.warning("worker %d: request %d was claimed %d times without an answer; storing an error row",
                        self.ctx.index, request.id, request.attempts)
            return _error_row(request, f"gave up after {request.attempts - 1} attempts: "
                                       f"the worker sending it stopped each time")
        if request.idempotency_key is None and request.signing_key_id is None:
            return None
        secrets_now = []
        if request.signing_key_id is not None:
            if self.ctx.wakeups.keys and queue is not None:
                # A rotation's NOTIFY reached us during a statement after housekeeping's refresh
                # (it precedes the claim's result, since it committed first): a request queued
                # after net.rotate_signing_key returned is signed with the new key.
                self.ctx.wakeups.keys = False
                self.signing_keys = queue.signing_keys()
            secrets_now = self._active_secrets(request.signing_key_id)
            if not secrets_now and queue is not None and time.monotonic() >= self._next_keys_reread_s:
                # A key made just before the request may not have reached us yet (its NOTIFY can
                # arrive after the claim): read the keys again, at most once a second. If that
                # fails the request is not sent now: its lease expires and it is claimed again.
                self._next_keys_reread_s = time.monotonic() + _KEYS_REREAD_S
                self.signing_keys = queue.signing_keys()
                secrets_now = self._active_secrets(request.signing_key_id)
            if not secrets_now:
                return _error_row(request, f"not sent: signing key {request.signing_key_id!r} has no key that has "
                                           f"not expired (net.rotate_signing_key makes one)")
        msg_id = request.idempotency_key or f"msg_{request.id}"
        request.headers = {**request.headers, **signing.headers(msg_id, int(time.time()), request.body, secrets_now)}
        return None

    def _active_secrets(self, key_id: str) -> list[bytes]:
        now_epoch_s = time.time()
        return [secret for kid, secret, expires in self.signing_keys
                if kid == key_id and (expires is None or expires > now_epoch_s)]

    def after_finish(self, finished: list[Response]) -> None:
        """Mark the transient failures that have retries left: they go back to the queue."""
        defaults = self.ctx.settings
        for response in finished:
            request = response.request
            max_retries = defaults.max_retries if request.max_retries is None else request.max_retries
            if request.retries >= max_retries:
                continue
            if not retry.is_transient(response.status_code, response.curl_code, response.timed_out):
                continue
            retry_after = None
            if response.headers and response.status_code in (429, 503):
                retry_after = next((value for name, value in response.headers.items()
                                    if name.lower() == "retry-after"), None)
            response.retry_in_ms = retry.next_delay_ms(
                request.retries, max_retries, request.retry_backoff_ms or defaults.retry_backoff_ms,
                defaults.retry_backoff_cap_ms, retry_after, time.time())
            if response.retry_in_ms is not None:
                self.ctx.stats["retries"] += 1
                self.ctx.metrics.retries_scheduled_total.inc()


def _error_row(request: Request, error_msg: str) -> Response:
    """The row stored for a request that will not be sent."""
    return Response(request.id, request=request, error_msg=error_msg)
