"""Ordered delivery per key (net.http_request(..., ordering_key => ...)): one request of a key at a
time, in id order, across every worker of every serve; a retrying head holds its key; a dead
letter lets the next go (continue) or stops the key until it is replayed (halt)."""

from __future__ import annotations

import uuid
from collections import defaultdict

import psycopg
import pytest

from helpers import wait_until
from pgnet_curl.model import Response
from pgnet_curl.queue import Queue


def ordered(db, url: str, key: str, **options) -> int:
    names = "".join(f", {name} => %({name})s" for name in options)
    return db.execute(f"select net.http_request('GET', %(url)s, ordering_key => %(key)s{names})",
                      {"url": url, "key": key, **options}).fetchone()[0]


def answered(db, ids: list[int]) -> int:
    return db.execute("select count(*) from net._http_response where id = any(%s)", (ids,)).fetchone()[0]


def keys_view(db) -> dict[str, dict]:
    cur = db.execute("select * from net.ordering_keys")
    names = [c.name for c in cur.description]
    return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}


def test_order_holds_across_serve_processes_and_retries_of_the_head(db, db_dsn, worker_dsn, serve, http_server):
    # No circuit opens on the test server's host while the heads fail on purpose.
    quiet = ("--circuit-failures", "1000")
    serve(db_dsn, *quiet, workers=2)
    serve(worker_dsn, *quiet, workers=2, wait=False).wait_ready(expected_workers=4)
    run = uuid.uuid4().hex[:8]
    keys, per_key = 12, 8
    ids: dict[tuple[int, int], int] = {}
    # Two transactions, each queueing half of every key's requests, keys interleaved. The third
    # request of every key fails twice (503) before it succeeds: its retries hold the rest.
    for half in (range(per_key // 2), range(per_key // 2, per_key)):
        with db.transaction():
            for n in half:
                for k in range(keys):
                    fail = 2 if n == 2 else 0
                    url = http_server.url_for(f"/flaky/{run}-{k}-{n}?fail={fail}")
                    ids[k, n] = ordered(db, url, f"key-{k}", max_retries=3, retry_backoff_milliseconds=50)
    wait_until(lambda: answered(db, list(ids.values())) == keys * per_key, timeout_s=60,
               message="every ordered response")
    assert db.execute("select count(*) from net._http_response where id = any(%s) and status_code = 200",
                      (list(ids.values()),)).fetchone()[0] == keys * per_key
    assert keys_view(db) == {}, "no key left once its requests are done"

    attempts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for entry in http_server.requests:
        if entry["path"].startswith(f"/flaky/{run}-"):
            k, n = map(int, entry["path"].rsplit("/", 1)[1].split("-")[1:])
            attempts[k, n].append(entry)
    counts = {(k, n): len(attempts[k, n]) for k in range(keys) for n in range(per_key)}
    assert counts == {(k, n): 3 if n == 2 else 1 for k in range(keys) for n in range(per_key)}, counts
    for k in range(keys):
        # In id order, one at a time: each request arrives after the previous one's last answer.
        assert sorted(range(per_key), key=lambda n: ids[k, n]) == list(range(per_key))
        for n in range(1, per_key):
            assert attempts[k, n][0]["at_s"] >= attempts[k, n - 1][-1]["answered_at_s"], (k, n)
    # Keys go in parallel: while some key's head waited for its retries, other keys were sent.
    retry_windows = [(attempts[k, 2][0]["at_s"], attempts[k, 2][-1]["at_s"]) for k in range(keys)]
    first_other = [entry["at_s"] for (k, n), entries in attempts.items() if n != 2 for entry in entries]
    assert any(start < t < end for start, end in retry_windows for t in first_other), retry_windows


def test_halt_stops_a_key_until_its_replay_which_goes_first(db, db_dsn, serve, http_server):
    serve(db_dsn, "--ordering-on-failure", "halt", "--circuit-failures", "1000")
    run = uuid.uuid4().hex[:8]
    url = lambda n, fail=0: http_server.url_for(f"/flaky/{run}-{n}?fail={fail}")  # noqa: E731
    first = ordered(db, url(1), "orders:7")
    failing = ordered(db, url(2, fail=1), "orders:7")  # no retries: its one 503 is a dead letter
    rest = [ordered(db, url(3), "orders:7"), ordered(db, url(4), "orders:7")]
    other_key = [ordered(db, url(f"other-{n}"), "orders:8") for n in range(3)]
    halted = wait_until(lambda: (v := keys_view(db).get("orders:7")) and v["state"] == "halted" and v,
                        timeout_s=20, message="the key halted")
    assert halted["head_id"] == failing and halted["requests_waiting"] == 2 and halted["next_id"] == rest[0]
    assert db.execute("select id from net.failed_requests").fetchall() == [(failing,)]
    # Nothing of the halted key goes; other keys and unordered requests do.
    plain = db.execute("select net.http_get(%s)", (http_server.url_for("/echo"),)).fetchone()[0]
    wait_until(lambda: answered(db, other_key + [plain]) == 4, timeout_s=20, message="other requests answered")
    assert answered(db, [first]) == 1 and answered(db, rest) == 0
    assert not [e for e in http_server.requests if e["path"] in (f"/flaky/{run}-3", f"/flaky/{run}-4")]
    assert db.execute("select (net._http_collect_response(%s)).status", (rest[0],)).fetchone()[0] == "PENDING"

    # The replay has a new id, above the rest's, but takes the failed request's place in line.
    replay = db.execute("select net.retry_request(%s)", (failing,)).fetchone()[0]
    assert replay > rest[-1]
    wait_until(lambda: answered(db, [replay] + rest) == 3, timeout_s=20, message="the replay and the rest")
    arrivals = [e for e in http_server.requests if e["path"].startswith(f"/flaky/{run}-") and "other" not in e["path"]]
    assert [e["path"].rsplit("-", 1)[1] for e in arrivals] == ["1", "2", "2", "3", "4"]
    assert arrivals[2]["answered_at_s"] <= arrivals[3]["at_s"]
    assert db.execute("select status_code from net._http_response where id = %s", (replay,)).fetchone()[0] == 200
    wait_until(lambda: keys_view(db) == {}, timeout_s=10, message="the key forgotten")


def test_the_view_follows_a_key_and_a_dead_letter_lets_the_next_go(db, db_dsn):
    """Without serve: the head's states as net.ordering_keys shows them; `continue` after a dead letter."""
    first = ordered(db, "http://127.0.0.1:9/a", "k")
    second = ordered(db, "http://127.0.0.1:9/b", "k")
    assert keys_view(db)["k"] | {"state_since": None} == {
        "ordering_key": "k", "key_owner": None, "state": "queued", "head_id": first, "head_attempts": 0,
        "head_retries": 0, "head_retry_at": None, "requests_waiting": 1, "next_id": second, "state_since": None}
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        queue = Queue(conn, "worker-a")
        (head,) = queue.claim(10, 30.0)
        assert head.id == first and head.ordering_key == "k"
        assert keys_view(db)["k"]["state"] == "sending"
        assert queue.write([Response(head.id, status_code=503, request=head, retry_in_ms=60_000.0)]) == 1
        view = keys_view(db)["k"]
        assert (view["state"], view["head_id"], view["head_retries"]) == ("retrying", first, 1)
        assert view["head_retry_at"] is not None
        assert queue.claim(10, 30.0) == [], "the retrying head holds the rest of its key"
        db.execute("update net.http_request_queue set not_before = now() where id = %s", (first,))
        (head,) = queue.claim(10, 30.0)
        # Dead-lettered, and the key goes on (continue): the next one is let into the queue.
        assert queue.write([Response(head.id, status_code=503, request=head)]) == 1
        assert queue.take_effects().released == 1
        (head,) = queue.claim(10, 30.0)
        assert head.id == second
        # The last one: its write-back forgets the key (no caller is adding to it).
        assert queue.write([Response(head.id, status_code=200, request=head)]) == 1
        assert queue.take_effects().idled == 0
    assert keys_view(db) == {}


def test_a_request_joining_while_its_key_goes_idle_is_let_in(db, db_dsn):
    """The head finishes while another transaction adds to its key: the write-back cannot see that
    request; the key turns idle and the worker lets it in once that transaction commits."""
    first = ordered(db, "http://127.0.0.1:9/a", "k")
    with psycopg.connect(db_dsn, autocommit=True) as conn, psycopg.connect(db_dsn) as joining:
        queue = Queue(conn, "worker-a")
        (head,) = queue.claim(10, 30.0)
        second = ordered(joining, "http://127.0.0.1:9/b", "k")  # not committed yet
        assert queue.write([Response(head.id, status_code=200, request=head)]) == 1
        assert queue.take_effects().idled == 1
        assert queue.release_idle_keys(10) == (0, 1), "its transaction holds the key: come back later"
        joining.commit()
        assert queue.release_idle_keys(10) == (1, 0)
        assert [r.id for r in queue.claim(10, 30.0)] == [second]
    assert first < second


def test_an_empty_ordering_key_is_refused(db):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="ordering_key must not be empty"):
        ordered(db, "http://127.0.0.1:9/", "")
