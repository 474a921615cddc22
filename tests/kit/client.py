"""The lab's client namespace as a test drives it: curl for HTTP(S), sockets for the rest."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from handyproxy.lab.netns import ADDRESSES, Lab
from kit.wire import expect_reset


def host_of(version: int, role: str = "origin") -> str:
    """The role's address as it goes in a URL or a ``dst=`` field (brackets for IPv6)."""
    address = ADDRESSES[version][role]
    return f"[{address}]" if version == 6 else address


@dataclass
class Client:
    """The client namespace: curl for HTTP(S), sockets for everything else."""

    lab: Lab
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
        """A TCP connection from the client to ``role``'s address (the origin's by default)."""
        return self.lab.connect("client", ADDRESSES[version][role], port)

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
