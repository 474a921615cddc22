"""The master's control socket, and the client behind ``handyproxy -reload``.

``systemctl reload`` returns when ExecReload= exits, and only its exit status says whether the
reload worked; SIGHUP alone cannot answer. So ExecReload runs ``handyproxy -reload``, which asks
the master over this AF_UNIX socket and waits for the one-line answer: ``ok ...`` once the new
config (or code) serves, ``failed: ...`` with the reason otherwise. The socket crosses an
upgrade's exec like the listeners, and so does a client waiting on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

#: Requests the master understands, one word and a newline.
VERBS = ("reload", "upgrade", "status")
REQUEST_TIMEOUT = 2.0
#: Longer than the slowest reload: an upgrade's trial run and new workers starting.
ANSWER_TIMEOUT = 300.0


class ControlServer:
    """The listening socket at ``path`` (mode 0600: the service's user alone may use it)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path

    @classmethod
    def bind(cls, path: str) -> ControlServer:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a process that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        return cls(sock, path)

    def accept(self) -> tuple[str, socket.socket] | None:
        """One client's request word and its connection (answered later), or None."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            data = b""
            while not data.endswith(b"\n") and len(data) < 64:
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
        except OSError:
            conn.close()
            return None
        return data.decode(errors="replace").strip(), conn

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def request(path: str, verb: str, timeout: float = ANSWER_TIMEOUT) -> tuple[bool, str]:
    """Ask the master; (whether it worked, its answer or why it could not be asked)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(verb.encode() + b"\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError as exc:
        return False, f"cannot ask the master at {path}: {exc.strerror or exc}"
    answer = data.decode(errors="replace").strip()
    if not answer:
        return False, "the master closed the control connection without an answer"
    return answer.startswith("ok"), answer


def main(path: str, verb: str) -> int:
    """``handyproxy -reload``: 0 when the master says ok, 1 otherwise (systemd shows it)."""
    ok, answer = request(path, verb)
    print(f"handyproxy: {answer}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
