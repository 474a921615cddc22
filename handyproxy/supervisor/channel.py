"""Messages between the master and one worker over a socketpair.

A message is a length-prefixed pickle. Both ends are the same program (the master forked the
worker), so pickle carries a whole ``Config`` without a schema of its own. The master reads its
end with a selector, the worker with the event loop; both feed ``Channel.received``.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")


class Channel:
    """One end of a worker's socketpair, non-blocking; ``closed`` once the peer is gone."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *message: Any) -> bool:
        """Send one message (small: sent whole or not at all); False when the peer is gone."""
        data = pickle.dumps(message)
        try:
            self.sock.setblocking(True)
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError:
            self.closed = True
            return False
        finally:
            if self.sock.fileno() >= 0:
                self.sock.setblocking(False)
        return True

    def received(self) -> list[tuple[Any, ...]]:
        """Read what is there; the complete messages, in order."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
        out = []
        while len(self.buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < _HEADER.size + size:
                break
            out.append(pickle.loads(self.buf[_HEADER.size : _HEADER.size + size]))
            self.buf = self.buf[_HEADER.size + size :]
        return out

    def close(self) -> None:
        self.closed = True
        self.sock.close()
