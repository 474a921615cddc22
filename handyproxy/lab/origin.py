"""The lab's origin servers: what a tunnel finally reaches, in the origin namespace.

One process per kind, each on ``[::]:PORT`` (dual-stack, so it serves IPv4 and IPv6), logging
``listening on [::]:PORT`` once it accepts connections and one line per request on stderr:

- ``http``: the files of ``--root`` (HTTP/1.1, keep-alive, Content-Length), and generated
  downloads: ``GET /dl?size=N&seed=S&rate=R&reset=K`` answers 200 without a Content-Length
  (close-delimited, so only the TCP ending tells a complete body from a truncated one) and then
  ``payload(S, N)``, at R bytes/s when given; with ``reset=K`` it sends K bytes and then a RST.
  Each download also logs ``download end ... sent=N end=eof|reset|fault``.
- ``https``: the same behind TLS (``--cert``, ``--key``). When the client is done it closes
  without a close_notify of its own: a client that closed right after sending its own (curl
  does) would only answer those bytes with a reset.
- ``banner``: speaks first (``220 origin.test banner``), answers ``QUIT`` with ``221 bye``, then
  closes, as SMTP, FTP and SSH servers do: a forwarder that waits for client bytes never sees it.
- ``echo``: logs ``echo ... receiving`` at the first bytes, reads until the client half-closes,
  then answers ``got N sha256=HEX`` and closes: the answer can only arrive if the half-close was
  passed on while the other direction stayed open.

    python -m handyproxy.lab.origin http --port 80 --root /srv/www

One thread per connection; standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import mimetypes
import random
import socket
import socketserver
import ssl
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from handyproxy.address import authority, unmap
from handyproxy.sockets import reset_socket

log = logging.getLogger("handyproxy.lab.origin")
listening_log = logging.getLogger("handyproxy.lab.origin.listening")

KINDS = ("http", "https", "banner", "echo")
BANNER = b"220 origin.test banner\r\n"
CHUNK = 64 * 1024
MAX_HEAD = 16 * 1024
BACKLOG = 4096
#: How long a keep-alive connection or a silent client is kept before it is closed.
IDLE = 30.0


def payload(seed: int, size: int) -> bytes:
    """The body of ``/dl?size=&seed=``; a test computes the same bytes to compare."""
    return random.Random(seed).randbytes(size)


class Reader:
    """Buffered reads from a socket: a request head, a line, or whatever comes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def until(self, marker: bytes, limit: int = MAX_HEAD) -> bytes | None:
        """Bytes up to and including ``marker``; None at EOF (or past ``limit``) before it."""
        while marker not in self.buffer:
            if len(self.buffer) > limit:
                return None
            chunk = self.sock.recv(CHUNK)
            if not chunk:
                return None
            self.buffer += chunk
        end = self.buffer.index(marker) + len(marker)
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def chunks(self) -> Iterator[bytes]:
        """What is buffered, then every read until EOF."""
        if self.buffer:
            yield self.buffer
            self.buffer = b""
        while chunk := self.sock.recv(CHUNK):
            yield chunk


