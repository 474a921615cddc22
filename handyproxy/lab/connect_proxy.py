"""A tiny HTTP CONNECT proxy, so the demo and the tests have an upstream without installing one.

It does only what a forwarder needs from its upstream: ``CONNECT host:port`` → dial →
``HTTP/1.1 200 Connection established`` → relay both ways, passing a half-close on. Any other
method gets 405, a failed dial 502 (504 on a dial timeout), a target outside the allow-list 403.
Each CONNECT is logged on stderr. A few switches make it misbehave on purpose for fault tests:
``--reply-status`` answers every CONNECT with that status, ``--no-reply`` never answers, and
``--greedy`` holds the 200 back until the origin's first bytes arrive and sends both in one write
(the "banner in the same read as the reply" case).

    python -m handyproxy.lab.connect_proxy --listen 203.0.113.2:3128 \
        --listen '[2001:db8:113::2]:3128'

Standard library only; it is not built for speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger("handyproxy.lab.connect_proxy")

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
BUFFER = 64 * 1024
GREEDY_WAIT = 0.5
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
    no_reply: bool = False
    greedy: bool = False
    listen: tuple[tuple[str | None, int], ...] = field(default=((None, 3128),))


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` (an empty host is allowed); ValueError otherwise."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"not host:port: {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"not host:port: {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


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


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername") or ("?", 0)
    host = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
    return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: list[int]) -> None:
    """Copy until EOF, then half-close ``dst``; a reset aborts ``dst`` too."""
    try:
        while data := await src.read(BUFFER):
            dst.write(data)
            count[0] += len(data)
            await dst.drain()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.transport.abort()
        raise


class ConnectProxy:
    """One listening proxy; ``handle`` serves one client connection."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.active: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """End every open connection and wait until their sockets are closed."""
        for task in list(self.active):
            task.cancel()
        await asyncio.gather(*self.active, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _peer(writer)
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)  # type: ignore[arg-type]
        try:
            await self._handle(client, reader, writer)
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(
        self, client: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        opts = self.options
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_reply(400))
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            log.info("bad request %r client=%s status=400", request_line, client)
            writer.write(_reply(400))
            return
        method, target, _version = parts
        if method != "CONNECT":
            log.info("%s %s client=%s status=405", method, target, client)
            writer.write(_reply(405))
            return
        try:
            host, port = parse_hostport(target)
        except ValueError:
            log.info("CONNECT %s client=%s status=400", target, client)
            writer.write(_reply(400))
            return
        if opts.no_reply:
            log.info("CONNECT %s client=%s status=- (never answering)", target, client)
            await reader.read()  # hold the line open until the client gives up
            return
        if opts.reply_status is not None:
            log.info("CONNECT %s client=%s status=%d", target, client, opts.reply_status)
            writer.write(_reply(opts.reply_status))
            await writer.drain()
            return
        if not allowed(host, port, opts.allow):
            log.info("CONNECT %s client=%s status=403 (not in the allow-list)", target, client)
            writer.write(_reply(403))
            return
        start = time.monotonic()
        try:
            o_reader, o_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=BUFFER), opts.dial_timeout
            )
        except (TimeoutError, OSError) as exc:
            status = 504 if isinstance(exc, TimeoutError) else 502
            log.info(
                "CONNECT %s client=%s status=%d (%s)",
                target,
                client,
                status,
                exc.__class__.__name__ if status == 504 else exc,
            )
            writer.write(_reply(status))
            return
        first = b""
        if opts.greedy:
            with contextlib.suppress(asyncio.TimeoutError):
                first = await asyncio.wait_for(o_reader.read(BUFFER), GREEDY_WAIT)
        log.info("CONNECT %s client=%s status=200", target, client)
        writer.write(_reply(200) + first)
        up, down = [0], [len(first)]
        try:
            await asyncio.gather(_pump(reader, o_writer, up), _pump(o_reader, writer, down))
        finally:
            o_writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await o_writer.wait_closed()
            log.info(
                "tunnel end %s client=%s up=%d down=%d duration=%.3fs",
                target,
                client,
                up[0],
                down[0],
                time.monotonic() - start,
            )


async def serve(options: Options) -> None:
    """Listen on every ``options.listen`` address until SIGTERM/SIGINT."""
    proxy = ConnectProxy(options)
    servers = []
    for host, port in options.listen:
        server = await asyncio.start_server(
            proxy.handle, host, port, limit=MAX_HEAD, reuse_address=True
        )
        servers.append(server)
        for sock in server.sockets:
            name = sock.getsockname()
            shown = f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"
            log.info("listening on %s", shown)
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
        "--reply-status",
        type=int,
        metavar="CODE",
        help="answer every CONNECT with this status and close (fault tests)",
    )
    parser.add_argument(
        "--no-reply", action="store_true", help="read the CONNECT and never answer (fault tests)"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="send the 200 together with the origin's first bytes"
    )
    args = parser.parse_args(argv)
    listen = []
    for text in args.listen or [":3128"]:
        try:
            host, port = parse_hostport(text)
        except ValueError as exc:
            parser.error(f"--listen: {exc}")
        listen.append((host or None, port))
    options = Options(
        allow=tuple(args.allow),
        dial_timeout=args.dial_timeout,
        reply_status=args.reply_status,
        no_reply=args.no_reply,
        greedy=args.greedy,
        listen=tuple(listen),
    )
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s connect-proxy %(message)s"
    )
    try:
        asyncio.run(serve(options))
    except OSError as exc:
        print(f"connect_proxy: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
