"""A small HTTP CONNECT proxy for the lab: the demo's upstream, and the tests' scriptable one.

Honest by default, it does only what a forwarder needs from its upstream: ``CONNECT host:port``
→ dial → ``HTTP/1.1 200 Connection established`` → relay both ways, passing a half-close on as a
half-close and a reset as a reset. Any other method gets 405, a failed dial 502 (504 on a dial
timeout), a target outside the allow-list 403.

Fault tests need a fault at an exact moment and need to know how the forwarder treated the
upstream side, which no real proxy offers, so it also misbehaves on cue:

``--reply-status CODE``  answer every CONNECT with CODE and close
``--mode MODE``          answer instead of tunnelling to the target:
  relay            the honest proxy (the default)
  echo             reply 200 and echo every byte back; no origin needed (load tests)
  drip             a valid 200 reply sent one byte every ``--delay`` seconds, then echo
  endless          ``HTTP/1.1 200 OK`` and then header lines, one every ``--delay``, forever
  oversized        a 200 status line followed by ``--size`` bytes of header lines, no end
  close-after-200  reply 200, then close cleanly (FIN)
  reset-after-200  reply 200, then reset (RST)
  stall            read the CONNECT, never answer, keep the connection open
  garbage          answer ``--size`` random bytes instead of HTTP
  hold             reply 200, read until the forwarder's FIN, then never write nor close (a
                   server that ignores half-closes)
``--greedy``             hold the 200 back until the origin's first bytes and send both in one write
``--fault reset|die|stall --after N``  once N bytes crossed the tunnels (relay, echo, drip):
  reset            RST towards the forwarder (and towards the origin)
  die              stop reading, and exit once unread bytes wait in the socket (a crashed
                   proxy: the kernel resets sockets that hold unread data)
  stall            stop reading and writing, keep the sockets (a hung proxy or a dead link)

It logs one line per event on stderr, as ``key=value`` fields after a leading word::

    listening on 203.0.113.2:3128
    CONNECT 198.18.0.2:80 id=1 client=203.0.113.1:40000 host=198.18.0.2:80 status=200
    fault id=1 fault=reset crossed=3000
    fin id=1
    tunnel end id=1 target=198.18.0.2:80 client=203.0.113.1:40000 up=10 down=20 end=eof ...

``up`` counts bytes the client sent us after its request, ``down`` bytes we sent back after the
reply; ``end`` is how the connection ended from here: ``eof``, ``reset``, ``fault``, ``closed``
(we closed it), or ``error:NAME``.

    python -m handyproxy.lab.connect_proxy --listen 203.0.113.2:3128 \
        --listen '[2001:db8:113::2]:3128'

Standard library only (uvloop with ``--uvloop``); it is not built for speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import fnmatch
import itertools
import json
import logging
import os
import random
import signal
import struct
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from handyproxy.address import authority, split_hostport, unmap
from handyproxy.sockets import TCP_CLOSE, TCP_CLOSE_WAIT, reset_socket, tcp_state

log = logging.getLogger("handyproxy.lab.connect_proxy")
#: Its own logger so ``--quiet`` can silence the per-connection lines and keep these.
listening_log = logging.getLogger("handyproxy.lab.connect_proxy.listening")

MODES = (
    "relay",
    "echo",
    "drip",
    "endless",
    "oversized",
    "close-after-200",
    "reset-after-200",
    "stall",
    "garbage",
    "hold",
)
FAULTS = ("reset", "die", "stall")
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
BUFFER = 64 * 1024
BACKLOG = 4096
GREEDY_WAIT = 0.5
#: How often a connection we no longer read is checked for the peer's FIN or RST; nothing
#: else tells a process that never reads that its peer went away.
STATE_POLL = 0.05
#: The longest a dying proxy waits for unread bytes before it exits anyway.
DIE_WAIT = 2.0
REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class Options:
    """How the proxy behaves; the defaults make an honest, permissive proxy."""

    allow: tuple[str, ...] = ()
    dial_timeout: float = 10.0
    reply_status: int | None = None
    mode: str = "relay"
    greedy: bool = False
    delay: float = 0.2
    size: int = 64 * 1024
    fault: str | None = None
    after: int = 0
    reuseport: bool = False
    listen: tuple[tuple[str | None, int], ...] = field(default=((None, 3128),))


def listen_address(text: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[V6]:PORT``, or ``:PORT`` for every address, as ``--listen`` takes it."""
    if text.startswith(":"):
        return None, split_hostport(f"[::]{text}")[1]
    return split_hostport(text)


