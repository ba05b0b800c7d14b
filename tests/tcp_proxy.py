"""A loopback TCP proxy a test can cut and restore: a network drop between worker and database."""

from __future__ import annotations

import selectors
import socket
import threading

# How often a waiting pump looks whether the proxy was closed.
_CHECK_S = 0.2


class TcpProxy:
    """Forward 127.0.0.1:port to a target.

    cut() resets every connection and refuses new ones until restore(): the peers learn at once.
    drop() forwards nothing more, in either direction, until restore(), and leaves every socket
    open (new ones are accepted and held): the peers see silence, as when a network drops packets.
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._stopped = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                _reset(client)
                continue
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        """Connect upstream once forwarding is on (a dropped network lets no SYN through), then pump."""
        if not self._wait_forwarding():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._sockets.append(upstream)
        self._pump(client, upstream)

    def _wait_forwarding(self) -> bool:
        """Block while dropped; False once the proxy is closed."""
        while not self._forwarding.wait(_CHECK_S):
            if self._stopped:
                return False
        return not self._stopped

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while self._wait_forwarding():
                for key, _ in selector.select(1.0):
                    # Checked again before each read and each write: nothing crosses while dropped.
                    if not self._wait_forwarding():
                        return
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if not self._wait_forwarding():
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._sockets = [sock for sock in self._sockets if sock not in (client, upstream)]
            _reset(client)
            _reset(upstream)

    def cut(self) -> None:
        """Drop every connection (RST) and refuse new ones until restore()."""
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _reset(sock)

    def drop(self) -> None:
        """Forward nothing and answer nothing until restore(); every connection stays open."""
        self._forwarding.clear()

    def restore(self) -> None:
        self._open.set()
        self._forwarding.set()

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._forwarding.set()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass
