"""The supervisor's HTTP endpoint: /metrics (all workers summed) and /healthz."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

log = logging.getLogger("pgnet_curl.ops")

HealthCheck = Callable[[], tuple[bool, dict]]
"""Returns (healthy, details for the JSON body)."""


def collect_registry() -> CollectorRegistry:
    """A registry that reads every process's metric files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def start(host: str, port: int, health: HealthCheck) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on host:port from a daemon thread; return the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(collect_registry()))
            elif path == "/healthz":
                healthy, details = health()
                body = json.dumps({"status": "ok" if healthy else "unhealthy", **details}).encode()
                self._send(200 if healthy else 503, "application/json", body)
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 - quiet: scrapes are not events
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_address[1])
    return server


def gauge_sum(name: str) -> int:
    """A livesum gauge over every worker, from their metric files (e.g. workers connected)."""
    for family in collect_registry().collect():
        if family.name == name:
            return int(sum(sample.value for sample in family.samples))
    return 0
