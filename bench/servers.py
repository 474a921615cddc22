"""Origin-side servers for the benchmark, run inside the origin namespace.

Two tiny uvloop servers so the origin costs the same for every forwarder and stays cheap:

* ``echo``: returns every byte it receives (latency probes, idle tunnels).
* ``http``: answers each request with a fixed 200 and closes, so ``wrk -H 'Connection: close'``
  opens one tunnel per request (tunnels per second); with ``--cert``/``--key`` over TLS (the
  TLS figure, whose ClientHello a sniffing forwarder reads).

Several processes share a port with SO_REUSEPORT (``--procs``) so the origin is not the limit.
Usage: ``python -m bench.servers echo|http --host H --port P [--procs N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import ssl
import sys

import uvloop

HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
    b"Connection: close\r\n\r\nok"
)


def raise_nofile(limit: int = 262144) -> None:
    """Lift RLIMIT_NOFILE so 20,000 tunnels fit; root may raise the hard limit up to nr_open."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Echo(asyncio.Protocol):
    """Echo each chunk straight back; no buffering beyond the transport's own."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False


class Http(asyncio.Protocol):
    """Answer the first complete request header with a fixed 200, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.transport.write(HTTP_RESPONSE)  # type: ignore[attr-defined]
            self.transport.close()

    def eof_received(self) -> bool:
        return False


def make_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(65535)
    sock.setblocking(False)
    return sock


def serve(kind: str, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    raise_nofile()
    proto = Echo if kind == "echo" else Http
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = make_socket(host, port)
    server = loop.run_until_complete(loop.create_server(proto, sock=sock, backlog=65535, ssl=tls))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["echo", "http"])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--cert", help="serve TLS with this certificate (and --key)")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    tls = None
    if args.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    children: list[int] = []
    for _ in range(args.procs - 1):
        pid = os.fork()
        if pid == 0:
            serve(args.kind, args.host, args.port, tls)
            os._exit(0)
        children.append(pid)

    def stop_children(*_: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    try:
        serve(args.kind, args.host, args.port, tls)
    finally:
        stop_children()
        for pid in children:
            os.waitpid(pid, 0)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
