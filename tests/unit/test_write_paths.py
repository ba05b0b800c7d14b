"""Which write-back statement a response takes: the plain one unless it uses a delivery feature."""

from pgnet_curl.model import Request, Response


def request(**options) -> Request:
    return Request(1, "GET", "http://127.0.0.1/", {}, None, 5000, **options)


def test_an_answered_plain_request_takes_the_plain_write_back():
    assert not Response(1, status_code=200, request=request()).needs_delivery_write(None)
    # Signing and idempotency keys act before the send: nothing to do when it is stored.
    assert not Response(1, status_code=204, request=request(signing_key_id="k", idempotency_key="x")) \
        .needs_delivery_write(None)


def test_each_delivery_feature_takes_the_delivery_write_back():
    cases = [
        Response(1, status_code=200, request=request(), retry_in_ms=100.0),
        Response(1, status_code=500, request=request()),
        Response(1, error_msg="Couldn't connect to server", request=request()),
        Response(1, status_code=200, timed_out=True, request=request()),
        Response(1, status_code=200, request=request(notify_channel="done")),
        Response(1, status_code=200, request=request(callback_oid=1234)),
    ]
    assert all(response.needs_delivery_write(None) for response in cases)
    assert Response(1, status_code=200, request=request()).needs_delivery_write("serve_channel")


def test_an_answered_ordered_request_takes_the_ordered_write_back():
    ordered = request(ordering_key="orders:7")
    response = Response(1, status_code=200, request=ordered)
    assert response.needs_delivery_write(None) and response.ordered_only(None)
    # Any other feature on top takes the delivery write-back, which lets the next in (or halts) too.
    for other in (Response(1, status_code=503, request=ordered),
                  Response(1, status_code=200, request=request(ordering_key="k", notify_channel="done")),
                  Response(1, status_code=200, request=ordered, retry_in_ms=10.0)):
        assert other.needs_delivery_write(None) and not other.ordered_only(None)
    assert not Response(1, status_code=200, request=ordered).ordered_only("serve_channel")


def test_a_probe_outcome_takes_the_delivery_write_back():
    """Its success closes the circuit, in the write-back's statement."""
    probe = Response(1, status_code=200, request=request(circuit_probe=True))
    assert probe.needs_delivery_write(None) and not probe.ordered_only(None)