def allowed(host: str, port: int, patterns: Sequence[str]) -> bool:
    """An empty allow-list admits all; otherwise ``host`` or ``host:port`` must match a glob."""
    if not patterns:
        return True
    host = host.lower()
    return any(
        fnmatch.fnmatchcase(host, p.lower()) or fnmatch.fnmatchcase(f"{host}:{port}", p.lower())
        for p in patterns
    )


def _reply(status: int) -> bytes:
    reason = REASONS.get(status, "Status")
    extra = "Allow: CONNECT\r\n" if status == 405 else ""
    if status // 100 == 2:
        return f"HTTP/1.1 {status} {reason}\r\n\r\n".encode()
    head = f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n"
    return (head + "\r\n").encode()


def _show(address: Any) -> str:
    if not address:
        return "?"
    return authority(unmap(address[0]), address[1])


def _fields(**values: object) -> str:
    """``key=value`` pairs; a value with a space or quote is written as a JSON string."""
    out = []
    for key, value in values.items():
        text = "-" if value is None or value == "" else str(value)
        if any(c in text for c in ' "=\\'):
            text = json.dumps(text)
        out.append(f"{key}={text}")
    return " ".join(out)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0, then abort), never a FIN that would look like a clean end."""
    reset_socket(writer.get_extra_info("socket"))
    writer.transport.abort()


def unread_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes waiting in the kernel's receive queue of ``writer``'s socket (FIONREAD)."""
    sock = writer.get_extra_info("socket")
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def wait_end(reader: asyncio.StreamReader) -> str:
    """Read and drop everything until the peer ends the connection: ``eof`` or ``reset``."""
    try:
        while await reader.read(BUFFER):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    return "eof"


@dataclass
class Connection:
    """One client connection and what the log says about it."""

    cid: int
    client: str
    target: str = ""
    up: int = 0
    down: int = 0
    started: float = field(default_factory=time.monotonic)

    def said(self, status: int | str, host: str = "", reason: str = "") -> None:
        extra = {"reason": reason} if reason else {}
        log.info(
            "CONNECT %s %s",
            self.target,
            _fields(id=self.cid, client=self.client, host=host, status=status, **extra),
        )

    def ended(self, how: str) -> None:
        log.info(
            "tunnel end %s",
            _fields(
                id=self.cid,
                target=self.target,
                client=self.client,
                up=self.up,
                down=self.down,
                end=how,
                duration=f"{time.monotonic() - self.started:.3f}s",
            ),
        )


