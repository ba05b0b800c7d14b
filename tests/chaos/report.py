"""What a chaos run saw, and which of it breaks a guarantee."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import Plan


@dataclass
class Fault:
    """One fault: when, how many requests it caught in flight, how long until all before it were answered."""

    name: str
    at_s: float
    in_flight: int
    in_flight_detail: str
    recover_s: float | None = None
    duplicates: int = 0


@dataclass
class Report:
    """What the run saw; problems() lists what breaks a guarantee."""

    plan: Plan
    duration_s: float = 0.0
    committed: int = 0
    confirmed: int = 0
    confirmed_missing: int = 0
    lost: int = 0
    doubled_rows: int = 0
    queued_left: int = 0
    not_200: dict = field(default_factory=dict)
    deliveries: int = 0
    undelivered: int = 0
    duplicates: int = 0
    duplicates_outside_faults: int = 0
    wrong_webhook_ids: int = 0
    faults: list[Fault] = field(default_factory=list)
    rss_warm_bytes: int = 0
    rss_growth_bytes: dict[int, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        found = []
        if self.confirmed_missing:
            found.append(f"{self.confirmed_missing} requests whose COMMIT succeeded are not in the database")
        for count, what in ((self.lost, "committed requests have no response row"),
                            (self.doubled_rows, "requests have more than one response row"),
                            (self.queued_left, "requests are still queued"),
                            (self.undelivered, "committed requests never reached the receiver"),
                            (self.wrong_webhook_ids, "deliveries carry another request's webhook-id"),
                            (self.duplicates_outside_faults, "duplicate deliveries came before any fault")):
            if count:
                found.append(f"{count} {what}")
        if self.not_200:
            found.append(f"responses other than 200: {self.not_200}")
        for fault in self.faults:
            if fault.recover_s is None:
                found.append(f"{fault.name}: not recovered within {self.plan.recover_timeout_s:g} s")
            if fault.duplicates > fault.in_flight:
                found.append(f"{fault.name}: {fault.duplicates} duplicates, more than the {fault.in_flight} in flight")
        for pid, growth in self.rss_growth_bytes.items():
            if growth > self.plan.rss_bound_bytes:
                found.append(f"worker {pid} grew {growth / 2**20:.1f} MiB past a warm worker's "
                             f"{self.rss_warm_bytes / 2**20:.1f} MiB (bound {self.plan.rss_bound_bytes / 2**20:.0f} MiB)")
        return found

    def lines(self) -> list[str]:
        """The figures, one line each, for the test's output and the bench's notes."""
        growth = max(self.rss_growth_bytes.values(), default=0) / 2**20
        lines = [f"{self.committed} requests committed in {self.duration_s:.1f} s at {self.plan.rate_per_s:g}/s: "
                 f"lost {self.lost}, doubled in rows {self.doubled_rows}, queued at the end {self.queued_left}",
                 f"receiver: {self.deliveries} deliveries, {self.undelivered} requests never delivered, "
                 f"{self.duplicates} duplicates (same webhook-id; {self.wrong_webhook_ids} with another)",
                 f"worker RSS: warm {self.rss_warm_bytes / 2**20:.1f} MiB, at most {growth:+.1f} MiB past it "
                 f"({len(self.rss_growth_bytes)} worker processes)"]
        for fault in self.faults:
            recover = "not recovered" if fault.recover_s is None else f"recovered in {fault.recover_s:.2f} s"
            lines.append(f"{fault.name}: {fault.in_flight} in flight ({fault.in_flight_detail}), "
                         f"{fault.duplicates} duplicates, {recover}")
        return lines

    def figures(self) -> dict:
        """Flat figures for the bench's table and JSON."""
        figures = {"committed": self.committed, "lost": self.lost, "doubled_rows": self.doubled_rows,
                   "queued_left": self.queued_left, "deliveries": self.deliveries, "undelivered": self.undelivered,
                   "duplicates_at_receiver": self.duplicates, "wrong_webhook_ids": self.wrong_webhook_ids,
                   "worker_rss_warm_mb": round(self.rss_warm_bytes / 2**20, 1),
                   "worker_rss_growth_max_mb": round(max(self.rss_growth_bytes.values(), default=0) / 2**20, 1)}
        for fault in self.faults:
            figures[f"{fault.name}_in_flight"] = fault.in_flight
            figures[f"{fault.name}_duplicates"] = fault.duplicates
            figures[f"{fault.name}_recover_s"] = None if fault.recover_s is None else round(fault.recover_s, 2)
        figures["problems"] = len(self.problems())
        return figures
