"""A chaos run: the load, then each fault in turn, each followed by its recovery, then the verdict."""

from __future__ import annotations

import os
import re
import signal
import time
from bisect import bisect_right
from pathlib import Path
from typing import Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from serve_process import ServeProcess
from tcp_proxy import TcpProxy

from .load import SETUP_SQL, Load, RssWatch
from .plan import Plan
from .receiver import Receiver
from .report import Fault, Report

_LEASED_SQL = "select count(*) from net.http_request_queue where lease_owner is not null"
START_TIMEOUT_S = 30.0


class Chaos:
    """One chaos run against an embedded PostgreSQL it may crash (EmbeddedPostgres)."""

    def __init__(self, pg, dsn: str, work_dir: Path, plan: Plan, say: Callable[[str], None] = print):
        self.pg = pg
        self.dsn = dsn
        self.work_dir = work_dir
        self.plan = plan
        self.say = say
        self.serve: ServeProcess | None = None
        self.proxy: TcpProxy | None = None
        self.serve_dsn = ""
        self.faults: list[Fault] = []

    def run(self) -> Report:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SETUP_SQL)
            conn.execute("truncate public.chaos_requests")
        params = conninfo_to_dict(self.dsn)
        self.proxy = TcpProxy(params.get("host", "127.0.0.1"), int(params["port"]))
        self.serve_dsn = make_conninfo(self.dsn, port=str(self.proxy.port))
        started_s = time.monotonic()
        rss = RssWatch(lambda: self.serve.worker_pids() if self.serve else [])
        try:
            with Receiver(self.work_dir / "chaos-receiver.log", self.plan.answer_delay_ms) as receiver:
                self._start_serve()
                # Bounded: the whole plan with every recovery taking its longest, and a margin.
                budget_s = (self.plan.warmup_s + len(self.plan.faults) * (self.plan.steady_s + self.plan.drop_s
                                                                          + self.plan.recover_timeout_s) + 60)
                load = Load(self.dsn, receiver.url, self.plan, budget_s,
                            burst=self.plan.burst_per_worker * self.plan.workers)
                load.start()
                rss.start()
                self._warm_up(load, rss)
                for index, name in enumerate(self.plan.faults):
                    if index:
                        self._pause(self.plan.steady_s, load)
                    fault = getattr(self, f"_{name}")(load)
                    self.faults.append(fault)
                    self.say(f"{name}: {fault.in_flight} in flight ({fault.in_flight_detail}), "
                             + ("not recovered" if fault.recover_s is None else f"recovered in {fault.recover_s:.2f} s"))
                load.stopping.set()
                load.join(30)
                if load.error:
                    raise RuntimeError(f"the load generator failed: {load.error!r}") from load.error
                self._wait_answered(None, self.plan.recover_timeout_s)
                rss.stopping.set()
                self.serve.stop()
            duration_s = time.monotonic() - started_s
            return self._report(receiver.deliveries(), load, rss, duration_s)
        finally:
            rss.stopping.set()
            if self.serve is not None:
                self.serve.kill()
            self.proxy.close()

    def _start_serve(self) -> None:
        self.serve = ServeProcess(self.serve_dsn, "--lease-grace", str(self.plan.lease_grace_s), *self.plan.serve_args,
                                  workers=self.plan.workers, own_group=True)
        self.serve.wait_ready(timeout_s=START_TIMEOUT_S)

    def _warm_up(self, load: Load, rss: RssWatch) -> None:
        """Run the burst through, let the workers settle, read their warm size, then the load alone."""
        started_s = time.monotonic()
        deadline_s = started_s + self.plan.recover_timeout_s
        while load.sent < load.burst and time.monotonic() < deadline_s:
            self._pause(0.05, load)
        if not self._wait_answered(load.highest_id, self.plan.recover_timeout_s):
            raise RuntimeError("the warm-up burst was not answered")
        self._pause(self.plan.rss_warmup_s, load)
        rss.mark_warm(self.serve.worker_pids())
        self._pause(max(0.0, self.plan.warmup_s - (time.monotonic() - started_s)), load)

    def _pause(self, seconds: float, load: Load) -> None:
        """Let the load run; fail early if it stopped."""
        deadline_s = time.monotonic() + seconds
        while time.monotonic() < deadline_s:
            if load.error or not load.is_alive():
                raise RuntimeError(f"the load generator stopped: {load.error!r}")
            time.sleep(min(0.1, max(0.0, deadline_s - time.monotonic())))

    # -- faults: each returns its Fault once every request committed before it is answered --

    def _worker_kill(self, load: Load) -> Fault:
        # The busiest: a commit's wake-up goes to one worker, chosen by the sending session.
        held, victim = max((self._leased(f"%:{pid}"), pid) for pid in self.serve.worker_pids())
        before_id, at_s = load.highest_id, time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # The supervisor hands the victim's requests back at once and says how many.
        pattern = re.compile(rf"released (\d+) requests claimed by dead worker pid {victim}\b")
        released = None
        deadline_s = time.monotonic() + 10
        while held and released is None and time.monotonic() < deadline_s:
            match = pattern.search(self.serve.log)
            released = int(match.group(1)) if match else None
            time.sleep(0.05)
        return self._recovered(Fault("worker_kill", at_s, max(released or 0, held),
                                     f"{released} released by the supervisor, {held} leased just before"),
                               before_id)

    def _postgres_crash(self, load: Load) -> Fault:
        before = self._leased()
        before_id, at_s = load.highest_id, time.monotonic()
        self.pg.restart("immediate")
        # Leases the crash brought back: write-backs it undid (synchronous_commit off) included.
        after = self._leased()
        return self._recovered(Fault("postgres_crash", at_s, before + after,
                                     f"{before} leased before the crash + {after} leased after recovery"), before_id)

    def _network_drop(self, load: Load) -> Fault:
        before = self._leased()
        before_id, at_s = load.highest_id, time.monotonic()
        self.proxy.drop()
        time.sleep(self.plan.drop_s)
        self.proxy.restore()
        return self._recovered(Fault("network_drop", at_s, before,
                                     f"leased when serve's connections fell silent for {self.plan.drop_s:g} s"),
                               before_id)

    def _serve_kill(self, load: Load) -> Fault:
        before_id, at_s = load.highest_id, time.monotonic()
        self.serve.kill_group()
        # A statement the dead workers sent may still commit: count once their sessions are gone.
        # Nobody claims until the new serve runs: these are exactly the dead serve's requests.
        deadline_s = time.monotonic() + 10
        while self._query("select count(*) from pg_stat_activity where application_name like 'pgnet-curl worker%%'") \
                and time.monotonic() < deadline_s:
            time.sleep(0.05)
        after = self._leased()
        self._start_serve()
        return self._recovered(Fault("serve_kill", at_s, after, "leased by the killed serve"), before_id)

    def _recovered(self, fault: Fault, before_id: int) -> Fault:
        if self._wait_answered(before_id, self.plan.recover_timeout_s):
            fault.recover_s = time.monotonic() - fault.at_s
        return fault

    def _wait_answered(self, highest_id: int | None, timeout_s: float) -> bool:
        """Wait until no request up to highest_id (None: none at all) is queued; False after timeout_s."""
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            left = self._query("select count(*) from net.http_request_queue where id <= coalesce(%s, id)",
                               (highest_id,))
            if left == 0:
                return True
            time.sleep(0.1)
        return False

    def _leased(self, owner_like: str = "%") -> int:
        return self._query(_LEASED_SQL + " and lease_owner like %s", (owner_like,))

    def _query(self, sql: str, params: tuple = ()) -> int:
        """One number from the database, waiting (bounded) while it is down."""
        deadline_s = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=3) as conn:
                    return conn.execute(sql, params).fetchone()[0]
            except psycopg.OperationalError:
                if time.monotonic() > deadline_s:
                    raise
                time.sleep(0.1)

    # -- the verdict --

    def _report(self, deliveries: list[tuple[int, str, float]], load: Load, rss: RssWatch,
                duration_s: float) -> Report:
        report = Report(self.plan, duration_s=duration_s, confirmed=load.confirmed, faults=self.faults,
                        rss_warm_bytes=rss.warm_bytes, rss_growth_bytes=rss.growth())
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            report.committed, report.lost, report.queued_left, report.confirmed_missing = conn.execute(
                """select count(*),
                          count(*) filter (where not exists (select from net._http_response r where r.id = c.request_id)),
                          (select count(*) from net.http_request_queue),
                          %s - count(*) filter (where c.n <= %s)
                   from public.chaos_requests c""", (load.confirmed, load.sent)).fetchone()
            report.doubled_rows = conn.execute(
                "select count(*) from (select id from net._http_response group by id having count(*) > 1) d").fetchone()[0]
            report.not_200 = dict(conn.execute(
                """select coalesce(r.status_code::text, r.error_msg), count(*)
                   from public.chaos_requests c join net._http_response r on r.id = c.request_id
                   where r.status_code is distinct from 200 group by 1""").fetchall())
            committed_ns = {n for (n,) in conn.execute("select n from public.chaos_requests")}
        report.deliveries = len(deliveries)
        seen = set()
        fault_times = [fault.at_s for fault in self.faults]
        for n, webhook_id, at_s in sorted(deliveries, key=lambda delivery: delivery[2]):
            if webhook_id != f"evt-{n}":
                report.wrong_webhook_ids += 1
            if n not in seen:
                seen.add(n)
                continue
            report.duplicates += 1
            index = bisect_right(fault_times, at_s) - 1
            if index < 0:
                report.duplicates_outside_faults += 1
            else:
                self.faults[index].duplicates += 1
        report.undelivered = len(committed_ns - seen)
        return report
