"""Sample the worker processes with py-spy while a scenario runs, and name the heaviest frames."""

from __future__ import annotations

import collections
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .runner import stop_process

log = logging.getLogger("bench.profile")


def py_spy_binary() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


# cpu: samples where the worker runs; wall: waits too; native: cpu with C frames (libcurl, libpq, kernel calls).
# Only native sampling pauses the worker for each sample (py-spy cannot read C stacks otherwise).
_MODE_FLAGS = {"cpu": ["--nonblocking"], "wall": ["--idle", "--nonblocking"], "native": ["--native"]}


class PySpy:
    """One `py-spy record` per worker, one line per function: CPU samples only, or wall clock."""

    def __init__(self, pids: list[int], out_prefix: Path, mode: str = "cpu", rate_hz: int = 200):
        self.pids = pids
        self.mode = mode
        self.out_prefix = out_prefix
        self.rate_hz = rate_hz
        self.processes: list[subprocess.Popen] = []
        self.paths: list[Path] = []

    def __enter__(self) -> "PySpy":
        binary = py_spy_binary()
        if not binary:
            log.warning("--profile: py-spy is not installed (pip install py-spy); no profile taken")
            return self
        for pid in self.pids:
            path = Path(f"{self.out_prefix}-worker-{pid}.txt")
            self.paths.append(path)
            self.processes.append(subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", str(self.rate_hz), "--format", "raw",
                 "--function", "--output", str(path)] + _MODE_FLAGS[self.mode],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            ))
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            # SIGINT makes py-spy stop sampling and write its file.
            stop_process(process, signal.SIGINT, timeout_s=30)

    def summary(self, top: int = 12) -> dict:
        """Return the heaviest frames over all workers: inclusive and self share of samples."""
        summary = summarise([path for path in self.paths if path.exists()], top)
        summary["mode"] = self.mode
        return summary


def summarise(paths: list[Path], top: int = 12) -> dict:
    """Aggregate py-spy raw files ("frame;frame;... count" lines) into top inclusive/self frames."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    if not total:
        return {"samples": 0}

    def share(counter):
        # Frames in 90% of samples or more are the loop's trunk (main, Worker.run, _step): not news.
        rows = [(frame, count) for frame, count in counter.most_common() if count < 0.9 * total]
        return [{"frame": frame, "percent": round(100 * count / total, 1)} for frame, count in rows[:top]]

    return {"samples": total, "files": [str(path) for path in paths], "inclusive": share(inclusive), "self": share(own)}
