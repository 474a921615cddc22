"""A client that opens one tunnel every ``interval`` seconds for as long as a test lets it, and
what each attempt saw: a failover test kills an upstream under steady traffic and asks which
tunnels failed, and which upstream served the others.

``Ticker`` runs this module as a script in the lab's client namespace. Each attempt fetches
``/index.html`` from ``--host`` (the router's REDIRECT sends it to the forwarder) and prints one
JSON line when it ends: its number, start and end (wall clock, comparable with the test's own
``time.time()``), local port (to find its access record) and the error, if the whole answer did
not arrive. The script stops opening tunnels when its stdin closes, waits for those in flight
and prints ``{"done": N}``. It needs only the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handyproxy.lab.netns import Lab

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
START_TIMEOUT = 15.0


@dataclass
class Attempt:
    """One tunnel the ticker opened."""

    i: int
    t0: float
    t1: float
    port: int
    error: str | None


class Ticker:
    """This module in the client namespace, ticking until ``stop``; as a context manager it is
    stopped on the way out however the test ends, so it never outlives its test."""

    def __init__(
        self, lab: Lab, host: str, *, name: str, expect: str, interval: float = 0.02
    ) -> None:
        """Tick at ``host`` port 80 asking for ``name``; an answer is whole when it ends with
        ``expect`` (``kit.origins.INDEX``)."""
        argv = [sys.executable, str(Path(__file__)), "--host", host, "--name", name,
                "--expect", expect, "--interval", str(interval)]  # fmt: skip
        self.lab = lab
        self.proc, self.out = lab.spawn("client", argv, name="ticker", stdin=subprocess.PIPE)
        try:
            self.out.wait_for(r'^\{"ready"', START_TIMEOUT)
        except BaseException:
            lab.stop(self.proc)
            raise

    def __enter__(self) -> Ticker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.stop(self.proc)

    def wait_attempts(self, count: int, after: float, timeout: float = 30.0) -> list[Attempt]:
        """The first ``count`` attempts that started after ``after`` (wall clock), once each
        has ended."""
        lines = self.out.wait_lines(
            lambda line: line.startswith('{"i"') and json.loads(line)["t0"] > after,
            timeout,
            count,
        )
        return [Attempt(**json.loads(line)) for line in lines]

    def stop(self) -> list[Attempt]:
        """Stop ticking; every attempt, once those in flight have ended."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.out.wait_for(r'^\{"done"', 30)
        self.lab.stop(self.proc)
        return self.attempts()

    def attempts(self) -> list[Attempt]:
        return [Attempt(**json.loads(line)) for line in self.out.matching(r'^\{"i"')]


# The script, in the client namespace


async def attempt(number: int, args: argparse.Namespace) -> None:
    started = time.time()
    port = 0
    error = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(args.host, args.port), args.timeout
        )
        port = writer.get_extra_info("sockname")[1]
        writer.write(REQUEST % args.name.encode())
        data = await asyncio.wait_for(reader.read(), args.timeout)
        writer.close()
        expect = args.expect.encode()
        if not (data.startswith(b"HTTP/1.") and data[9:12] == b"200" and data.endswith(expect)):
            error = f"bad answer {data[:60]!r}"
    except (OSError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    line: dict[str, Any] = {"i": number, "t0": started, "t1": time.time(), "port": port}
    print(json.dumps({**line, "error": error}), flush=True)


async def tick(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    tasks: set[asyncio.Task[None]] = set()
    number = 0
    next_at = loop.time()
    print(json.dumps({"ready": True}), flush=True)
    while not stop.done():
        task = loop.create_task(attempt(number, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
        next_at += args.interval
        # the pace of the traffic (not a wait for anything): stdin closing ends it at once
        await asyncio.wait([stop], timeout=max(0.0, next_at - loop.time()))
    if tasks:
        await asyncio.wait(tasks)
    print(json.dumps({"done": number}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--name", required=True, help="the Host header")
    parser.add_argument("--expect", required=True, help="the body a whole answer ends with")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=10.0)
    asyncio.run(tick(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
