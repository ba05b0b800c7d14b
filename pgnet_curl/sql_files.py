"""Where the SQL files are, and the named statements of sql/queries.sql: the one place that reads them."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from pathlib import Path

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """Return the folder holding the SQL files: inside the wheel, or sql/ in a checkout."""
    packaged = resources.files("pgnet_curl") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


@cache
def queries() -> dict[str, str]:
    """Load sql/queries.sql into {name: statement}."""
    text = Path(sql_dir(), "queries.sql").read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2])}
