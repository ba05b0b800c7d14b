"""A loopback TCP listener that serves each connection in a thread, for the test servers
written with blocking sockets (tls_server.py, connect_proxy.py)."""

from __future__ import annotations

import socket
import threading


class ThreadedListener:
    """Accept on 127.0.0.1 (any port) and hand each connection to serve_connection()."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._stopped = False
        self.connections = 0

    def serve_connection(self, client: socket.socket) -> None:
        raise NotImplementedError

    def start(self):
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped = True
        # shutdown() wakes the thread blocked in accept(); close() alone would leave it accepting.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                close_quietly(sock)

    def __enter__(self):
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
                self.connections += 1
            threading.Thread(target=self.serve_connection, args=(client,), daemon=True).start()


def close_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.close()
    except OSError:
        pass
