"""The lab's origin servers on the loopback, without root: files, close-delimited downloads (and
their reset), the banner and the echo that needs a half-close."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.wire import recv_all, recv_until, recv_until_end

from handyproxy.lab import origin


@contextlib.contextmanager
def serving(kind: str, root: Path) -> Iterator[int]:
    server = origin.Server(kind, 0, root, None)
    # shutdown() waits for serve_forever to look at its flag, every poll_interval
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def test_files_are_served_with_a_length_on_a_connection_kept_open(tmp_path):
    (tmp_path / "index.html").write_text("hello\n")
    (tmp_path / "body.bin").write_bytes(b"x" * 100_000)
    with serving("http", tmp_path) as port, connect(port) as sock:
        sock.sendall(b"GET /body.bin HTTP/1.1\r\nHost: o\r\n\r\n")
        head = recv_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 100000\r\n" in head
        body = head.partition(b"\r\n\r\n")[2]
        while len(body) < 100_000:
            body += sock.recv(65536)
        assert body == b"x" * 100_000
        sock.sendall(b"GET / HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nhello\n")


@pytest.mark.parametrize("path", ["/missing", "/../etc/passwd", "/%2e%2e/etc/passwd"])
def test_nothing_outside_the_root_is_served(tmp_path, path):
    (tmp_path / "www").mkdir()
    with serving("http", tmp_path / "www") as port, connect(port) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
        assert recv_all(sock).startswith(b"HTTP/1.1 404 ")


def test_a_download_is_the_seeded_payload_ended_by_fin(tmp_path):
    with serving("http", tmp_path) as port, connect(port) as sock:
        sock.sendall(b"GET /dl?size=300000&seed=5 HTTP/1.0\r\n\r\n")
        data, how = recv_until_end(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and b"Content-Length" not in head
    assert (body, how) == (origin.payload(5, 300_000), "eof")


def test_a_download_with_reset_sends_that_many_bytes_then_a_reset(tmp_path):
    with serving("http", tmp_path) as port, connect(port) as sock:
        sock.sendall(b"GET /dl?size=300000&seed=5&reset=70000 HTTP/1.0\r\n\r\n")
        data, how = recv_until_end(sock)
    body = data.partition(b"\r\n\r\n")[2]
    assert (body, how) == (origin.payload(5, 300_000)[:70_000], "reset")


def test_the_banner_origin_speaks_first_and_answers_quit(tmp_path):
    with serving("banner", tmp_path) as port, connect(port) as sock:
        assert recv_until(sock, b"\r\n") == origin.BANNER
        sock.sendall(b"QUIT\r\n")
        assert recv_until_end(sock) == (b"221 bye\r\n", "eof")


def test_the_echo_origin_answers_only_after_the_half_close(tmp_path):
    payload = b"y" * 200_000
    with serving("echo", tmp_path) as port, connect(port) as sock:
        sock.sendall(payload)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):  # nothing before our FIN
            sock.recv(100)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_end(sock) == (
            f"got 200000 sha256={hashlib.sha256(payload).hexdigest()}\n".encode(),
            "eof",
        )