class Handler(socketserver.BaseRequestHandler):
    """One connection, served as ``server.kind`` says."""

    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(IDLE)
        self.client = unmap(self.client_address[0])
        self.reset = False
        with contextlib.suppress(OSError):
            if self.server.tls is not None:
                sock = self.server.tls.wrap_socket(sock, server_side=True)  # takes the descriptor
            self.sock = sock
            {"banner": self.banner, "echo": self.echo}.get(self.server.kind, self.http)(
                Reader(sock)
            )
        if self.reset:
            reset_socket(sock)  # and close it here: the server would shutdown() first, a FIN
            sock.close()
        elif sock is not self.request:
            sock.close()  # the TLS socket, without a close_notify; the server's is detached

    def banner(self, reader: Reader) -> None:
        self.sock.sendall(BANNER)
        line = (reader.until(b"\n") or b"").strip()
        if line == b"QUIT":
            self.sock.sendall(b"221 bye\r\n")
        log.info("%s banner sent, client said %r", self.client, line)

    def echo(self, reader: Reader) -> None:
        digest = hashlib.sha256()
        total = 0
        for chunk in reader.chunks():
            if not total:
                log.info("%s echo receiving", self.client)
            digest.update(chunk)
            total += len(chunk)
        self.sock.sendall(f"got {total} sha256={digest.hexdigest()}\n".encode())
        log.info("%s echo after half-close: %d bytes", self.client, total)

    def http(self, reader: Reader) -> None:
        """Requests on one connection until the client closes or asks to."""
        while (head := reader.until(b"\r\n\r\n")) is not None:
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3:
                self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            method, target, version = parts
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            url = urlsplit(target)
            if url.path == "/dl" and method == "GET":
                self.download(lines[0], target, url.query)
                return
            status, body, kind = self.file(url.path)
            log.info('%s "%s" %d %d', self.client, lines[0], status, len(body))
            head_lines = [
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}",
                f"Content-Type: {kind}",
                f"Content-Length: {len(body)}",
            ]
            if not keep_alive:
                head_lines.append("Connection: close")
            self.sock.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode())
            if method != "HEAD":
                self.sock.sendall(body)
            if not keep_alive:
                return

    def file(self, path: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for a path under the root; 404 outside it."""
        root = self.server.root
        full = (root / (unquote(path).lstrip("/") or "index.html")).resolve()
        if root not in full.parents or not full.is_file():
            return 404, b"not found\n", "text/plain"
        kind = mimetypes.guess_type(full.name)[0] or "application/octet-stream"
        return 200, full.read_bytes(), kind

    def download(self, request: str, target: str, query: str) -> None:
        """A close-delimited body: only a FIN after the last byte means it is complete."""
        try:
            q = {k: int(v[0]) for k, v in parse_qs(query).items()}
        except ValueError:
            q = {}
        size, rate, reset_at = q.get("size", 0), q.get("rate", 0), q.get("reset", -1)
        body = payload(q.get("seed", 0), size)
        log.info('%s "%s" 200 -', self.client, request)
        self.sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        step = max(1, min(CHUNK, rate // 20)) if rate else CHUNK
        sent = 0
        how = "eof"
        try:
            while sent < size:
                if 0 <= reset_at <= sent:
                    self.reset = True
                    how = "fault"
                    return
                end = min(size, sent + step, reset_at if reset_at > sent else size)
                self.sock.sendall(body[sent:end])
                sent = end
                if rate:
                    time.sleep(step / rate)  # the download's pace
        except (ConnectionResetError, BrokenPipeError):
            how = "reset"
        finally:
            log.info(
                "download end client=%s target=%s sent=%d end=%s", self.client, target, sent, how
            )


class Server(socketserver.ThreadingTCPServer):
    """One listener on ``[::]:port`` for both families, like the forwarder's own."""

    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, kind: str, port: int, root: Path, tls: ssl.SSLContext | None) -> None:
        self.kind = kind
        self.root = root.resolve()
        self.tls = tls
        super().__init__(("::", port), Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m handyproxy.lab.origin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, default=Path("."), help="what http(s) serves")
    parser.add_argument("--cert", help="https: certificate chain (PEM)")
    parser.add_argument("--key", help="https: private key (PEM)")
    parser.add_argument("--quiet", action="store_true", help="log only the listening line")
    args = parser.parse_args(argv)
    tls = None
    if args.kind == "https":
        if not (args.cert and args.key):
            parser.error("https needs --cert and --key")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s origin %(message)s"
    )
    if args.quiet:
        log.setLevel(logging.WARNING)
        listening_log.setLevel(logging.INFO)
    try:
        server = Server(args.kind, args.port, args.root, tls)
    except OSError as exc:
        print(f"origin: {exc}", file=sys.stderr)
        return 3
    host, port = server.socket.getsockname()[:2]
    listening_log.info("listening on %s", authority(host, port))
    server.serve_forever()  # until SIGTERM: its default action ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
