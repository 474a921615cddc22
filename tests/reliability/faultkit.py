"""Helpers shared by the reliability tests and scripts/soak.py: process wrappers that collect
output lines, the forwarder's descriptor, CPU and memory figures from /proc, access-record
parsing, and the socket endings (reset versus FIN) the tests assert on.

A separate module rather than conftest.py so it can be imported by name without clashing with
other test directories' conftest modules.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAKES = Path(__file__).with_name("fakes.py")
UPSTREAM = "203.0.113.2"
UPSTREAM6 = "2001:db8:113::2"
ORIGIN = "198.18.0.2"
ORIGIN6 = "2001:db8:18::2"
CLIENT = "198.51.100.2"
ROUTER = "198.51.100.1"
PROXY_PORT = 3128
CLK_TCK = os.sysconf("SC_CLK_TCK")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


class Proc:
    """A process in a lab namespace whose output lines are collected by reader threads."""

    def __init__(self, popen: subprocess.Popen[str], name: str) -> None:
        self.popen = popen
        self.name = name
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.threads = []
        for stream in (popen.stdout, popen.stderr):
            if stream is not None:
                t = threading.Thread(target=self._read, args=(stream,), daemon=True)
                t.start()
                self.threads.append(t)

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with contextlib.suppress(ValueError):
            stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_line(
        self, pattern: str | Callable[[str], bool], timeout: float = 10.0, start: int = 0
    ) -> str:
        """The first line (from index ``start``) matching ``pattern``; fails the test if none."""
        if isinstance(pattern, str):
            regex = re.compile(pattern)
            match: Callable[[str], bool] = lambda s: regex.search(s) is not None  # noqa: E731
        else:
            match = pattern
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"{self.name}: no line matching {pattern!r}:\n{tail}")
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)


class Fake(Proc):
    """A ``fakes.py`` peer; ``events`` are its JSON lines."""

    def events(self, ev: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self.cond:
            lines = list(self.lines)
        for line in lines:
            if line.startswith("{"):
                doc = json.loads(line)
                if ev is None or doc.get("ev") == ev:
                    out.append(doc)
        return out

    def wait_event(
        self, ev: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True, timeout: float = 10
    ) -> dict[str, Any]:
        def match(line: str) -> bool:
            if not line.startswith("{"):
                return False
            doc = json.loads(line)
            return doc.get("ev") == ev and pred(doc)

        return json.loads(self.wait_line(match, timeout))


def parse_record(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a text log line (quoted values unquoted)."""
    fields = {}
    for key, value in _FIELD.findall(line):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


class Forwarder(Proc):
    """``handyproxy`` running in the router namespace with the REDIRECT rule pointing at it."""

    port: int

    def pids(self) -> list[int]:
        """The main process and its workers (``-workers N`` forks children)."""
        pids = [self.pid]
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                text = Path(f"/proc/{self.pid}/task/{task}/children").read_text()
                pids += [int(p) for p in text.split()]
        return pids

    def fd_count(self, kind: str = "socket:") -> int:
        """Open descriptors whose target starts with ``kind`` ("socket:"; "" counts all).

        Sockets by default: libuv opens a few files lazily (a /dev/null reserve, for one), which
        would make an all-descriptor count drift without any tunnel leaking.
        """
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(kind):
                            total += 1
        return total

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process and its workers, in seconds."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return total / CLK_TCK

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def records(self) -> list[dict[str, str]]:
        with self.cond:
            lines = list(self.lines)
        return [parse_record(line) for line in lines if "tunnel end " in line]

    def wait_record(
        self, pred: Callable[[dict[str, str]], bool] = lambda r: True, timeout: float = 10.0
    ) -> dict[str, str]:
        line = self.wait_line(lambda s: "tunnel end " in s and pred(parse_record(s)), timeout)
        return parse_record(line)

    def wait_fds(self, expected: int, timeout: float = 5.0) -> int:
        """Wait until the descriptor count drops back to ``expected``; returns the last count."""
        deadline = time.monotonic() + timeout
        count = self.fd_count()
        while count > expected and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.fd_count()
        return count


def nofile_prefix(nofile: int | None) -> list[str]:
    """``prlimit`` in front of a command: its descriptor limit, soft and hard."""
    return ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []


def _load_fakes() -> Any:
    spec = importlib.util.spec_from_file_location("reliability_fakes", FAKES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fakes = _load_fakes()
payload: Callable[[int, int], bytes] = fakes.payload


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


def reset_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed or impatient client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def settle_fds(fwd: Forwarder, seconds: float = 0.3) -> int:
    """The forwarder's descriptor count once it is idle (after its start-up work settles)."""
    time.sleep(seconds)
    return fwd.fd_count()


def client_hello(name: str) -> bytes:
    """A minimal TLS 1.3-style ClientHello record carrying SNI ``name``, for sniffing tests."""
    raw = name.encode()
    sni = b"\x00" + len(raw).to_bytes(2, "big") + raw
    sni_list = len(sni).to_bytes(2, "big") + sni
    ext = b"\x00\x00" + len(sni_list).to_bytes(2, "big") + sni_list
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(ext).to_bytes(2, "big")
        + ext
    )
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello


def echo_works(sock: socket.socket, message: bytes = b"ping", timeout: float = 5.0) -> bool:
    """Send ``message`` through an echo tunnel and read it back."""
    sock.settimeout(timeout)
    sock.sendall(message)
    got = b""
    with contextlib.suppress(OSError):
        while len(got) < len(message) and (chunk := sock.recv(len(message) - len(got))):
            got += chunk
    return got == message


def connect_or_reset(lab: Any, ns: str, host: str, port: int) -> socket.socket | None:
    """``lab.connect``, or None when the forwarder's reset arrives before connect() returns.

    A refusal or a bad upstream reply can reset the connection within microseconds; the kernel
    then reports ECONNRESET to whichever call comes first, which may be connect() itself.
    """
    try:
        return lab.connect(ns, host, port)
    except ConnectionResetError:
        return None
