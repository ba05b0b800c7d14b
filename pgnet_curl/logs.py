"""Log lines: one per event worth knowing, as text or JSON. Never header values or bodies."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from .redact import scrub

# --log-level applies to our loggers; libraries (psycopg at debug logs connection attempts)
# stay at info or above.
_OUR_LOGGER = "pgnet_curl"


class TextFormatter(logging.Formatter):
    """One line per event; URL userinfo and queries, and DSN passwords, masked as a last resort."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": scrub(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure(level: str = "info", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    ours = logging.getLevelName(level.upper())
    root.setLevel(max(ours, logging.INFO))
    logging.getLogger(_OUR_LOGGER).setLevel(ours)
