"""When the TTL passes run: no statement while nothing has expired, a pass when the oldest row
expires, passes a second apart while expired rows remain, the worker's own writes known without a
query (pgnet_curl/worker/expiry.py, against a recording stand-in for the queue)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from pgnet_curl.settings import Settings
from pgnet_curl.worker.expiry import PASS_INTERVAL_S, Expiry


class Table:
    """net._http_response as the TTL passes see it: rows' store times, on the test's clock."""

    def __init__(self, *stored_s: float):
        self.stored_s = sorted(stored_s)
        self.now = 0.0
        self.statements: list[str] = []

    def delete_expired(self, ttl_s: float, limit: int) -> int:
        self.statements.append("delete")
        expired = [s for s in self.stored_s if s < self.now - ttl_s][:limit]
        for stored_s in expired:
            self.stored_s.remove(stored_s)
        return len(expired)

    def delete_expired_archive(self, ttl_s: float, limit: int) -> int:
        self.statements.append("delete archive")
        return 0

    def oldest_response_age_s(self) -> float | None:
        self.statements.append("read")
        return self.now - self.stored_s[0] if self.stored_s else None


def expiry(ttl_s: float = 10, batch_size: int = 200) -> Expiry:
    ctx = SimpleNamespace(settings=Settings(ttl=timedelta(seconds=ttl_s), batch_size=batch_size),
                          metrics=SimpleNamespace(responses_expired_total=SimpleNamespace(inc=lambda n: None)))
    return Expiry(ctx)


def run_at(expiry: Expiry, table: Table, now: float) -> list[str]:
    table.now = now
    table.statements.clear()
    expiry.run(table, now)
    return table.statements


def test_a_new_session_reads_once_then_nothing_runs_until_the_oldest_row_expires():
    passes, table = expiry(ttl_s=10), Table(5.0)
    passes.reset()
    assert run_at(passes, table, 6.0) == ["read"]
    assert passes.due_s() == 15.0
    for now in (7.0, 10.0, 14.9):
        assert run_at(passes, table, now) == []
    assert run_at(passes, table, 15.1) == ["delete", "delete archive", "read"]
    assert table.stored_s == [] and passes.due_s() is None


def test_an_expired_row_at_start_is_deleted_at_once():
    passes, table = expiry(ttl_s=10), Table(0.0)
    passes.reset()
    assert run_at(passes, table, 20.0) == ["read", "delete", "delete archive", "read"]


def test_own_writes_are_known_without_a_query():
    passes, table = expiry(ttl_s=10), Table()
    passes.reset()
    run_at(passes, table, 0.0)
    assert passes.due_s() is None
    table.stored_s.append(3.0)
    passes.written(3.0)
    assert run_at(passes, table, 4.0) == []
    passes.written(5.0)  # newer than the oldest: nothing changes
    assert passes.due_s() == 13.0


def test_passes_of_batch_size_a_second_apart_while_expired_rows_remain():
    passes, table = expiry(ttl_s=10, batch_size=2), Table(0.0, 0.1, 0.2, 0.3)
    passes.reset()
    assert run_at(passes, table, 20.0)[:2] == ["read", "delete"]
    assert len(table.stored_s) == 2
    assert run_at(passes, table, 20.0 + PASS_INTERVAL_S / 2) == []
    assert run_at(passes, table, 20.0 + PASS_INTERVAL_S)[0] == "delete"
    assert table.stored_s == [] and passes.due_s() is None


def test_a_wake_reads_again_at_most_once_a_second():
    passes, table = expiry(ttl_s=10), Table()
    passes.reset()
    run_at(passes, table, 0.0)
    table.stored_s.append(-30.0)  # a row the worker does not know of (another writer's)
    passes.woken()
    assert run_at(passes, table, 0.5) == []
    assert run_at(passes, table, 1.0) == ["read", "delete", "delete archive", "read"]


def test_a_shorter_ttl_moves_the_next_pass_earlier():
    passes, table = expiry(ttl_s=3600), Table(0.0)
    passes.reset()
    run_at(passes, table, 1.0)
    assert passes.due_s() == 3600.0
    passes.ctx.settings = Settings(ttl=timedelta(seconds=1), batch_size=200)
    assert passes.due_s() == 1.0
    assert run_at(passes, table, 1.5)[0] == "delete"
