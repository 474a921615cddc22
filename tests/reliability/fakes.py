"""Scripted peers for the fault tests: an upstream CONNECT proxy that misbehaves on cue, and an
origin that serves reproducible downloads.

Why a fake and not squid: a fault test needs the fault at an exact moment (after N bytes, in the
middle of the reply header), and needs to know how the forwarder treated the upstream side (a
clean FIN or a RST). Real proxies do neither on demand. This file runs as a script inside a lab
namespace (``python fakes.py upstream --mode drip ...``) and prints one JSON object per event on
stdout, which the tests read:

    {"ev": "listening", "addr": "203.0.113.2:3128"}
    {"ev": "connect", "id": 1, "target": "198.18.0.2:80", "peer": "203.0.113.1:40000"}
    {"ev": "end", "id": 1, "how": "eof" | "reset" | "fault" | "closed", "up": 10, "down": 20}

``up`` counts bytes the forwarder sent to us, ``down`` bytes we sent back after the reply.

Upstream modes (``--mode``):
  relay            an honest proxy: dial the target, reply 200, copy both ways, pass FIN as FIN
                   and a reset as a reset (SO_LINGER 0)
  echo             reply 200 and echo every byte back; no origin needed (load tests)
  drip             a valid 200 reply sent one byte every ``--delay`` seconds, then echo
  endless          ``HTTP/1.1 200 OK`` and then header lines, one every ``--delay``, forever
  oversized        a 200 status line followed by ``--size`` bytes of header lines, no end
  close-after-200  reply 200, then close cleanly (FIN)
  reset-after-200  reply 200, then reset (RST)
  stall            read the CONNECT, never answer, keep the connection open
  garbage          answer ``--size`` random bytes instead of HTTP
  refuse           answer ``HTTP/1.1 403 Forbidden``
  hold             reply 200, read until the forwarder's FIN, then never write nor close (a
                   server that ignores half-closes)
Faults in mid-tunnel (``relay`` and ``echo``): ``--fault reset|die|stall --after N`` triggers
once N bytes have crossed the tunnel (either way):
  reset            RST towards the forwarder (and towards the origin)
  die              stop reading, let unread bytes pile up, then ``os._exit`` (a crashed proxy:
                   the kernel resets sockets that hold unread data)
  stall            stop reading and writing, keep the sockets (a hung proxy or a dead link)

Origin (``origin``): an HTTP/1.0 server. ``GET /dl?size=N&seed=S&rate=R&reset=K`` answers
``200`` without Content-Length (close-delimited, so only the TCP ending tells a complete body
from a truncated one) and then ``size`` bytes of ``payload(seed, size)``, at ``rate`` bytes/s
when given; with ``reset=K`` it sends K bytes and then a RST. Any other request: 404.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
LINGER_RST = struct.pack("ii", 1, 0)
TCP_CLOSE = 7  # linux/tcp_states.h: what a socket becomes when a RST arrives
TCP_CLOSE_WAIT = 8  # ... and when a FIN arrives
_ids = itertools.count(1)
# Strong references to the connection handlers. Without them a handler whose sockets are all
# idle in the event loop (say, after a half-close) can be garbage-collected mid-transfer
# ("Task was destroyed but it is pending!") and its sockets closed with a FIN, which looks
# exactly like a forwarder bug.
_HANDLERS: set[asyncio.Task[Any]] = set()


def keep(handler: Any) -> Any:
    """Wrap a stream handler so its task stays referenced until it returns."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        _HANDLERS.add(task)
        try:
            await handler(reader, writer)
        finally:
            _HANDLERS.discard(task)

    return run


def payload(seed: int, size: int) -> bytes:
    """The reproducible body of ``/dl?size=&seed=``; tests compute the same bytes to compare."""
    return random.Random(seed).randbytes(size)


QUIET = False


def emit(**event: Any) -> None:
    if QUIET and event.get("ev") != "listening":
        return
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def show(addr: Any) -> str:
    if not addr:
        return "?"
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    writer.transport.abort()