class ConnectProxy:
    """One proxy (any number of listeners); ``handle`` serves one client connection."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.active: set[asyncio.Task[None]] = set()  # strong references: see handle()
        self.crossed = 0  # bytes through every tunnel, for --fault --after N
        self._ids = itertools.count(1)

    async def close(self) -> None:
        """End every open connection and wait until their sockets are closed."""
        for task in list(self.active):
            task.cancel()
        await asyncio.gather(*self.active, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(next(self._ids), _show(writer.get_extra_info("peername")))
        task = asyncio.current_task()
        assert task is not None
        # Without a reference a handler whose sockets are idle in the loop (after a
        # half-close, say) can be collected mid-transfer and its sockets closed with a FIN.
        self.active.add(task)  # type: ignore[arg-type]
        try:
            await self._handle(conn, reader, writer)
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active.discard(task)  # type: ignore[arg-type]
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_reply(400))
            return
        lines = head.split(b"\r\n")
        request_line = lines[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            log.info("bad request %s", _fields(id=conn.cid, client=conn.client, line=request_line))
            writer.write(_reply(400))
            return
        method, conn.target, _version = parts
        if method != "CONNECT":
            log.info(
                "%s %s %s",
                method,
                conn.target,
                _fields(id=conn.cid, client=conn.client, status=405),
            )
            writer.write(_reply(405))
            return
        host_header = next(
            (h[5:].strip().decode("latin-1") for h in lines[1:] if h.lower().startswith(b"host:")),
            "",
        )
        how = "closed"
        try:
            how = await self._connect(conn, host_header, reader, writer)
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        except (OSError, asyncio.IncompleteReadError) as exc:
            how = f"error:{type(exc).__name__}"
        finally:
            conn.ended(how)

    async def _connect(
        self,
        conn: Connection,
        host_header: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> str:
        """Answer one CONNECT as the options say; returns how the connection ended."""
        opts = self.options
        try:
            host, port = split_hostport(conn.target)
        except ValueError as exc:
            conn.said(400, host_header, str(exc))
            writer.write(_reply(400))
            return "closed"
        if opts.reply_status is not None:
            conn.said(opts.reply_status, host_header)
            writer.write(_reply(opts.reply_status))
            await writer.drain()
            return "closed"
        if not allowed(host, port, opts.allow):
            conn.said(403, host_header, "not in the allow-list")
            writer.write(_reply(403))
            return "closed"
        mode = opts.mode
        if mode == "stall":
            conn.said("-", host_header, "never answering")
            return await wait_end(reader)
        if mode == "garbage":
            conn.said("-", host_header, "garbage")
            writer.write(random.Random(conn.cid).randbytes(opts.size))
            await writer.drain()
            return await wait_end(reader)
        if mode in ("endless", "oversized"):
            conn.said(200, host_header, f"{mode} header")
            await self._bad_header(mode, writer)
            return await wait_end(reader)
        origin: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        if mode == "relay":
            try:
                origin = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=BUFFER), opts.dial_timeout
                )
            except (TimeoutError, OSError) as exc:
                status = 504 if isinstance(exc, TimeoutError) else 502
                conn.said(status, host_header, type(exc).__name__ if status == 504 else str(exc))
                writer.write(_reply(status))
                return "closed"
        conn.said(200, host_header)
        try:
            return await self._tunnel(conn, mode, origin, reader, writer)
        finally:
            if origin is not None:
                origin[1].close()
                with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                    await origin[1].wait_closed()

    async def _bad_header(self, mode: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        if mode == "oversized":
            line = b"X-Pad: " + b"a" * 90 + b"\r\n"
            writer.write(line * (self.options.size // len(line) + 1))
            await writer.drain()
            return
        for n in itertools.count():
            writer.write(b"X-Slow-%d: still thinking\r\n" % n)
            await writer.drain()
            await asyncio.sleep(self.options.delay)  # the pace of the misbehaviour

    async def _tunnel(
        self,
        conn: Connection,
        mode: str,
        origin: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> str:
        """Send the 200 (as the mode says) and carry the tunnel; returns how it ended."""
        reply = _reply(200)
        if mode == "drip":
            for i in range(len(reply)):
                writer.write(reply[i : i + 1])
                await writer.drain()
                await asyncio.sleep(self.options.delay)  # the pace of the misbehaviour
        elif origin is not None and self.options.greedy:
            first = b""
            with contextlib.suppress(TimeoutError):
                first = await asyncio.wait_for(origin[0].read(BUFFER), GREEDY_WAIT)
            writer.write(reply + first)
            conn.down += len(first)
        else:
            writer.write(reply)
        if mode == "close-after-200":
            await writer.drain()
            writer.close()
            return await wait_end(reader)
        if mode == "reset-after-200":
            await writer.drain()
            reset(writer)
            return "fault"
        if mode == "hold":
            while data := await reader.read(BUFFER):
                conn.up += len(data)
            return await self._watch(conn, writer)
        if origin is None:
            return await self._echo(conn, reader, writer)
        return await self._relay(conn, origin, reader, writer)

    # Faults

    def _fault_due(self, n: int) -> bool:
        self.crossed += n
        return bool(self.options.fault) and self.crossed >= self.options.after

    async def _fault(
        self,
        conn: Connection,
        writer: asyncio.StreamWriter,
        other: asyncio.StreamWriter | None = None,
    ) -> str:
        fault = self.options.fault
        log.info("fault %s", _fields(id=conn.cid, fault=fault, crossed=self.crossed))
        if fault == "reset":
            reset(writer)
            if other is not None:
                reset(other)
            return "fault"
        writer.transport.pause_reading()
        if fault == "die":
            deadline = time.monotonic() + DIE_WAIT
            while unread_bytes(writer) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(STATE_POLL / 5)  # the forwarder is still writing
            os._exit(1)
        return await self._watch(conn, writer)  # stall

    async def _watch(self, conn: Connection, writer: asyncio.StreamWriter) -> str:
        """Without reading, wait until the peer resets the connection (a FIN is logged)."""
        sock = writer.get_extra_info("socket")
        seen_fin = False
        while True:
            state = tcp_state(sock)
            if state == TCP_CLOSE:
                return "reset"
            if state == TCP_CLOSE_WAIT and not seen_fin:
                seen_fin = True
                log.info("fin %s", _fields(id=conn.cid))
            await asyncio.sleep(STATE_POLL)

    # Carrying bytes

    async def _echo(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str:
        while data := await reader.read(BUFFER):
            conn.up += len(data)
            if self._fault_due(len(data)):
                return await self._fault(conn, writer)
            writer.write(data)
            conn.down += len(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return "eof"

    async def _relay(
        self,
        conn: Connection,
        origin: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> str:
        o_reader, o_writer = origin
        ends: dict[str, str] = {}

        async def pump(
            src: asyncio.StreamReader,
            dst: asyncio.StreamWriter,
            way: str,
            back: asyncio.StreamWriter,
        ) -> None:
            """Copy until EOF and pass it on as a half-close; a reset goes on as a reset."""
            try:
                while data := await src.read(BUFFER):
                    if way == "up":
                        conn.up += len(data)
                    else:
                        conn.down += len(data)
                    if self._fault_due(len(data)):
                        ends[way] = await self._fault(conn, writer, o_writer)
                        return
                    dst.write(data)
                    await dst.drain()
                ends[way] = "eof"
                if dst.can_write_eof() and not dst.transport.is_closing():
                    dst.write_eof()
            except OSError as exc:
                broken = isinstance(exc, (ConnectionResetError, BrokenPipeError))
                ends[way] = "reset" if broken else f"error:{type(exc).__name__}"
                reset(dst)
                reset(back)

        await asyncio.gather(
            pump(reader, o_writer, "up", writer), pump(o_reader, writer, "down", o_writer)
        )
        # how the client's side ended, unless it was clean: then how the origin's did
        return ends["up"] if ends.get("up") != "eof" else ends.get("down", "eof")


async def serve(options: Options) -> None:
    """Listen on every ``options.listen`` address until SIGTERM/SIGINT."""
    proxy = ConnectProxy(options)
    servers = []
    for host, port in options.listen:
        server = await asyncio.start_server(
            proxy.handle,
            host,
            port,
            limit=MAX_HEAD,
            reuse_address=True,
            reuse_port=options.reuseport or None,
            backlog=BACKLOG,
        )
        servers.append(server)
        for sock in server.sockets:
            listening_log.info("listening on %s", _show(sock.getsockname()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    await proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m handyproxy.lab.connect_proxy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR:PORT",
        help="address to listen on (repeatable); ':3128' means all (default)",
    )
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="GLOB",
        help="admit only targets whose host or host:port matches (repeatable)",
    )
    parser.add_argument("--dial-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument(
        "--reply-status", type=int, metavar="CODE", help="answer every CONNECT with CODE, close"
    )
    parser.add_argument("--mode", choices=MODES, default="relay", help="see above")
    parser.add_argument(
        "--greedy", action="store_true", help="send the 200 together with the origin's first bytes"
    )
    parser.add_argument("--delay", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--size", type=int, default=64 * 1024, metavar="BYTES")
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--after", type=int, default=0, metavar="BYTES")
    parser.add_argument(
        "--reuseport", action="store_true", help="share the port with other processes"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="log only the listening lines and errors"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop, as the forwarder does"
    )
    args = parser.parse_args(argv)
    listen = []
    for text in args.listen or [":3128"]:
        try:
            listen.append(listen_address(text))
        except ValueError as exc:
            parser.error(f"--listen: {exc}")
    options = Options(
        allow=tuple(args.allow),
        dial_timeout=args.dial_timeout,
        reply_status=args.reply_status,
        mode=args.mode,
        greedy=args.greedy,
        delay=args.delay,
        size=args.size,
        fault=args.fault,
        after=args.after,
        reuseport=args.reuseport,
        listen=tuple(listen),
    )
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s connect-proxy %(message)s"
    )
    if args.quiet:
        log.setLevel(logging.WARNING)
        listening_log.setLevel(logging.INFO)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(options))
    except OSError as exc:
        print(f"connect_proxy: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
