"""A loopback HTTP target that can go down and come back on the same address and port.

Up, it answers every request `200 ok` (keep-alive, after delay_s) and logs its path and arrival
time. Down, it resets every open connection (the requests in flight fail) and each new one as soon
as it is accepted (curl: a connection error), counting those: the requests that reached it while
it was down. Standard library only;
the circuit breaker tests and `python -m bench circuit` use it.
"""

from __future__ import annotations

import socket
import threading
import time

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class SwitchServer:
    """HTTP/1.1 GETs on host:port (any free port by default), answered or refused as switched."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay_s: float = 0.0):
        self.host = host
        # Answer this long after a request arrives (requests are in flight when it goes down).
        self.delay_s = delay_s
        self.listener = socket.create_server((host, port), backlog=1024)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._up = True
        self._stopped = False
        # (monotonic arrival, path) of each request answered; attempts refused while down.
        self.arrivals: list[tuple[float, str]] = []
        self.refused = 0
        # Wall-clock time (time.time()) of each refusal, to compare with the database's timestamps.
        self.refused_at: list[float] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "SwitchServer":
        threading.Thread(target=self._accept_loop, name=f"SwitchServer:{self.host}", daemon=True).start()
        return self

    def down(self) -> None:
        """Refuse from now on: reset the connections kept alive, and every new one."""
        with self._lock:
            self._up = False
            clients, self._clients = self._clients, set()
        for client in clients:
            _reset(client)

    def up(self) -> None:
        with self._lock:
            self._up = True

    def stop(self) -> None:
        self._stopped = True
        self.down()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def __enter__(self) -> "SwitchServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._up:
                    self.refused += 1
                    self.refused_at.append(time.time())
                    _reset(client)
                    continue
                self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                path = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                with self._lock:
                    if not self._up:
                        self.refused += 1
                        self.refused_at.append(time.time())
                        return
                    self.arrivals.append((time.monotonic(), path))
                if self.delay_s:
                    time.sleep(self.delay_s)
                    with self._lock:
                        if not self._up:
                            return  # went down meanwhile: this connection was reset
                client.sendall(_OK)
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.discard(client)
            _reset(client)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or restarted server's kernel does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass
