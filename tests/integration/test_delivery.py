"""Webhook-grade delivery end to end: retries, dead letters and replay, completion NOTIFY, SQL
callbacks, Standard Webhooks signing. Real worker, real loopback server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from email.utils import format_datetime
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg import errors

from helpers import wait_until

from pgnet_curl.model import Response
from pgnet_curl.queue import Queue


def flaky_url(http_server, fail: int, status: int = 503, retry_after: str | None = None) -> tuple[str, str]:
    """(url, path) of a fresh /flaky endpoint that fails `fail` times, then answers 200."""
    path = f"/flaky/{uuid.uuid4().hex}"
    query = f"?fail={fail}&status={status}" + (f"&retry_after={retry_after}" if retry_after else "")
    return http_server.url_for(path + query), path


def arrivals(http_server, path: str) -> list[dict]:
    return [entry for entry in http_server.requests if entry["path"] == path]


def response(db, request_id: int, timeout_s: float = 20) -> dict:
    def fetch():
        cur = db.execute("select * from net._http_response where id = %s", (request_id,))
        values = cur.fetchone()
        return dict(zip([c.name for c in cur.description], values)) if values else None
    return wait_until(fetch, timeout_s, message=f"the response of request {request_id}")


def gaps_s(entries: list[dict]) -> list[float]:
    return [later["at_s"] - earlier["at_s"] for earlier, later in zip(entries, entries[1:])]


def test_transient_failures_are_retried_with_capped_exponential_backoff(db, db_dsn, serve, http_server):
    serve(db_dsn)
    url, path = flaky_url(http_server, fail=3)
    request_id = db.execute("select net.http_request('GET', %s, max_retries => 5, retry_backoff_milliseconds => 200)",
                            (url,)).fetchone()[0]
    row = response(db, request_id)
    assert (row["status_code"], row["content"], row["attempts"]) == (200, "ok after 3 failures", 4)
    schedule = gaps_s(arrivals(http_server, path))
    assert len(schedule) == 3
    # Full jitter: each wait is at most base * 2^n (plus the worker's claim latency).
    for attempt, gap_s in enumerate(schedule):
        assert gap_s <= 0.2 * 2 ** attempt + 0.25, schedule
    # Nothing waited on a worker slot meanwhile: the queue row held the retry.
    assert db.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0


def test_retry_after_in_seconds_is_honoured(db, db_dsn, serve, http_server):
    serve(db_dsn)
    url, path = flaky_url(http_server, fail=2, status=429, retry_after="1")
    request_id = db.execute("select net.http_request('GET', %s, max_retries => 3, retry_backoff_milliseconds => 10)",
                            (url,)).fetchone()[0]
    assert response(db, request_id)["attempts"] == 3
    for gap_s in gaps_s(arrivals(http_server, path)):
        assert 0.95 <= gap_s <= 1.6


def test_retry_after_as_a_date_is_honoured_up_to_the_cap(db, db_dsn, serve, http_server):
    serve(db_dsn, "--retry-backoff-cap-ms", "30000")
    when = format_datetime(datetime.fromtimestamp(time.time() + 3, timezone.utc), usegmt=True)
    url, path = flaky_url(http_server, fail=1, status=503, retry_after=when.replace(" ", "%20").replace(",", "%2C"))
    request_id = db.execute("select net.http_request('GET', %s, max_retries => 1)", (url,)).fetchone()[0]
    assert response(db, request_id)["status_code"] == 200
    (gap_s,) = gaps_s(arrivals(http_server, path))
    assert 1.5 <= gap_s <= 3.8  # the date has whole seconds


def test_a_client_error_is_final(db, db_dsn, serve, http_server):
    serve(db_dsn)
    url, path = flaky_url(http_server, fail=1, status=400)
    request_id = db.execute("select net.http_request('GET', %s, max_retries => 3)", (url,)).fetchone()[0]
    row = response(db, request_id)
    assert (row["status_code"], row["attempts"]) == (400, 1)
    assert len(arrivals(http_server, path)) == 1


def test_pg_net_functions_retry_only_when_the_server_says_so(db, db_dsn, serve, http_server):
    url, path = flaky_url(http_server, fail=1)
    process = serve(db_dsn)
    first = db.execute("select net.http_get(%s)", (url,)).fetchone()[0]
    assert response(db, first)["status_code"] == 503
    process.stop()
    serve(db_dsn, "--max-retries", "2", "--retry-backoff-ms", "20")
    url, path = flaky_url(http_server, fail=1)
    second = db.execute("select net.http_get(%s)", (url,)).fetchone()[0]
    assert (response(db, second)["status_code"], response(db, second)["attempts"]) == (200, 2)


def test_a_dead_letter_is_visible_and_replays_byte_for_byte(db, db_dsn, serve, http_server):
    serve(db_dsn)
    url, path = flaky_url(http_server, fail=100)
    body = bytes(range(256))
    request_id = db.execute(
        "select net.http_request('PUT', %s, %s, headers => '{\"X-Token\": \"t-1\", \"Content-Type\": \"application/octet-stream\"}',"
        " max_retries => 2, retry_backoff_milliseconds => 20)", (url, body)).fetchone()[0]
    assert response(db, request_id)["attempts"] == 3
    failed = db.execute("select method, url, body, status_code, attempts, max_retries, replayed_as "
                        "from net.failed_requests where id = %s", (request_id,)).fetchone()
    assert failed == ("PUT", url, body, 503, 3, 2, None)

    replay_id = db.execute("select net.retry_request(%s)", (request_id,)).fetchone()[0]
    assert replay_id > request_id
    assert response(db, replay_id)["attempts"] == 3
    sent = arrivals(http_server, path)
    assert len(sent) == 6
    original, replayed = sent[0], sent[-1]
    assert (replayed["method"], replayed["query"], replayed["body"]) == (original["method"], original["query"], original["body"])
    assert replayed["headers"] == original["headers"]
    assert replayed["body"] == body
    with pytest.raises(errors.UniqueViolation, match="already replayed"):
        db.execute("select net.retry_request(%s)", (request_id,))
    with pytest.raises(errors.NoDataFound):
        db.execute("select net.retry_request(%s)", (replay_id + 1000,))


def test_replay_all_failures_for_a_host_since_a_time(db, db_dsn, serve, http_server):
    serve(db_dsn)
    ids = [db.execute("select net.http_get(%s)", (http_server.url_for("/status/500"),)).fetchone()[0] for _ in range(3)]
    ok_id = db.execute("select net.http_get(%s)", (http_server.url_for("/status/200"),)).fetchone()[0]
    for request_id in ids + [ok_id]:
        response(db, request_id)
    other_host = db.execute("select count(*) from net.retry_requests('example.invalid')").fetchone()[0]
    assert other_host == 0
    replays = [row[0] for row in db.execute("select * from net.retry_requests('127.0.0.1', now() - interval '1 hour')")]
    assert len(replays) == 3 and min(replays) > ok_id
    for request_id in replays:
        assert response(db, request_id)["status_code"] == 500
    # The originals are not replayed twice; the replays, which failed too, are dead letters of their own.
    again = [row[0] for row in db.execute("select * from net.retry_requests('127.0.0.1')")]
    for request_id in again:
        response(db, request_id)
    # Each is a replay of an original (replay_of names the first request of the chain).
    assert db.execute("select array_agg(replay_of order by id) from net.failed_requests where id = any(%s)",
                      (again,)).fetchone()[0] == ids


def test_completion_notify_arrives_after_the_row_is_visible(db, db_dsn, serve, http_server):
    serve(db_dsn, "--notify-channel", "all_done")
    with psycopg.connect(db_dsn, autocommit=True) as listener, psycopg.connect(db_dsn, autocommit=True) as reader:
        listener.execute("listen my_done; listen all_done")
        own = db.execute("select net.http_request('GET', %s, notify_channel => 'my_done')",
                         (http_server.url_for("/echo"),)).fetchone()[0]
        default = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
        received = {}
        for notify in listener.notifies(timeout=15):
            # At the moment the id arrives, the row is there for any session.
            visible = reader.execute("select status_code from net._http_response where id = %s",
                                     (int(notify.payload),)).fetchone()
            received[notify.channel] = (int(notify.payload), visible)
            if len(received) == 2:
                break
    assert received == {"my_done": (own, (200,)), "all_done": (default, (200,))}


@pytest.fixture
def callback_owner(db):
    """The test's own schema, with a table that callbacks fill."""
    db.execute("create schema app; create table app.seen(request_id bigint, status int, who name)")
    db.execute("""create function app.on_done(request_id bigint) returns void language plpgsql security definer as $$
                  begin
                      insert into app.seen select r.id, r.status_code, current_user from net._http_response r where r.id = request_id;
                  end $$""")
    db.execute("""create function app.fails(request_id bigint) returns void language plpgsql security definer as $$
                  begin raise exception 'callback broke for %', request_id; end $$""")
    db.execute("create function app.invoker(request_id bigint) returns void language sql as 'select'")
    return db


