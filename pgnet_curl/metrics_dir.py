"""The folder where worker processes keep their metric values (prometheus multiprocess mode)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare(path: str | None = None) -> Path:
    """Empty (or create) the folder and point prometheus_client at it.

    Must run before prometheus_client is imported anywhere in this process: it chooses
    in-memory or file-backed values once, at import.
    """
    folder = Path(path or os.environ.get(ENV) or tempfile.mkdtemp(prefix="pgnet-curl-metrics-"))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ[ENV] = str(folder)
    return folder
