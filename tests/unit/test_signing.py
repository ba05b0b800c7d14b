"""Standard Webhooks signatures, checked the way a receiver checks them."""

from __future__ import annotations

import base64
import hashlib
import hmac

from pgnet_curl import signing


def whsec(secret: bytes) -> str:
    """The secret as receivers are given it (what net.rotate_signing_key returns)."""
    return "whsec_" + base64.b64encode(secret).decode()


def receiver_verifies(headers: dict[str, str], body: bytes, secret_text: str) -> bool:
    """A receiver's check, from the spec: any listed v1 signature matching is enough."""
    key = base64.b64decode(secret_text.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(part.split(",", 1)[1], expected)
               for part in headers["webhook-signature"].split(" ") if part.startswith("v1,"))


def test_known_vector_from_the_specification():
    secret = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert signing.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}', secret) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_every_active_key_signs_so_a_rotation_breaks_no_receiver():
    old, new = b"o" * 32, b"n" * 32
    headers = signing.headers("msg_1", 1700000000, b"{}", [old, new])
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "1700000000"
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert receiver_verifies(headers, b"{}", whsec(old))
    assert receiver_verifies(headers, b"{}", whsec(new))
    assert not receiver_verifies(headers, b"{} ", whsec(new))
    assert not receiver_verifies(headers, b"{}", whsec(b"x" * 32))


def test_without_keys_only_id_and_timestamp():
    assert signing.headers("k", 1, None, []) == {"webhook-id": "k", "webhook-timestamp": "1"}