def test_sql_callback_runs_in_the_write_back_as_the_requesting_role(callback_owner, db, db_dsn, serve, http_server):
    serve(db_dsn)
    url = http_server.url_for("/status/201")
    good = db.execute("select net.http_request('GET', %s, callback => 'app.on_done(bigint)')", (url,)).fetchone()[0]
    bad = db.execute("select net.http_request('GET', %s, callback => 'app.fails')", (url,)).fetchone()[0]
    assert response(db, good)["callback_error"] is None
    user = db.execute("select current_user").fetchone()[0]
    assert db.execute("select request_id, status, who from app.seen").fetchall() == [(good, 201, user)]
    failed = response(db, bad)
    assert failed["status_code"] == 201 and failed["callback_error"] == f"callback broke for {bad}"
    with pytest.raises(errors.InsufficientPrivilege, match="SECURITY DEFINER"):
        db.execute("select net.http_request('GET', %s, callback => 'app.invoker')", (url,))


def verify(entry: dict, secret_text: str) -> bool:
    """What a receiver does (Standard Webhooks), with nothing of ours."""
    headers = {name.lower(): value for name, value in entry["headers"]}
    key = base64.b64decode(secret_text.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + entry["body"]
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(sig.split(",", 1)[1], expected) for sig in headers["webhook-signature"].split(" "))


