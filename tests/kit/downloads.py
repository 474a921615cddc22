"""Many downloads held open through the forwarder while a test reloads, upgrades or kills it,
and how each one ended: whole (its sha256 checked), reset, or cut short by a clean EOF (the
silent truncation that must never happen).

``Downloads`` runs this module as a script in the lab's client namespace. Each of ``--count``
connections asks ``--host`` port 80 for ``/body.bin`` with a small receive buffer, reads its
first bytes and then stops reading, so every tunnel stays open with data in flight. Once all
have their first bytes the script prints ``{"ready": N}``; when a line arrives on its stdin (or
``--go-file`` appears) it reads every download to its end and prints one JSON line each, then
``{"done": N}``. It needs only the standard library: the Molecule ``lifecycle`` scenario runs it
on a container host too.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handyproxy.lab.netns import Lab

REQUEST = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
GO_POLL = 0.05
#: Small enough that the body cannot sit in buffers: the tunnel really is still open.
RCVBUF = 16 * 1024
START_TIMEOUT = 30.0


@dataclass
class Download:
    """How one download ended: ``end`` is ``eof`` or ``reset`` (or the error's name)."""

    i: int
    port: int
    size: int
    sha256: str
    end: str

    def whole(self, sha256: str, size: int) -> bool:
        return self.end == "eof" and self.size == size and self.sha256 == sha256


class Downloads:
    """The script in the client namespace: ``count`` downloads open once constructed,
    ``finish()`` lets them run to their end; stopped on the way out however the test ends."""

    def __init__(self, lab: Lab, host: str, *, name: str, count: int = 100) -> None:
        argv = [sys.executable, str(Path(__file__)), "--host", host, "--name", name,
                "--count", str(count)]  # fmt: skip
        self.lab = lab
        self.count = count
        self.proc, self.out = lab.spawn("client", argv, name="downloads", stdin=subprocess.PIPE)
        try:
            self.out.wait_for(r'^\{"ready"', START_TIMEOUT)
        except BaseException:
            lab.stop(self.proc)
            raise

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.stop(self.proc)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def finish(self, timeout: float = 60.0) -> list[Download]:
        """Read every download to its end; how each ended."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        self.out.wait_for(r'^\{"done"', timeout)
        self.lab.stop(self.proc)
        return [Download(**json.loads(line)) for line in self.out.matching(r'^\{"i"')]


# The script, in the client namespace


async def download(number: int, args: argparse.Namespace, started: asyncio.Event,
                   go: asyncio.Event) -> dict:  # fmt: skip
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    digest = hashlib.sha256()
    size, port, head, end = 0, 0, b"", "eof"
    try:
        await loop.sock_connect(sock, (args.host, args.port))
        port = sock.getsockname()[1]
        await loop.sock_sendall(sock, REQUEST % (args.path.encode(), args.name.encode()))
        first = True
        while True:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                break
            if first:
                first = False
                started.set()
                await go.wait()
            if head is not None:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                chunk = head.split(b"\r\n\r\n", 1)[1]
                head = None
            digest.update(chunk)
            size += len(chunk)
    except ConnectionResetError:
        end = "reset"
    except OSError as exc:
        end = type(exc).__name__
    finally:
        started.set()
        sock.close()
    return {"i": number, "port": port, "size": size, "sha256": digest.hexdigest(), "end": end}


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    events = [asyncio.Event() for _ in range(args.count)]
    tasks = [loop.create_task(download(i, args, events[i], go)) for i in range(args.count)]
    for event in events:
        await event.wait()
    print(json.dumps({"ready": args.count}), flush=True)
    if args.go_file:
        while not os.path.exists(args.go_file):  # the pace of polling a file, not a sync
            await asyncio.sleep(GO_POLL)
    else:
        await loop.run_in_executor(None, sys.stdin.readline)
    go.set()
    for task in asyncio.as_completed(tasks):
        print(json.dumps(await task), flush=True)
    print(json.dumps({"done": args.count}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--name", required=True, help="the Host header")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--path", default="/body.bin")
    parser.add_argument("--go-file", help="go on once this file exists (instead of stdin)")
    asyncio.run(run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
