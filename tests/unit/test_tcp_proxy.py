"""The tests' TCP proxy: cut() resets, drop() holds every byte and every socket until restore()."""

from __future__ import annotations

import socket
import threading

import pytest

from tcp_proxy import TcpProxy


@pytest.fixture
def echo_proxy():
    """A proxy in front of a loopback echo server."""
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass  # the proxy reset us

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    proxy = TcpProxy("127.0.0.1", server.getsockname()[1])
    yield proxy
    proxy.close()
    server.close()


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def test_drop_holds_bytes_and_sockets_until_restore(echo_proxy):
    with connect(echo_proxy) as before:
        before.sendall(b"a")
        assert before.recv(10) == b"a"
        echo_proxy.drop()
        before.sendall(b"b")
        with connect(echo_proxy) as during:  # accepted, like a SYN into a dropped network... held
            during.sendall(b"c")
            for sock in (before, during):
                sock.settimeout(0.5)
                with pytest.raises(TimeoutError):  # silence: no byte, no EOF, no reset
                    sock.recv(10)
            echo_proxy.restore()
            for sock, expected in ((before, b"b"), (during, b"c")):
                sock.settimeout(5)
                assert sock.recv(10) == expected


def test_cut_resets_and_refuses_until_restore(echo_proxy):
    with connect(echo_proxy) as sock:
        sock.sendall(b"a")
        assert sock.recv(10) == b"a"
        echo_proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"b")
            sock.recv(10)
    with pytest.raises(OSError):  # reset at connect, or at the first read
        with connect(echo_proxy) as refused:
            refused.sendall(b"x")
            if not refused.recv(10):
                raise ConnectionResetError("closed")
    echo_proxy.restore()
    with connect(echo_proxy) as sock:
        sock.sendall(b"d")
        assert sock.recv(10) == b"d"
