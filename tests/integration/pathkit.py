"""What the integration tests share besides fixtures: the lab's constants, handles for the
processes the fixtures start, the client namespace's tools and socket helpers.

A module of its own, not conftest.py: tests import these names, and a plain ``from conftest
import`` would resolve to whichever conftest.py (integration or reliability) pytest loaded last.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from handyproxy.lab import netns as lablib

PYTHON = sys.executable
#: The helpers (origins, built-in proxy) use only the standard library: ``-S`` skips the venv's
#: site setup, whose editable-install finder costs ~0.2 s per process start.
HELPER_PYTHON = [PYTHON, "-S"]
HERE = Path(__file__).resolve().parent
ORIGIN_NAME = "origin.test"
PROXY_PORT = 3128
#: an upstream that is down: the upstream host, a port where nothing listens
DOWN_UPSTREAM = f"{lablib.UPSTREAM_V4}:{PROXY_PORT + 1}"
ORIGIN_PORTS = {"http": 80, "https": 443, "banner": 25, "echo": 7}
BODY_SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of any buffer size
START_TIMEOUT = 10.0
TOOLS = {
    "ip": "iproute2",
    "nft": "nftables",
    "squid": "squid",
    "tinyproxy": "tinyproxy",
    "curl": "curl",
    "openssl": "openssl",
}


class ProcessLog:
    """Collects a stream's lines in a thread so tests can wait for a line without blocking."""

    def __init__(self, stream: IO[str] | None = None, path: Path | None = None) -> None:
        self.lines: list[str] = []
        self.path = path
        self._offset = 0
        self._cond = threading.Condition()
        if stream is not None:
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # closed at EOF, when the process (and any child sharing it) is gone
            for raw in stream:
                with self._cond:
                    self.lines.append(raw.rstrip("\n"))
                    self._cond.notify_all()

    def _all(self) -> list[str]:
        if self.path is not None:
            with contextlib.suppress(OSError):
                return self.path.read_text(errors="replace").splitlines()
            return []
        return list(self.lines)

    def _current(self) -> list[str]:
        return self._all()[self._offset :]

    def view(self) -> ProcessLog:
        """The same log, showing only lines that arrive from now on (for a reused process)."""
        view = copy.copy(self)
        view._offset = len(self._all())
        return view

    def text(self) -> str:
        return "\n".join(self._current())

    def mark(self) -> int:
        """A position to pass as ``since``, so only later lines count."""
        return len(self._current())

    def wait_for(
        self, pattern: str, timeout: float = 5.0, count: int = 1, since: int = 0
    ) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern``; fails the test with the log on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in self._current()[since:] if (m := regex.search(line))]
            if len(found) >= count:
                return found[:count]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern!r} within {timeout}s; log:\n{self.text()}")
            with self._cond:
                self._cond.wait(min(remaining, 0.05))

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self._current() if regex.search(line)]


@dataclass
class Forwarder:
    """A running handyproxy in the router namespace."""

    proc: subprocess.Popen[str]
    log: ProcessLog
    port: int
    argv: list[str]

    def access(self, *needles: str, timeout: float = 5.0) -> str:
        """The first access record (``tunnel end ...``) that contains every one of ``needles``.

        Needles are plain text; end one with a space to match a whole field (``"status=200 "``).
        """
        lookahead = "".join(f"(?=.*{re.escape(needle)})" for needle in needles)
        return self.log.wait_for(rf"tunnel end {lookahead}", timeout)[0].string


@dataclass
class Upstream:
    """A running upstream proxy in the upstream namespace."""

    kind: str
    proc: subprocess.Popen[str]
    log: ProcessLog
    workdir: Path | None = None
    address: str = f"{lablib.UPSTREAM_V4}:{PROXY_PORT}"

    def view(self) -> Upstream:
        """This upstream for one more test: its log starts empty, the process is shared."""
        return dataclasses.replace(self, log=self.log.view())

    def stop(self, lab: lablib.Lab) -> None:
        if self.kind == "squid":
            self.proc.kill()  # its SIGTERM shutdown takes two seconds; nothing to save
        lab.stop(self.proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Origin:
    kind: str
    port: int
    proc: subprocess.Popen[str]
    log: ProcessLog


@dataclass
class Body:
    """The random file the HTTP(S) origins serve, and what it must hash to."""

    root: Path
    path: Path
    sha256: str
    size: int = field(default=BODY_SIZE)


#: the address the origin sees connections from (the upstream's side of their link)
SEEN_BY_ORIGIN = {4: lablib.UPSTREAM_ORIGIN_V4, 6: lablib.UPSTREAM_ORIGIN_V6}


#: Parametrize ``family`` explicitly, as the decorator nearest the top, so it varies fastest and
#: consecutive tests share an upstream configuration (see ``start_upstream``).
each_family = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def host_of(version: int, role: str = "origin") -> str:
    """The role's address as it goes in a URL (brackets for IPv6)."""
    address = lablib.ADDRESSES[version][role]
    return f"[{address}]" if version == 6 else address


@dataclass
class Client:
    """The client namespace: curl for HTTP(S), sockets for everything else."""

    lab: lablib.Lab
    tmp: Path

    def curl(
        self, url: str, version: int | None = None, *args: str, timeout: float = 20.0
    ) -> tuple[subprocess.CompletedProcess[str], Path]:
        """Fetch ``url`` with curl (``-k``: the origin's cert is self-signed); body in a file."""
        out = Path(tempfile.mkstemp(dir=self.tmp, suffix=".body")[1])
        argv = ["curl", "-sS", "-k", "--max-time", str(timeout), "-o", str(out)]
        argv += [f"-{version}"] if version else []
        proc = self.lab.run("client", [*argv, *args, url], capture_output=True, text=True,
                            timeout=timeout + 5)  # fmt: skip
        return proc, out

    def connect(self, version: int, port: int, role: str = "origin") -> socket.socket:
        return self.lab.connect("client", lablib.ADDRESSES[version][role], port)

    def expect_reset(
        self, version: int, port: int, payload: bytes = b"", role: str = "origin",
        timeout: float = 10.0,
    ) -> float:  # fmt: skip
        """Seconds from connect() until the forwarder resets the connection.

        A reset that lands before connect() returns (a fast forwarder on a busy host) counts.
        """
        start = time.monotonic()
        try:
            sock = self.connect(version, port, role)
        except ConnectionResetError:
            return time.monotonic() - start
        with sock:
            expect_reset(sock, payload, timeout)
        return time.monotonic() - start

    def expect_refused(self, version: int, port: int, role: str, payload: bytes) -> None:
        """The connection is reset, or closed without one byte of data."""
        try:
            sock = self.connect(version, port, role)
        except ConnectionResetError:
            return
        with sock:
            sock.settimeout(5)
            try:
                sock.sendall(payload)
                data = sock.recv(65536)
            except ConnectionResetError:
                return
        assert data == b"", f"a refused connection got data: {data[:80]!r}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def echo_exchange(sock: socket.socket, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload`` to the echo origin, half-close, read its whole answer.

    Returns (answer, expected answer): the origin replies with the length and sha256 of
    everything it received before our FIN (origin_server.py).
    """
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    expected = f"got {len(payload)} sha256={hashlib.sha256(payload).hexdigest()}\n".encode()
    return recv_all(sock), expected


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
