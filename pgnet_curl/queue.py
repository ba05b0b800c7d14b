"""Every statement the worker runs against the queue, named like its query in sql/queries.sql."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

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
    request.ordering_key = options.get("ordering_key")


@dataclass(frozen=True)
class CircuitParams:
    """How failures open circuits (sql/0012_ordering_and_circuits.sql); failures 0: count none."""

    failures: int = 10
    window_s: float = 60.0
    cooldown_s: float = 5.0
    cooldown_cap_s: float = 300.0


@dataclass
class WriteEffects:
    """What write-backs did besides storing rows, for the worker to act on."""

    # Ordered requests let into the queue; keys with nothing visible in line (look again); keys halted.
    released: int = 0
    idled: int = 0
    halted: int = 0
    # Hosts whose circuit opened; circuits closed by a probe's success.
    opened: list[str] = field(default_factory=list)
    closed: int = 0

    def add_ordering(self, counts: list[int] | None) -> None:
        if counts:
            self.released += counts[0]
            self.idled += counts[1]
            self.halted += counts[2]


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
        # What write-backs did besides storing rows, since the worker last took it.
        self.effects = WriteEffects()

    def claim(self, limit: int, grace_s: float, limited: bool = False, slots: bool | None = None,
              overdue_only: bool = False, circuits: bool = False) -> list[Request]:
        """Lease up to limit requests to this worker and return them, oldest first; limited: only
        those the per-destination limits let through now. slots: whether some host's concurrency
        is limited (the limited claim may then give a request a slot; None: assume it may).
        overdue_only (with limited or circuits): only expired leases and due retries, as
        claim_overdue. circuits: none to a host whose circuit is open (sql/0012)."""
        name = "claim_limited" if limited else "claim_circuits" if circuits else "claim"
        with database_errors("claiming requests"):
            rows = self.conn.execute(
                self._sql[name],
                {"limit": limit, "owner": self.owner, "grace_s": grace_s, "overdue_only": overdue_only},
            ).fetchall()
        return _as_requests(rows, slotted=limited and slots is not False)

    def claim_probes(self, grace_s: float) -> list[Request]:
        """Lease one request for each circuit whose cool-down is over, as its probe (half-open)."""
        with database_errors("claiming circuit probes"):
            rows = self.conn.execute(self._sql["claim_probes"], {"owner": self.owner, "grace_s": grace_s}).fetchall()
        requests = _as_requests(rows)
        for request in requests:
            request.circuit_probe = True
        return requests

    def write(self, responses: list[Response], notify_channel: str | None = None, halt: bool = False,
              circuit: CircuitParams = CircuitParams()) -> int:
        """Store responses of requests still leased to us and dequeue them; return rows written.

        Plain rows take write_back; ordered rows that need nothing more take write_back_ordered;
        rows using another delivery feature take write_back_delivery (retries rescheduled,
        failures archived and counted for their host's circuit, NOTIFYs, SQL callbacks in its
        transaction, a halt). What they did besides is added to self.effects.
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
            rest = [r for r in responses if r.needs_delivery_write(notify_channel)]
            ordered = [r for r in rest if r.ordered_only(notify_channel)]
            if ordered:
                written += self._write_ordered(ordered)
            if len(ordered) < len(rest):
                written += self._write_delivery([r for r in rest if not r.ordered_only(notify_channel)],
                                                notify_channel, halt, circuit)
        return written

    def _write_ordered(self, responses: list[Response]) -> int:
        release_slots = any(r.request.destination_leased for r in responses)
        with database_errors("writing responses"):
            written, counts = self.conn.execute(self._sql["write_back_ordered"], {
                "owner": self.owner, "release_slots": release_slots,
                "rows": json.dumps([_response_row(r) for r in responses])}).fetchone()
        self.effects.add_ordering(counts)
        return written

    def _write_delivery(self, responses: list[Response], notify_channel: str | None, halt: bool,
                        circuit: CircuitParams) -> int:
        rows = json.dumps([[*_response_row(r), r.retry_in_ms, r.failed, r.circuit_failure,
                            r.request is not None and r.request.circuit_probe] for r in responses])
        params = {"owner": self.owner, "rows": rows, "notify_channel": notify_channel, "halt": halt,
                  "circuit_threshold": circuit.failures, "circuit_window_s": circuit.window_s,
                  "circuit_cooldown_s": circuit.cooldown_s, "circuit_cooldown_cap_s": circuit.cooldown_cap_s}
        with database_errors("writing responses"):
            if not any(r.request and r.request.callback_oid for r in responses):
                written, _, _, counts, opened, closed, _ = self.conn.execute(
                    self._sql["write_back_delivery"], params).fetchone()
            else:
                with self.conn.transaction():
                    written, _, calls, counts, opened, closed, _ = self.conn.execute(
                        self._sql["write_back_delivery"], params).fetchone()
                    if calls:
                        self.conn.execute(self._sql["run_callbacks"], {"calls": json.dumps(calls)})
        self.effects.add_ordering(counts)
        self.effects.opened.extend(opened or ())
        self.effects.closed += closed
        return written

    def take_effects(self) -> WriteEffects:
        effects, self.effects = self.effects, WriteEffects()
        return effects

    def release_idle_keys(self, max_keys: int, sweep: bool = False) -> tuple[int, int]:
        """Let idle ordering keys' next requests into the queue; return (let in, keys still idle)."""
        with database_errors("letting ordered requests in"):
            released, idle = self.conn.execute(self._sql["release_idle_keys"],
                                               {"max_keys": max_keys, "sweep": sweep}).fetchone()[0]
        return released, idle

    def feature_state(self) -> tuple[bool, bool, list[tuple[str, str, int, float | None]]]:
        """Whether ordering keys have requests in line, whether some key is idle, and (host, state,
        failures, seconds until its probe is due or expires) of every host the circuit breaker knows."""
        with database_errors("reading ordering keys and circuits"):
            ordering, idle, circuits = self.conn.execute(self._sql["feature_state"]).fetchone()
        return ordering, idle, [tuple(row) for row in circuits or ()]

    def reset_circuits(self, hosts: list[str]) -> None:
        """A request to each of these hosts succeeded: forget their run of failures."""
        with database_errors("resetting circuit failures"):
            self.conn.execute(self._sql["reset_circuits"], {"hosts": hosts})

    def unpark_requests(self) -> int:
        """Move back into the queue the held requests of circuits that are not held any more."""
        with database_errors("giving back held requests"):
            return self.conn.execute(self._sql["unpark_requests"]).fetchone()[0]

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