class Upstream:
    """One fake upstream proxy; ``handle`` serves one connection from the forwarder."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.crossed = 0  # bytes through all tunnels, for --fault after N

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(_ids)
        counts = {"up": 0, "down": 0}
        how = "closed"
        try:
            how = await self.serve(cid, reader, writer, counts)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            how = f"error:{type(exc).__name__}"
        finally:
            emit(ev="end", id=cid, how=how, **counts)
            if not writer.transport.is_closing():
                writer.close()

    async def serve(
        self,
        cid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counts: dict[str, int],
    ) -> str:
        args = self.args
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        target = parts[1] if len(parts) == 3 and parts[0] == "CONNECT" else line
        host_header = ""
        for h in head.split(b"\r\n")[1:]:
            if h.lower().startswith(b"host:"):
                host_header = h[5:].strip().decode("latin-1")
        emit(
            ev="connect",
            id=cid,
            target=target,
            host=host_header,
            peer=show(writer.get_extra_info("peername")),
        )
        mode = args.mode
        if mode == "stall":
            await reader.read()  # returns at EOF; raises on reset
            return "eof"
        if mode == "refuse":
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return await wait_end(reader)
        if mode == "garbage":
            writer.write(random.Random(cid).randbytes(args.size))
            await writer.drain()
            return await wait_end(reader)
        if mode == "endless":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for n in itertools.count():
                writer.write(b"X-Slow-%d: still thinking\r\n" % n)
                await writer.drain()
                await asyncio.sleep(args.delay)
        if mode == "oversized":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            line = b"X-Pad: " + b"a" * 90 + b"\r\n"
            for _ in range(args.size // len(line) + 1):
                writer.write(line)
            await writer.drain()
            return await wait_end(reader)
        reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
        if mode == "drip":
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
                await asyncio.sleep(args.delay)
        else:
            writer.write(reply)
        if mode == "close-after-200":
            await writer.drain()
            writer.close()
            return await wait_end(reader)
        if mode == "reset-after-200":
            await writer.drain()
            rst(writer)
            return "fault"
        if mode == "hold":
            while data := await reader.read(CHUNK):
                counts["up"] += len(data)
            return await watch_state(writer)
        if mode in ("echo", "drip"):
            return await self.echo(reader, writer, counts)
        if mode == "relay":
            return await self.relay(target, reader, writer, counts)
        raise SystemExit(f"unknown mode {mode}")

    async def fault_due(self, n: int) -> bool:
        self.crossed += n
        return bool(self.args.fault) and self.crossed >= self.args.after

    async def do_fault(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: Any = None
    ) -> str:
        fault = self.args.fault
        emit(ev="fault", fault=fault, crossed=self.crossed)
        if fault == "reset":
            rst(writer)
            if other is not None:
                rst(other)
            return "fault"
        if fault == "die":
            writer.transport.pause_reading()
            await asyncio.sleep(0.3)  # the forwarder keeps writing; bytes pile up unread
            os._exit(1)
        # stall: read and write nothing and keep the socket; report how the forwarder ends it
        writer.transport.pause_reading()
        return await watch_state(writer)

    async def echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: dict[str, int]
    ) -> str:
        while data := await reader.read(CHUNK):
            counts["up"] += len(data)
            if await self.fault_due(len(data)):
                return await self.do_fault(reader, writer)
            writer.write(data)
            counts["down"] += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return "eof"

    async def relay(
        self,
        target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counts: dict[str, int],
    ) -> str:
        host, port = hostport(target)
        o_reader, o_writer = await asyncio.open_connection(host, port)
        ends: dict[str, str] = {}

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, key: str, back: Any
        ) -> None:
            try:
                while data := await src.read(CHUNK):
                    counts[key] += len(data)
                    if await self.fault_due(len(data)):
                        ends[key] = await self.do_fault(reader, writer, o_writer)
                        return
                    dst.write(data)
                    await dst.drain()
                ends[key] = "eof"
                if dst.can_write_eof() and not dst.transport.is_closing():
                    dst.write_eof()
            except (ConnectionResetError, BrokenPipeError):
                ends[key] = "reset"
                rst(dst)  # pass the reset on, never a FIN that would look like a clean end
                rst(back)

        await asyncio.gather(
            pump(reader, o_writer, "up", writer), pump(o_reader, writer, "down", o_writer)
        )
        if not o_writer.transport.is_closing():
            o_writer.close()
        # "reset" if the forwarder's side reset us, else what happened first
        return ends.get("up", "eof") if ends.get("up") != "eof" else ends.get("down", "eof")


async def watch_state(writer: asyncio.StreamWriter) -> str:
    """Without reading, wait for the peer to end the connection; ``reset`` or ``eof``."""
    sock = writer.get_extra_info("socket")
    seen_fin = False
    while True:
        await asyncio.sleep(0.05)
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        if state == TCP_CLOSE:
            return "reset"
        if state == TCP_CLOSE_WAIT and not seen_fin:
            seen_fin = True
            emit(ev="fin")  # keep watching: a reset may still follow


async def wait_end(reader: asyncio.StreamReader) -> str:
    try:
        while await reader.read(CHUNK):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return "eof"


class Origin:
    """HTTP/1.0 downloads with a close-delimited body (see the module docstring)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = next(_ids)
        sent = 0
        how = "eof"
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("latin-1")
            url = urlsplit(target)
            q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
            if url.path != "/dl":
                writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            size, rate, reset = q.get("size", 0), q.get("rate", 0), q.get("reset", -1)
            body = payload(q.get("seed", 0), size)
            emit(ev="request", id=cid, path=target)
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            step = max(1, min(CHUNK, rate // 20)) if rate else CHUNK
            while sent < size:
                if 0 <= reset <= sent:
                    rst(writer)
                    how = "fault"
                    return
                end = min(size, sent + step, reset if reset > sent else size)
                writer.write(body[sent:end])
                sent = end
                await writer.drain()
                if rate:
                    await asyncio.sleep(step / rate)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            how = f"error:{type(exc).__name__}"
        finally:
            emit(ev="end", id=cid, how=how, down=sent)
            if not writer.transport.is_closing():
                writer.close()


async def serve(handler: Any, listen: Sequence[str], reuseport: bool) -> None:
    servers = []
    for text in listen:
        host, port = hostport(text)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(4096)
        server = await asyncio.start_server(keep(handler), sock=sock, limit=CHUNK)
        servers.append(server)
        emit(ev="listening", addr=show(sock.getsockname()), pid=os.getpid())
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["upstream", "origin"])
    parser.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--mode", default="relay")
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--fault", choices=["reset", "die", "stall"])
    parser.add_argument("--after", type=int, default=0)
    parser.add_argument("--reuseport", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="print only the listening events")
    args = parser.parse_args(argv)
    global QUIET
    QUIET = args.quiet
    handler = Upstream(args).handle if args.role == "upstream" else Origin().handle
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - the venv has uvloop
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(handler, args.listen, args.reuseport))
    return 0


if __name__ == "__main__":
    sys.exit(main())
