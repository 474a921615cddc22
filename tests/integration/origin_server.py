"""Origin servers for the integration tests, run as a process inside the lab's origin namespace.

Each kind listens on ``[::]:PORT`` (dual-stack, so one process serves IPv4 and IPv6) and prints
``ready PORT`` on stdout once it accepts connections; access lines go to stderr.

- ``http``: serves the files of ``--root`` (``GET /body.bin`` returns the test's random body).
- ``https``: the same behind TLS with ``--cert``/``--key``.
- ``banner``: speaks first (``220 origin.test banner``), then answers ``QUIT`` with ``221 bye``,
  like SMTP, FTP or SSH servers do. A forwarder that waits for client bytes never sees it.
- ``echo``: reads until the client half-closes, then answers ``got N sha256=HEX`` and closes, so
  the answer can only arrive if the half-close was passed on while the other direction stayed
  open.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import socket
import socketserver
import ssl
import sys

BANNER = b"220 origin.test banner\r\n"


class DualStackHTTPServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"origin {self.address_string()} {format % args}\n")
        sys.stderr.flush()


class StreamHandler(socketserver.BaseRequestHandler):
    kind = "banner"

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        peer = self.client_address[0]
        with contextlib.suppress(OSError):
            self._serve(sock, peer)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        if self.kind == "banner":
            sock.sendall(BANNER)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.strip() == b"QUIT":
                sock.sendall(b"221 bye\r\n")
            sys.stderr.write(f"origin {peer} banner sent, client said {data.strip()!r}\n")
        else:
            digest = hashlib.sha256()
            total = 0
            while chunk := sock.recv(65536):
                digest.update(chunk)
                total += len(chunk)
            sock.sendall(f"got {total} sha256={digest.hexdigest()}\n".encode())
            sys.stderr.write(f"origin {peer} echo after half-close: {total} bytes\n")
        sys.stderr.flush()

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the client may be gone already
            self.request.shutdown(socket.SHUT_WR)


class DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["http", "https", "banner", "echo"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=".")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    server: socketserver.BaseServer
    if args.kind in ("http", "https"):
        DualStackHTTPServer.allow_reuse_address = True
        handler = functools.partial(Quiet, directory=args.root)
        server = DualStackHTTPServer(("::", args.port), handler)
        if args.kind == "https":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args.cert, args.key)
            # the handshake happens on the first read, in the handler's thread, so a client
            # that never speaks TLS cannot stall the accept loop
            server.socket = ctx.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
    else:
        handler_cls = type("Handler", (StreamHandler,), {"kind": args.kind})
        server = DualStackTCPServer(("::", args.port), handler_cls)
    print(f"ready {args.port}", flush=True)
    server.serve_forever()  # until the test's SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
