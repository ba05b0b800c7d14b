"""When to send a request again, and after how long: transient failures only, exponential
backoff with full jitter, capped, and the receiver's Retry-After honoured up to the cap."""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

import pycurl

# Statuses a receiver uses to say "later": timeouts, rate limits, server errors.
_RETRY_STATUSES = frozenset({408, 425, 429})
# libcurl errors of the network or the peer, not of the request: worth another attempt.
_TRANSIENT_CURL_CODES = frozenset({
    pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_CONNECT, pycurl.E_OPERATION_TIMEDOUT,
    pycurl.E_GOT_NOTHING, pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR, pycurl.E_PARTIAL_FILE,
    pycurl.E_SSL_CONNECT_ERROR, pycurl.E_HTTP2,
    92,  # CURLE_HTTP2_STREAM (pycurl names no constant for it)
})


def is_transient(status_code: int | None, curl_code: int, timed_out: bool) -> bool:
    """True for a failure another attempt may cure; a 4xx other than 408/425/429 is final."""
    if timed_out:
        return True
    if status_code is not None:
        return status_code >= 500 or status_code in _RETRY_STATUSES
    return curl_code in _TRANSIENT_CURL_CODES


def is_network_failure(curl_code: int) -> bool:
    """A libcurl error of the network or the peer (refused, reset, nothing received, a timeout...)."""
    return curl_code in _TRANSIENT_CURL_CODES


def backoff_ms(retries_done: int, base_ms: int, cap_ms: int, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^retries_done)] (AWS architecture blog)."""
    ceiling_ms = min(cap_ms, base_ms * 2 ** min(retries_done, 32))
    return (rng or random).uniform(0, ceiling_ms)


def retry_after_ms(value: str | None, now_epoch_s: float) -> float | None:
    """Parse a Retry-After header (delay-seconds or an HTTP-date) into ms from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000.0
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, (when.timestamp() - now_epoch_s) * 1000)


def next_delay_ms(retries_done: int, max_retries: int, base_ms: int, cap_ms: int,
                  retry_after: str | None, now_epoch_s: float) -> float | None:
    """Milliseconds until the next attempt, or None when the retries are used up."""
    if retries_done >= max_retries:
        return None
    asked_ms = retry_after_ms(retry_after, now_epoch_s)
    if asked_ms is not None:
        return min(asked_ms, cap_ms)
    return backoff_ms(retries_done, base_ms, cap_ms)
