"""The code one side of `bench compare` serves: this checkout, or a git revision in its own venv.

A revision is exported with `git archive`, pip-installed (not editable) into a virtualenv under
~/.cache/pgnet-curl-bench/<sha>/, and kept there: the next compare against it starts at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .runner import REPO_DIR, BenchError

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgnet-curl-bench"
BUILD_TIMEOUT_S = 900.0
INSTALL_TIMEOUT_S = 120.0
_COMPLETE = "complete.json"


@dataclass
class Side:
    """An interpreter whose pgnet_curl is the code under test, and the folder its commands run in.

    cwd matters: `python -m` imports from the current folder first, so a built side never runs
    in the checkout.
    """

    name: str
    rev: str
    commit: str
    dirty: bool
    python: str
    cwd: Path
    module: str = ""

    def label(self) -> str:
        return self.commit + (" + uncommitted changes" if self.dirty else "")

    def install(self, dsn: str) -> None:
        """Install schema net with this side's own code (schemas differ between revisions)."""
        done = _run([self.python, "-m", "pgnet_curl", "install", "--dsn", dsn], self.cwd, INSTALL_TIMEOUT_S)
        if done.returncode:
            raise BenchError(f"{self.name} ({self.label()}): pgnet-curl install failed with code "
                             f"{done.returncode}:\n{done.stdout[-2000:]}")


def _run(command: list, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(part) for part in command], cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(map(str, command[:4]))} ...: no end after {timeout_s:.0f} s") from exc


def _git(*args: str) -> str:
    done = _run(["git", *args], REPO_DIR, 60)
    if done.returncode:
        raise BenchError(f"git {' '.join(args)}: {done.stdout.strip()}")
    return done.stdout.strip()


def _module_file(python: str | Path, cwd: Path) -> Path:
    """Where that interpreter, started in cwd, imports pgnet_curl from."""
    done = _run([python, "-c", "import pgnet_curl; print(pgnet_curl.__file__)"], cwd, 60)
    if done.returncode:
        raise BenchError(f"{python} cannot import pgnet_curl:\n{done.stdout[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1]).resolve()


def working_tree() -> Side:
    """This checkout as it is (uncommitted changes included), served by the running interpreter."""
    module = _module_file(sys.executable, REPO_DIR)
    if not module.is_relative_to(REPO_DIR):
        raise BenchError(f"{sys.executable} imports pgnet_curl from {module}, not from {REPO_DIR}: "
                         f"run the bench with this checkout's .venv")
    return Side("head", "working tree", _git("rev-parse", "--short", "HEAD"), bool(_git("status", "--porcelain")),
                sys.executable, REPO_DIR, str(module))


def built(rev: str, name: str) -> Side:
    """REV in its own virtualenv, built once per commit sha (concurrent compares wait for the build)."""
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BenchError:
        raise BenchError(f"{rev!r} is not a commit of {REPO_DIR}") from None
    folder = CACHE_DIR / sha
    python = folder / "venv" / "bin" / "python"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        module = _cached(folder, python)
        if module is None:
            module = _build(sha, folder, python)
    return Side(name, rev, sha[:7], False, str(python), folder, str(module))


def _cached(folder: Path, python: Path) -> Path | None:
    """The built module if the folder holds a finished, working build; None means build again."""
    if not (folder / _COMPLETE).exists() or not python.exists():
        return None
    try:
        module = _module_file(python, folder)
    except BenchError:
        return None
    return module if module.is_relative_to(folder / "venv") else None


def _build(sha: str, folder: Path, python: Path) -> Path:
    print(f"building {sha[:7]} into {folder} (once per commit) ...", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    source = folder / "src"
    source.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", sha], cwd=REPO_DIR, stdout=subprocess.PIPE)
    try:
        untar = subprocess.run(["tar", "-x", "-C", str(source)], stdin=archive.stdout, timeout=120)
    finally:
        archive.stdout.close()
        archive.wait(60)
    if archive.returncode or untar.returncode:
        raise BenchError(f"git archive {sha[:7]} | tar -x failed")
    for step in ([sys.executable, "-m", "venv", folder / "venv"],
                 [python, "-m", "pip", "install", "-q", source]):
        done = _run(step, folder, BUILD_TIMEOUT_S)
        if done.returncode:
            raise BenchError(f"building {sha[:7]}: {' '.join(map(str, step[1:4]))} ... failed with code "
                             f"{done.returncode}:\n{done.stdout[-3000:]}")
    module = _module_file(python, folder)
    if not module.is_relative_to(folder / "venv"):
        raise BenchError(f"the venv built for {sha[:7]} imports pgnet_curl from {module}, not its own copy")
    shutil.rmtree(source)
    (folder / _COMPLETE).write_text(json.dumps({"commit": sha, "module": str(module)}) + "\n")
    return module
