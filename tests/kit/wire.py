"""What a test does on a socket into the lab: read until a marker or the end, tell a reset from
a clean close, close with a reset itself, and the first bytes a real TLS client sends.

A reset is how the forwarder says "this transfer did not complete", so most helpers here
report how a connection ended (``eof``, ``reset``, ``timeout``) rather than only its bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from handyproxy.lab.netns import Lab
from handyproxy.sockets import reset_socket


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Bytes up to and including ``marker`` (or what came before the end)."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    """Everything until a clean end; a reset raises."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def recv_until_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until the connection ends; returns the bytes and ``eof``, ``reset`` or ``timeout``."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    except TimeoutError:
        return bytes(data), "timeout"
    return bytes(data), "eof"


def expect_reset(sock: socket.socket, payload: bytes = b"", timeout: float = 10.0) -> float:
    """Seconds until the peer resets ``sock``; fails if it answers or closes cleanly instead."""
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        if payload:
            sock.sendall(payload)
        data = sock.recv(65536)
    except ConnectionResetError:
        return time.monotonic() - start
    except TimeoutError:
        pytest.fail(f"no reset within {timeout}s")
    pytest.fail(f"expected a reset, got {'a clean close' if not data else repr(data[:80])}")


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed or impatient client does."""
    reset_socket(sock)
    sock.close()


def connect_or_reset(lab: Lab, ns: str, host: str, port: int) -> socket.socket | None:
    """``lab.connect``, or None when the forwarder's reset arrives before connect() returns.

    A refusal or a bad upstream reply can reset the connection within microseconds; the kernel
    then reports ECONNRESET to whichever call comes first, which may be connect() itself.
    """
    try:
        return lab.connect(ns, host, port)
    except ConnectionResetError:
        return None


def echo_exchange(sock: socket.socket, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload`` to the echo origin, half-close, read its whole answer.

    Returns (answer, expected answer): the origin replies with the length and sha256 of
    everything it received before our FIN (``handyproxy.lab.origin``).
    """
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    expected = f"got {len(payload)} sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    return recv_all(sock), expected


def echo_works(sock: socket.socket, message: bytes = b"ping", timeout: float = 5.0) -> bool:
    """Send ``message`` through a tunnel to an echoing upstream and read it back."""
    sock.settimeout(timeout)
    sock.sendall(message)
    got = b""
    with contextlib.suppress(OSError):
        while len(got) < len(message) and (chunk := sock.recv(len(message) - len(got))):
            got += chunk
    return got == message


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tls_client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real TLS client (one record carrying the ClientHello), made
    in memory without any network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):  # the hello is out; it waits for the server
        conn.do_handshake()
    return outgoing.read()
