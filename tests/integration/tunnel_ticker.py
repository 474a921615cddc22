"""Opens one tunnel every ``--interval`` seconds until stdin closes, as a client behind the
redirect would, and prints one JSON line per attempt: its number, start and end (wall clock),
local port (to find its access record), and whether the whole HTTP answer arrived.

Runs in the lab's client namespace with the standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
BODY = b"origin index\n"


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
        if not (data.startswith(b"HTTP/1.") and data[9:12] == b"200" and data.endswith(BODY)):
            error = f"bad answer {data[:60]!r}"
    except (OSError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    line = {"i": number, "t0": started, "t1": time.time(), "port": port, "error": error}
    print(json.dumps(line), flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--name", default="origin.test")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.done() or stop.set_result(None))
    tasks = set()
    number = 0
    next_at = loop.time()
    print(json.dumps({"ready": True}), flush=True)
    while not stop.done():
        task = loop.create_task(attempt(number, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
        next_at += args.interval
        await asyncio.wait([stop], timeout=max(0.0, next_at - loop.time()))
    if tasks:
        await asyncio.wait(tasks)
    print(json.dumps({"done": number}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
