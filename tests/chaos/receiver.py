"""The receiving end of a chaos run: every delivery recorded with its path and webhook-id.

Standard library only: Receiver runs this file as a script, in a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_HOOK_PATH = re.compile(r"^/hook/(\d+)$")


class Receiver:
    """The receiver script in a process of its own, so its load shares no GIL with the run's threads."""

    def __init__(self, log_path: Path, answer_delay_ms: int):
        self.log_path = log_path
        self.answer_delay_ms = answer_delay_ms
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "Receiver":
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--log", str(self.log_path), "--delay-ms", str(self.answer_delay_ms)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the receiver printed {self.url!r} instead of its URL")
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()

    def deliveries(self) -> list[tuple[int, str, float]]:
        """(n, webhook-id, monotonic arrival) of every delivery of /hook/<n>, once stopped."""
        found = []
        with open(self.log_path, encoding="ascii", errors="replace") as log:
            for line in log:
                path, webhook_id, at_s = line.split()
                match = _HOOK_PATH.match(path)
                if match:
                    found.append((int(match.group(1)), webhook_id, float(at_s)))
        return found


class _Receiving(asyncio.Protocol):
    """One connection: record each request as it arrives, answer it answer_delay_s later."""

    def __init__(self, record: Callable[[str, str], None], answer_delay_s: float):
        self.record = record
        self.answer_delay_s = answer_delay_s
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip()
                       for name, _, value in (line.partition(":") for line in lines[1:])}
            size = end + 4 + int(headers.get("content-length", "0"))
            if len(self.buffer) < size:
                return
            del self.buffer[:size]
            parts = lines[0].split(" ")
            self.record(parts[1] if len(parts) > 1 else "-", headers.get("webhook-id", "-"))
            asyncio.get_running_loop().call_later(self.answer_delay_s, self._answer)

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_ANSWER)


def receive(log_path: str, answer_delay_ms: int) -> None:
    """Serve on 127.0.0.1 until SIGTERM, appending `path webhook-id monotonic-time` per request."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log = open(log_path, "a", encoding="ascii", buffering=1 << 20)

    def record(path: str, webhook_id: str) -> None:
        log.write(f"{path} {webhook_id.replace(' ', '_') or '-'} {time.monotonic():.6f}\n")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(lambda: _Receiving(record, answer_delay_ms / 1000), "127.0.0.1", 0,
                                          backlog=4096)
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await stop
        server.close()

    try:
        asyncio.run(main())
    finally:
        log.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=receive.__doc__)
    parser.add_argument("--log", required=True, help="append `path webhook-id monotonic-time` lines here")
    parser.add_argument("--delay-ms", type=int, default=200, help="answer each request this late")
    args = parser.parse_args(argv)
    receive(args.log, args.delay_ms)


if __name__ == "__main__":
    main()
