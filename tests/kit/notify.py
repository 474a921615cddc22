"""A NOTIFY_SOCKET of our own, as systemd would give a ``Type=notify`` service: what the
forwarder says to its service manager (``READY=1``, ``STATUS=...``, ``STOPPING=1``) can be
waited for and read back.

A thread drains the socket all the time: the forwarder's sendto() blocks when the queue is full,
so a socket nobody reads would stall it.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from handyproxy.lab.output import Output


class NotifySocket:
    """An AF_UNIX datagram socket; each message line arrives as a line of ``messages``."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="hp-notify-")
        self.path = str(Path(self._dir.name) / "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self.messages = Output(_datagram_lines(self._sock), name="notify socket")

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def last_status(self) -> str:
        """The text of the last ``STATUS=`` message, "" before the first one."""
        statuses = [line[7:] for line in self.messages.lines if line.startswith("STATUS=")]
        return statuses[-1] if statuses else ""

    def open_tunnels(self) -> int | None:
        """The tunnel count the last ``STATUS=N tunnels open`` (or ``ready, N ...``) reported."""
        words = self.last_status().replace(",", "").split()
        numbers = [int(w) for w in words if w.isdigit()]
        return numbers[0] if numbers and "tunnels" in words else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._dir.cleanup()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _datagram_lines(sock: socket.socket) -> Iterator[str]:
    """The lines of each datagram, until the socket is shut down."""
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:  # shutdown() wakes the reader with an empty read
            return
        for line in data.decode(errors="replace").splitlines():
            yield line + "\n"
