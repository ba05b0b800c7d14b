"""Show and keep results: a table on stdout, JSON and PNG files, the machine they came from."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

# Targets from SPEC §4 and the brief, as (figure, comparison, threshold, wording).
TARGETS = {
    "throughput": [("rate_per_s", ">=", 5600, "throughput >= 5,600 req/s (2x pg_net at batch 5,000)")],
    "sustained": [("latency_p99_ms", "<=", 10, "p99 commit -> visible <= 10 ms at this load")],
    "trickle": [("latency_p99_ms", "<=", 10, "p99 commit -> visible <= 10 ms")],
    "head-of-line": [("last_fast_visible_ms", "<=", 250, "fast responses visible <= 250 ms while slow in flight"),
                     ("fast_all_visible_before_slow", "==", True, "all fast visible before the first slow")],
    "drain": [("worker_rss_flat", "==", True, "RSS per worker flat (< 10 MB growth after 10% drained)")],
    "ordering": [("ordered_rate_vs_unordered", ">=", 0.9, "ordered throughput within 10 % of unordered"),
                 ("requests_out_of_order", "==", 0, "per key, arrival order is id order"),
                 ("one_key_rate_per_s", ">=", 300, "one key, 1 ms receiver: >= 300 req/s")],
    "circuit": [("within_bound", "==", True, "at most N + probes reach the down host while it is down"),
                ("down_failed_requests", "==", 0, "no dead letters"),
                ("other_host_p99_down_vs_baseline", "<=", 1.2, "the other host's p99 unchanged (within 20 %)")],
    "faults": [("lost", "==", 0, "no committed request lost"),
               ("doubled_rows", "==", 0, "exactly one response row per request"),
               ("problems", "==", 0, "every chaos check holds (bounded duplicates and RSS, all delivered)")],
}
# pg_net 0.20.4's worker, on the same kind of machine (given in the brief): 121-209 µs per request.
PG_NET_CPU_US_PER_REQUEST = 121


def machine_info() -> dict:
    """Describe the host: cores, CPU model, kernel, Python, libcurl."""
    import pycurl

    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "pycurl": pycurl.version}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def code_version(repo_dir: Path) -> dict:
    """The commit measured, and whether pgnet_curl/ or sql/ differ from it (read-only git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted_changes": bool(git("status", "--porcelain", "--", "pgnet_curl", "sql"))}


def check_targets(result: dict) -> list[dict]:
    """Return each target of the scenario with its figure and met / not met."""
    checks = []
    figures = result["figures"]
    for name, comparison, threshold, wording in TARGETS.get(result["scenario"], []):
        value = figures.get(name)
        checks.append({"target": wording, "figure": name, "value": value,
                       "met": value is not None and _compare(value, comparison, threshold)})
    cpu = figures.get("cpu_us_per_request")
    if cpu is not None and result["scenario"] in ("throughput", "sustained", "drain"):
        checks.append({"target": f"CPU per request <= pg_net's ({PG_NET_CPU_US_PER_REQUEST}-209 µs)",
                       "figure": "cpu_us_per_request", "value": cpu, "met": cpu <= PG_NET_CPU_US_PER_REQUEST})
    return checks


def _compare(value, comparison: str, threshold) -> bool:
    return {">=": value >= threshold, "<=": value <= threshold, "==": value == threshold}[comparison]


def _format(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


def table(result: dict) -> str:
    """Render one scenario's figures, targets and notes as aligned text."""
    lines = [f"== {result['scenario']} ==  " + "  ".join(f"{k}={_format(v)}" for k, v in result["parameters"].items())]
    settings = dict(result.get("settings", {}))
    if result.get("code"):
        settings["commit"] = str(result["code"]["commit"]) + ("+changes" if result["code"]["uncommitted_changes"] else "")
    if settings:
        lines.append("   " + "  ".join(f"{k}={_format(v)}" for k, v in settings.items()))
    width = max(len(name) for name in result["figures"]) + 2
    for name, value in result["figures"].items():
        lines.append(f"  {name:<{width}}{_format(value)}")
    for check in result.get("targets", []):
        lines.append(f"  target: {check['target']}: {_format(check['value'])} -> "
                     f"{'met' if check['met'] else 'NOT met'}")
    profile = result.get("profile")
    if profile and profile.get("samples"):
        kind = {"wall": "wall clock", "native": "CPU, native frames"}.get(profile.get("mode"), "CPU")
        lines.append(f"  py-spy ({kind}, {profile['samples']:,} samples over all workers), inclusive:")
        lines += [f"    {row['percent']:5.1f}%  {row['frame']}" for row in profile["inclusive"]]
        lines.append("  py-spy self:")
        lines += [f"    {row['percent']:5.1f}%  {row['frame']}" for row in profile["self"]]
    for note in result.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def write_json(data, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def plot(result: dict, path: Path) -> Path | None:
    """Draw the scenario's series: throughput over time, latency CDF, worker RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    panels = []
    if series.get("visible_over_time"):
        panels.append("rate")
    if series.get("latencies_ms") or series.get("fast_visible_ms"):
        panels.append("cdf")
    if series.get("latency_by_commit_ms"):
        panels.append("latency_over_time")
    if any(series.get("worker_rss", {}).values()) and result["scenario"] in ("drain", "throughput"):
        panels.append("rss")
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "rate":
            _plot_rate(ax, series["visible_over_time"])
        elif panel == "cdf":
            _plot_cdf(ax, series)
        elif panel == "latency_over_time":
            points = series["latency_by_commit_ms"]
            ax.scatter([t for t, _ in points], [ms for _, ms in points], s=2, alpha=0.4)
            ax.set_yscale("log")
            ax.set_xlabel("commit time (s from start)")
            ax.set_ylabel("commit -> visible (ms)")
            ax.set_title("latency of each request over time")
        else:
            for pid, points in series["worker_rss"].items():
                ax.plot([t for t, _ in points], [mb for _, mb in points], label=f"worker pid {pid}")
            ax.set_xlabel("s")
            ax.set_ylabel("RSS (MiB)")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize="small")
            ax.set_title("worker RSS over time")
    fig.suptitle(f"pgnet-curl bench: {result['scenario']} "
                 + " ".join(f"{k}={v}" for k, v in result["parameters"].items()))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_rate(ax, points: list) -> None:
    times = [t for t, _ in points]
    counts = [n for _, n in points]
    ax.plot(times, counts, color="tab:blue")
    ax.set_xlabel("s after commit / start")
    ax.set_ylabel("response rows visible", color="tab:blue")
    rate_ax = ax.twinx()
    # Rate over windows of at least 0.5 s (a shorter last one only if >= 0.25 s), so that poll
    # jitter does not look like throughput.
    window_s = max(0.5, (times[-1] - times[0]) / 100) if times else 0.5
    rate_t, rate_v, start = [], [], 0
    for i in range(1, len(points)):
        span_s = times[i] - times[start]
        if span_s >= window_s or (i == len(points) - 1 and span_s >= window_s / 2):
            rate_t.append((times[i] + times[start]) / 2)
            rate_v.append((counts[i] - counts[start]) / span_s)
            start = i
    rate_ax.plot(rate_t, rate_v, color="tab:orange")
    rate_ax.set_ylabel("req/s", color="tab:orange")
    rate_ax.set_ylim(bottom=0)
    ax.set_title("throughput over time")


def _plot_cdf(ax, series: dict) -> None:
    if series.get("latencies_ms"):
        curves = {"commit -> visible": series["latencies_ms"]}
    else:
        curves = {name.removesuffix("_visible_ms").replace("_", " "): values
                  for name, values in series.items() if name.endswith("_visible_ms")}
    for label, values in curves.items():
        if values:
            values = sorted(values)
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms after commit")
    ax.set_ylabel("fraction visible")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("latency CDF")


def markdown_summary(results: list[dict]) -> str:
    """One markdown table per scenario, a column per run, a row per figure (for RESULTS.md)."""
    by_scenario: dict[str, list[dict]] = {}
    for result in results:
        by_scenario.setdefault(result["scenario"], []).append(result)
    parts = []
    for scenario, runs in by_scenario.items():
        names = [name for run in runs for name in run["figures"]]
        names = list(dict.fromkeys(names))
        header = ["figure"] + [run.get("command", "").removeprefix("python -m bench ") or run.get("started_at", "")
                               for run in runs]
        lines = [f"### {scenario}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            lines.append("| " + " | ".join([name] + [_format(run["figures"].get(name, "")) for run in runs]) + " |")
        for index, run in enumerate(runs):
            for check in run.get("targets", []):
                lines.append(f"| target ({index + 1}): {check['target']} | "
                             + " | ".join("met" if i == index and check["met"] else
                                          "NOT met" if i == index else "" for i in range(len(runs))) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
