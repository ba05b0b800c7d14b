"""Standard Webhooks (standardwebhooks.com) headers: a stable id, a timestamp, and HMAC-SHA256
signatures over `id.timestamp.body`, one per active key so receivers survive a rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(msg_id: str, timestamp_s: int, body: bytes, secret: bytes) -> str:
    """One `v1,<base64>` signature."""
    signed = f"{msg_id}.{timestamp_s}.".encode("utf-8") + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(msg_id: str, timestamp_s: int, body: bytes | None, secrets: list[bytes]) -> dict[str, str]:
    """webhook-id, webhook-timestamp and (with keys) webhook-signature for one attempt."""
    found = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp_s)}
    if secrets:
        found["webhook-signature"] = " ".join(signature(msg_id, timestamp_s, body or b"", s) for s in secrets)
    return found
