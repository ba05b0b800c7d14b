"""Every statement the worker runs against the queue, named like its query in sql/queries.sql."""

from __future__ import annotations

import base64
import json

import psycopg

from .db import database_errors
from .model import Request, Response
from .settings import DestinationLimit
from .sql_files import queries

def _apply_options(request: Request, options: dict) -> None:
    """Set a request's delivery options from its queue row's `options` (sql/0007_delivery.sql)."""
    request.max_retries = options.get("max_retries")
    request.retry_backoff_ms = options.get("retry_backoff_ms")
    request.notify_channel = options.get("notify_channel")
    request.idempotency_key = options.get("idempotency_key")
    request.signing_key_id = options.get("signing_key_id")
    request.callback_oid = options.get("callback")


def _response_row(r: Response) -> list:
    """A response as write_back's JSON array elements."""
    return [r.id, r.status_code, r.content_type, r.headers, r.content,
            None if r.content_bytes is None else base64.b64encode(r.content_bytes).decode("ascii"),
            r.timed_out, r.error_msg, r.error_detail, r.request.retries + 1 if r.request else 1]


class Queue:
    """The request queue and response table as seen by one worker (its lease owner name)."""

    def __init__(self, conn: psycopg.Connection, owner: str):
        self.conn = conn
        self.owner = owner
        self._sql = queries()

    def claim(self, limit: int, grace_s: float, limited: bool = False, slots: bool | None = None,
              overdue_only: bool = False) -> list[Request]:
        """Lease up to limit requests to this worker and return them, oldest first; limited: only
        those the per-destination limits let through now. slots: whether some host's concurrency
        is limited (the limited claim may then give a request a slot; None: assume it may).
        overdue_only (with limited): only expired leases and due retries, as claim_overdue."""
        with database_errors("claiming requests"):
            rows = self.conn.execute(
                self._sql["claim_limited" if limited else "claim"],
                {"limit": limit, "owner": self.owner, "grace_s": grace_s, "overdue_only": overdue_only},
            ).fetchall()
        return _as_requests(rows, slotted=limited and slots is not False)

    def write(self, responses: list[Response], notify_channel: str | None = None) -> int:
        """Store responses of requests still leased to us and dequeue them; return rows written.

        Plain rows take write_back; rows using a delivery feature take write_back_delivery
        (retries rescheduled, failures archived, NOTIFYs, SQL callbacks in its transaction).
        """
        plain = [r for r in responses if not r.needs_delivery_write(notify_channel)]
        written = 0
        if plain:
            # A limited claim may have given these a concurrency slot: then the write-back releases it.
            release_slots = any(r.request is not None and r.request.destination_leased for r in plain)
            with database_errors("writing responses"):
                written = self.conn.execute(self._sql["write_back"], {
                    "owner": self.owner, "release_slots": release_slots,
                    "rows": json.dumps([_response_row(r) for r in plain])}).rowcount
        if len(plain) < len(responses):
            written += self._write_delivery([r for r in responses if r.needs_delivery_write(notify_channel)],
                                            notify_channel)
        return written

    def _write_delivery(self, responses: list[Response], notify_channel: str | None) -> int:
        rows = json.dumps([[*_response_row(r), r.retry_in_ms, r.failed] for r in responses])
        params = {"owner": self.owner, "rows": rows, "notify_channel": notify_channel}
        with database_errors("writing responses"):
            if not any(r.request and r.request.callback_oid for r in responses):
                return self.conn.execute(self._sql["write_back_delivery"], params).fetchone()[0]
            with self.conn.transaction():
                written, _, calls = self.conn.execute(self._sql["write_back_delivery"], params).fetchone()
                if calls:
                    self.conn.execute(self._sql["run_callbacks"], {"calls": json.dumps(calls)})
                return written

    def limits_active(self) -> tuple[bool, bool]:
        """Return whether net.destination_limits has any row, and any concurrency limit."""
        with database_errors("reading destination limits"):
            return self.conn.execute(self._sql["limits_active"]).fetchone()

    def limits_due_s(self) -> float | None:
        """Return seconds until a host held back by its rate limit may send again, or None."""
        with database_errors("reading destination limits"):
            return self.conn.execute(self._sql["limits_due"]).fetchone()[0]

    def set_destination_limits(self, limits: tuple[DestinationLimit, ...]) -> None:
        """Insert or replace the rows of net.destination_limits that serve's flags name."""
        with database_errors("setting destination limits"), self.conn.transaction():
            for limit in limits:
                self.conn.execute(self._sql["set_destination_limit"], {
                    "host_pattern": limit.host_pattern, "max_concurrent": limit.max_concurrent,
                    "max_per_second": limit.max_per_second, "burst": limit.burst})

    def signing_keys(self) -> list[tuple[str, bytes, float | None]]:
        """Return (key_id, secret, expiry epoch or None) of every key that has not expired."""
        with database_errors("reading signing keys"):
            return [(key_id, bytes(secret), expires) for key_id, secret, expires
                    in self.conn.execute(self._sql["signing_keys"]).fetchall()]

    def release(self, ids: list[int]) -> int:
        """Give unfinished requests back to the queue at once instead of at lease expiry."""
        if not ids:
            return 0
        with database_errors("releasing requests"):
            return self.conn.execute(self._sql["release"], {"ids": ids, "owner": self.owner}).rowcount

    def release_all(self) -> int:
        """Give back every request leased to this owner (a dead worker's, named by its supervisor)."""
        return self.release_unheld([])

    def release_unheld(self, held: list[int]) -> int:
        """Give back the requests leased to this owner but not in held (those it lost track of)."""
        with database_errors("releasing requests"):
            return self.conn.execute(self._sql["release_unheld"], {"owner": self.owner, "held": held}).rowcount

    def ask_for_help(self) -> None:
        with database_errors("waking the other workers"):
            self.conn.execute(self._sql["ask_for_help"])

    def check(self) -> tuple[int | None, str | None, str | None]:
        """Return (queue table oid or None when the schema is missing, pg_net.batch_size, pg_net.ttl)."""
        with database_errors("checking the net schema and pg_net settings"):
            return self.conn.execute(self._sql["check"]).fetchone()

    def delete_expired(self, ttl_s: float, limit: int) -> int:
        with database_errors("deleting expired responses"):
            return self.conn.execute(self._sql["delete_expired"], {"ttl_s": ttl_s, "limit": limit}).rowcount

    def delete_expired_archive(self, ttl_s: float, limit: int) -> int:
        with database_errors("deleting expired failed requests"):
            return self.conn.execute(self._sql["delete_expired_archive"], {"ttl_s": ttl_s, "limit": limit}).rowcount

    def delete_idle_buckets(self) -> int:
        with database_errors("deleting idle destination buckets"):
            return self.conn.execute(self._sql["delete_idle_buckets"]).rowcount

    def sample(self) -> tuple[int, float | None]:
        """Return (requests queued or in flight, age in seconds of the oldest one or None)."""
        with database_errors("sampling the queue"):
            return self.conn.execute(self._sql["sample"]).fetchone()

    def claim_overdue(self, limit: int, grace_s: float) -> list[Request]:
        """The safety poll's claim: requests whose lease expired and retries that are due, never a
        fresh row (that waits for a wake, as in pg_net); oldest first."""
        with database_errors("claiming requests"):
            rows = self.conn.execute(
                self._sql["claim_overdue"], {"limit": limit, "owner": self.owner, "grace_s": grace_s}).fetchall()
        return _as_requests(rows)

    def oldest_response_age_s(self) -> float | None:
        """Seconds since the oldest response (or archived failed request) was stored; None: none."""
        with database_errors("reading the oldest response"):
            return self.conn.execute(self._sql["oldest_response"]).fetchone()[0]

    def pg_net_target(self) -> tuple[str | None, str | None]:
        """Return pg_net.database_name and pg_net.username as this session sees them."""
        with database_errors("reading pg_net.database_name and pg_net.username"):
            return self.conn.execute(self._sql["pg_net_target"]).fetchone()


def _as_requests(rows: list[tuple], slotted: bool = False) -> list[Request]:
    """Claimed rows (the columns every claim statement returns) as Requests, oldest first.

    slotted: claimed by the limited claim while some host's concurrency is limited, so each may
    hold a slot its write-back releases.
    """
    rows.sort()
    requests = []
    for id, method, url, headers, body, timeout_ms, attempts, created, retries, options, queue_oid in rows:
        request = Request(id, method, url, json.loads(headers), body, timeout_ms, attempts, created, retries,
                          queue_oid=queue_oid, destination_leased=slotted)
        if options is not None:
            _apply_options(request, json.loads(options))
        requests.append(request)
    return requests
