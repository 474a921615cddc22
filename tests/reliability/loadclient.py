"""Many concurrent client connections through the forwarder, held open on command.

Runs inside the lab's client namespace (one process per ~10,000 connections: a process may not
hold more descriptors than the machine's hard limit). Each connection goes to the origin address
(the router's REDIRECT sends it to the forwarder), sends a short message and waits for the echo
from the lab's CONNECT proxy in ``echo`` mode. Then the process reports and holds every
connection until a line arrives on stdin, closes them all, and reports again. Output: one JSON
object per line.

    {"ev": "held", "ok": 10000, "failed": 0, "errors": {}, "seconds": 4.2}
    {"ev": "closed", "seconds": 0.3}
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Sequence

from handyproxy.sockets import reset_socket


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def one(
    host: str, port: int, gate: asyncio.Semaphore, timeout: float
) -> tuple[asyncio.StreamWriter | None, str]:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            return None, type(exc).__name__
        message = b"%08d" % port
        try:
            writer.write(message)
            got = await asyncio.wait_for(reader.readexactly(len(message)), timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            writer.transport.abort()
            return None, type(exc).__name__
        if got != message:
            writer.transport.abort()
            return None, "wrong-bytes"
        return writer, "ok"


async def run(args: argparse.Namespace) -> None:
    gate = asyncio.Semaphore(args.parallel)
    started = time.monotonic()
    ports = [args.base_port + i % 1000 for i in range(args.count)]
    results = await asyncio.gather(*(one(args.host, p, gate, args.timeout) for p in ports))
    writers = [w for w, _ in results if w is not None]
    errors = collections.Counter(why for _, why in results if why != "ok")
    emit(
        ev="held",
        ok=len(writers),
        failed=args.count - len(writers),
        errors=dict(errors),
        seconds=round(time.monotonic() - started, 2),
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    for writer in writers:
        if args.reset:
            reset_socket(writer.get_extra_info("socket"))
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    emit(ev="closed", seconds=round(time.monotonic() - started, 2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--base-port", type=int, default=10000)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument(
        "--parallel", type=int, default=256, help="connections being set up at once"
    )
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--reset", action="store_true", help="close with RST instead of FIN")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:  # pragma: no cover
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
