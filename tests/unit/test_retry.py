"""Retry decisions: what is transient, the backoff schedule, Retry-After."""

from __future__ import annotations

import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pycurl
import pytest

from pgnet_curl import retry


@pytest.mark.parametrize("status, code, timed_out, expected", [
    (500, 0, False, True), (503, 0, False, True), (429, 0, False, True), (408, 0, False, True),
    (400, 0, False, False), (404, 0, False, False), (200, 0, False, False), (301, 0, False, False),
    (None, pycurl.E_COULDNT_CONNECT, False, True), (None, pycurl.E_GOT_NOTHING, False, True),
    (None, pycurl.E_OPERATION_TIMEDOUT, True, True),
    (None, pycurl.E_UNSUPPORTED_PROTOCOL, False, False), (None, pycurl.E_FILESIZE_EXCEEDED, False, False),
    (None, pycurl.E_TOO_MANY_REDIRECTS, False, False),
])
def test_transient_failures_only(status, code, timed_out, expected):
    assert retry.is_transient(status, code, timed_out) is expected


def test_full_jitter_stays_under_the_doubling_ceiling_and_the_cap():
    rng = random.Random(7)
    for retries_done, ceiling_ms in [(0, 100), (1, 200), (2, 400), (3, 800), (10, 5000), (60, 5000)]:
        delays = [retry.backoff_ms(retries_done, 100, 5000, rng) for _ in range(2000)]
        assert 0 <= min(delays) and max(delays) <= ceiling_ms
        # Spread over the whole range (full jitter), not bunched at the ceiling.
        assert min(delays) < ceiling_ms * 0.1 and max(delays) > ceiling_ms * 0.9


def test_retry_after_seconds_and_date_up_to_the_cap():
    now = 1_700_000_000.0
    assert retry.retry_after_ms("3", now) == 3000
    date = format_datetime(datetime.fromtimestamp(now + 7, timezone.utc), usegmt=True)
    assert retry.retry_after_ms(date, now) == pytest.approx(7000)
    assert retry.retry_after_ms("soon", now) is None and retry.retry_after_ms(None, now) is None
    assert retry.next_delay_ms(0, 3, 100, 5000, "2", now) == 2000
    assert retry.next_delay_ms(0, 3, 100, 5000, "3600", now) == 5000
    assert retry.next_delay_ms(3, 3, 100, 5000, "2", now) is None