def test_signed_webhooks_verify_and_keep_their_id_across_retries_and_rotation(db, db_dsn, serve, http_server):
    serve(db_dsn)
    first_secret = db.execute("select net.rotate_signing_key('orders')").fetchone()[0]
    url, path = flaky_url(http_server, fail=1)
    request_id = db.execute(
        "select net.http_request('POST', %s, convert_to('{\"order\": 7}', 'UTF8'), max_retries => 1, "
        "retry_backoff_milliseconds => 20, signing_key_id => 'orders')", (url,)).fetchone()[0]
    row = response(db, request_id)
    attempts = arrivals(http_server, path)
    assert (row["status_code"], len(attempts)) == (200, 2), (row["error_msg"], attempts)
    ids = {dict((n.lower(), v) for n, v in entry["headers"])["webhook-id"] for entry in attempts}
    assert ids == {f"msg_{request_id}"}
    assert all(verify(entry, first_secret) for entry in attempts)

    # Rotation: both keys sign until the old one expires.
    second_secret = db.execute("select net.rotate_signing_key('orders')").fetchone()[0]
    rotated = db.execute("select net.http_request('POST', %s, convert_to('{}', 'UTF8'), signing_key_id => 'orders', "
                         "idempotency_key => 'evt_42')", (http_server.url_for("/echo"),)).fetchone()[0]
    response(db, rotated)
    entry = arrivals(http_server, "/echo")[-1]
    headers = dict((n.lower(), v) for n, v in entry["headers"])
    assert headers["webhook-id"] == "evt_42" and len(headers["webhook-signature"].split(" ")) == 2
    assert verify(entry, first_secret) and verify(entry, second_secret)
    assert not verify(entry, "whsec_" + base64.b64encode(b"x" * 32).decode())

    with pytest.raises(errors.InvalidParameterValue, match="no signing key"):
        db.execute("select net.http_request('GET', %s, signing_key_id => 'nope')", (url,))


