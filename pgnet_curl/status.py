"""`pgnet-curl status`: is it working, and how far behind is it?"""

from __future__ import annotations

import json
from datetime import datetime

from . import db, schema
from .sql_files import queries
from .errors import ConfigError
from .settings import DEFAULT_BATCH_SIZE, DEFAULT_TTL, parse_interval, parse_positive_int

OUTCOMES = ("success", "http_4xx", "http_5xx", "timeout", "error")
# Oldest waiting request older than this (seconds) reads as "behind".
BEHIND_AFTER_S = 10.0
# The schema version that has ordering keys and circuits (sql/0012_ordering_and_circuits.sql).
_ORDERING_AND_CIRCUITS_VERSION = 12


def collect(dsn: str, minutes: int = 5) -> dict:
    """Read the queue, recent outcomes, connected workers and settings in one go."""
    sql = queries()
    conn = db.connect(dsn, "pgnet-curl status")
    dbname = conn.info.dbname
    try:
        with db.database_errors("reading status"):
            version = schema.installed_version(conn)
            workers = conn.execute(sql["status_workers"]).fetchall()
            if version is None:
                if workers:
                    down = f"DOWN: {schema.WAITING_FOR_SCHEMA} ({len(workers)} workers connected and waiting)"
                else:
                    down = "DOWN: no net schema and no worker connected: run pgnet-curl install"
                return {"database": dbname, "schema_version": None, "workers": _workers(workers), "verdict": down}
            waiting, in_flight, oldest_s = conn.execute(sql["status_queue"]).fetchone()
            outcomes = dict(conn.execute(sql["status_outcomes"], {"minutes": minutes}).fetchall())
            batch_size, ttl = conn.execute(sql["read_settings"]).fetchone()
            durability = schema.persistence(conn)
            circuits, ordering = [], None
            if version >= _ORDERING_AND_CIRCUITS_VERSION:
                circuits = conn.execute(sql["status_circuits"]).fetchall()
                ordering = conn.execute(sql["status_ordering"]).fetchone()
    finally:
        conn.close()
    report = {
        "database": dbname,
        "schema_version": version,
        "durability": durability,
        "queue": {"waiting": waiting, "in_flight": in_flight, "oldest_pending_s": oldest_s},
        "responses": {"minutes": minutes, **{name: outcomes.get(name, 0) for name in OUTCOMES}},
        "workers": _workers(workers),
        "circuits": [{"host": host, "state": state, "failures": failures,
                      "probe_in_s": None if state != "open" or probe_in_s is None else max(0.0, probe_in_s),
                      "requests_held": held}
                     for host, state, failures, probe_in_s, held in circuits],
        "ordering": None if ordering is None else dict(zip(("keys", "requests_in_line", "halted_keys"), ordering)),
        "settings": {
            "pg_net.batch_size": _setting_text(batch_size, str(DEFAULT_BATCH_SIZE), DEFAULT_BATCH_SIZE,
                                               lambda text: parse_positive_int("pg_net.batch_size", text, 0)),
            "pg_net.ttl": _setting_text(ttl, _human_interval(DEFAULT_TTL.total_seconds()), DEFAULT_TTL,
                                        lambda text: parse_interval("pg_net.ttl", text, DEFAULT_TTL)),
        },
    }
    report["verdict"] = verdict(report)
    return report


def _workers(rows: list[tuple]) -> list[dict]:
    return [
        {"application_name": name, "client_addr": addr, "connected_since": started.isoformat(), "state": state}
        for name, addr, started, state in rows
    ]


def verdict(report: dict) -> str:
    """One line answering the question status exists for."""
    queue, workers = report["queue"], report["workers"]
    pending = queue["waiting"] + queue["in_flight"]
    if not workers:
        return f"DOWN: no worker connected; {pending} requests waiting" if pending else "DOWN: no worker connected"
    held = [circuit["host"] for circuit in report.get("circuits", ()) if circuit["state"] != "closed"]
    open_circuits = f"; circuit open for {', '.join(held)}" if held else ""
    if queue["oldest_pending_s"] is not None and queue["oldest_pending_s"] > BEHIND_AFTER_S:
        return f"BEHIND: {pending} requests pending, oldest {queue['oldest_pending_s']:.1f} s old{open_circuits}"
    return f"OK: {len(workers)} workers connected, {pending} requests pending{open_circuits}"


def render(report: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(report, indent=2)
    if report.get("schema_version") is None:
        return f"database {report['database']}: {report['verdict']}"
    queue, responses = report["queue"], report["responses"]
    oldest = "-" if queue["oldest_pending_s"] is None else f"{queue['oldest_pending_s']:.1f} s"
    lines = [
        report["verdict"],
        f"database   {report['database']} (net schema v{report['schema_version']})",
        f"durability {report['durability']}: {schema.DURABILITY[report['durability']]}",
        f"queue      {queue['waiting']} waiting, {queue['in_flight']} in flight, oldest {oldest}",
        f"responses  last {responses['minutes']} min: "
        + ", ".join(f"{name} {responses[name]}" for name in OUTCOMES),
    ]
    ordering = report.get("ordering")
    if ordering and ordering["keys"]:
        lines.append(f"ordering   {ordering['keys']} keys, {ordering['requests_in_line']} requests in line behind "
                     f"their heads, {ordering['halted_keys']} halted")
    lines.extend(_circuit_lines(report.get("circuits", ())))
    lines.append(f"workers    {len(report['workers'])} connected")
    for worker in report["workers"]:
        since = datetime.fromisoformat(worker["connected_since"]).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"           {worker['application_name']} from {worker['client_addr'] or 'local socket'} "
                     f"since {since} ({worker['state']})")
    lines.append("settings   " + ", ".join(f"{name}={value}" for name, value in report["settings"].items()))
    return "\n".join(lines)


def _circuit_lines(circuits: list[dict]) -> list[str]:
    """One line per circuit that holds requests, then one for the hosts whose failures are counted."""
    lines = []
    for circuit in circuits:
        if circuit["state"] == "closed":
            continue
        when = (f"probe in {circuit['probe_in_s']:.1f} s" if circuit["state"] == "open" and circuit["probe_in_s"] is not None
                else "probe in flight")
        lines.append(f"circuit    {circuit['state'].replace('_', '-')}: {circuit['host']} ({circuit['failures']} failures, "
                     f"{circuit['requests_held']} requests held, {when})")
    failing = [f"{c['host']} ({c['failures']})" for c in circuits if c["state"] == "closed"]
    if failing:
        lines.append(f"failing    {', '.join(failing)} consecutive failures")
    return lines


def _setting_text(raw: str | None, default_text: str, default, parse) -> str:
    """Unset, or set to pg_net's default (`pgnet-curl install` declares it so on 13-16): '(default)'."""
    if raw is None or raw.strip() == "":
        return f"{default_text} (default)"
    try:
        return f"{raw} (default)" if parse(raw) == default else raw
    except ConfigError as exc:
        return f"{raw} (invalid: {exc})"


def _human_interval(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:g} hours" if hours >= 1 else f"{seconds:g} seconds"
