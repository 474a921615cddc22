#!/usr/bin/python3
"""Origin web server for the Molecule scenarios: HTTP on 80 and HTTPS on 443, IPv4 and IPv6.

The scenarios need an origin whose answers can be compared byte for byte and which says who
connected to it (to prove the traffic came from the upstream proxy, not straight from the client).
It uses only the standard library because the containers have no package index.

Paths: ``/blob`` is ``/srv/origin/blob.bin``; ``/whoami`` is the peer address as the origin saw it;
anything else is a short greeting.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BLOB = Path("/srv/origin/blob.bin")
CERT = Path("/srv/origin/cert.pem")
KEY = Path("/srv/origin/key.pem")


class DualStackServer(ThreadingHTTPServer):
    """One listener on ``::`` for both families, like the forwarder's own."""

    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Handler(BaseHTTPRequestHandler):
    """Serves the blob, the peer address and a greeting."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/blob":
            body = BLOB.read_bytes()
        elif self.path == "/whoami":
            body = f"{self.client_address[0]}\n".encode()
        else:
            body = f"origin {socket.gethostname()} scheme={self.server.scheme}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.server.scheme} {self.client_address[0]} {format % args}\n")
        sys.stderr.flush()


def serve(port: int, scheme: str) -> threading.Thread:
    """Start one listener in a thread; HTTPS wraps the listening socket in TLS."""
    server = DualStackServer(("::", port), Handler)
    server.scheme = scheme  # type: ignore[attr-defined]
    if scheme == "https":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(CERT, KEY)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name=scheme, daemon=True)
    thread.start()
    return thread


def main() -> None:
    threads = [serve(80, "http"), serve(443, "https")]
    sys.stderr.write("origin listening on [::]:80 and [::]:443\n")
    sys.stderr.flush()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