def test_a_request_queued_after_a_rotation_is_signed_with_the_new_key(db, db_dsn, serve, http_server):
    # Each rotation's NOTIFY may reach a worker in the middle of its other statements (a TTL
    # pass, a write-back), right before the wake of the request queued after it.
    serve(db_dsn)
    db.execute("select net.rotate_signing_key('rot')")
    for round_no in range(25):
        secret = db.execute("select net.rotate_signing_key('rot')").fetchone()[0]
        request_id = db.execute("select net.http_request('POST', %s, convert_to('{}', 'UTF8'), signing_key_id => 'rot')",
                                (http_server.url_for(f"/echo/rot{round_no}"),)).fetchone()[0]
        assert response(db, request_id)["status_code"] == 200
        (entry,) = arrivals(http_server, f"/echo/rot{round_no}")
        assert verify(entry, secret), f"round {round_no}: not signed with the key made just before"


def test_signing_keys_are_for_the_owner_and_the_worker_only(db, db_dsn):
    from test_security import table_privileges

    db.execute("select net.rotate_signing_key('k')")
    assert "signing_keys" not in table_privileges(db, "public")
    assert table_privileges(db, "pgnet_worker")["signing_keys"] == {"SELECT"}


def test_private_mode_dead_letters_are_their_owners(db, db_dsn, make_role, worker_dsn, serve, http_server):
    from pgnet_curl import schema

    schema.install(db_dsn, private=True)
    alice, alice_dsn = make_role("pgnet_user")
    bob, bob_dsn = make_role("pgnet_user")
    serve(worker_dsn)
    with psycopg.connect(alice_dsn, autocommit=True) as a, psycopg.connect(bob_dsn, autocommit=True) as b:
        failed_id = a.execute("select net.http_request('GET', %s, max_retries => 1, retry_backoff_milliseconds => 10)",
                              (http_server.url_for("/status/502"),)).fetchone()[0]
        assert response(a, failed_id)["attempts"] == 2
        assert a.execute("select id, requested_by from net.failed_requests").fetchall() == [(failed_id, alice)]
        assert b.execute("select count(*) from net.failed_requests").fetchone()[0] == 0
        with pytest.raises(errors.NoDataFound):
            b.execute("select net.retry_request(%s)", (failed_id,))
        replay_id = a.execute("select net.retry_request(%s)", (failed_id,)).fetchone()[0]
        assert response(a, replay_id)["requested_by"] == alice


def test_any_role_replays_failures_for_a_host(db, make_role, serve, db_dsn, http_server):
    serve(db_dsn)
    failed = db.execute("select net.http_get(%s)", (http_server.url_for("/status/502"),)).fetchone()[0]
    response(db, failed)
    _, dsn = make_role()
    with psycopg.connect(dsn, autocommit=True) as conn:
        (replay,) = conn.execute("select * from net.retry_requests('127.0.0.1')").fetchone()
    assert response(db, replay)["status_code"] == 502


def test_a_batch_of_plain_and_failed_responses_stores_all_and_archives_the_failed(db, db_dsn):
    ids = [db.execute("select net.http_get('http://127.0.0.1:9/')").fetchone()[0] for _ in range(3)]
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        queue = Queue(conn, "worker-a")
        claimed = queue.claim(10, 30.0)
        statuses = {ids[0]: 200, ids[1]: 503, ids[2]: 201}
        assert queue.write([Response(r.id, status_code=statuses[r.id], request=r) for r in claimed]) == 3
    assert db.execute("select id, status_code from net._http_response order by id").fetchall() == sorted(statuses.items())
    assert db.execute("select id from net.failed_requests").fetchall() == [(ids[1],)]
    assert db.execute("select count(*) from net.http_request_queue").fetchone()[0] == 0
