"""The origin servers in the lab's origin namespace (``handyproxy.lab.origin``), the body they
serve and the certificate the HTTPS one presents.

Origins keep no state between connections, so each kind is started once per lab, on its fixed
port, and kept; every test gets a view of its log that starts empty.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from handyproxy.lab.netns import ORIGIN_V4, ORIGIN_V6, UPSTREAM_ORIGIN_V4, UPSTREAM_ORIGIN_V6, Lab
from handyproxy.lab.output import Output
from kit.forwarder import PYTHON

ORIGIN = [PYTHON, "-m", "handyproxy.lab.origin"]
#: The name the client and the upstream resolve to the origin (their hosts files).
ORIGIN_NAME = "origin.test"
ORIGIN_PORTS = {"http": 80, "https": 443, "banner": 25, "echo": 7}
#: What the HTTP(S) origins serve as ``/index.html``.
INDEX = "origin index\n"
BODY_SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of any buffer size
#: The address the origin sees connections from (the upstream's side of their link).
SEEN_BY_ORIGIN = {4: UPSTREAM_ORIGIN_V4, 6: UPSTREAM_ORIGIN_V6}
START_TIMEOUT = 15.0


@dataclass
class Body:
    """The random file the HTTP(S) origins serve, and what it must hash to."""

    root: Path
    path: Path
    sha256: str
    size: int = field(default=BODY_SIZE)


def make_body(root: Path) -> Body:
    """``body.bin`` (random, ``BODY_SIZE`` bytes) and ``index.html`` under ``root``."""
    data = os.urandom(BODY_SIZE)
    path = root / "body.bin"
    path.write_bytes(data)
    (root / "index.html").write_text(INDEX)
    return Body(root=root, path=path, sha256=hashlib.sha256(data).hexdigest())


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for origin.test and both origin addresses: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
         f"/CN={ORIGIN_NAME}", "-addext",
         f"subjectAltName=DNS:{ORIGIN_NAME},IP:{ORIGIN_V4},IP:{ORIGIN_V6}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Origin:
    """A running origin of one kind."""

    kind: str
    port: int
    proc: subprocess.Popen[str]
    log: Output

    def view(self) -> Origin:
        return replace(self, log=self.log.view())


def launch(
    lab: Lab,
    kind: str,
    root: Path,
    tls_cert: tuple[Path, Path] | None = None,
    *,
    quiet: bool = False,
    ns: str = "origin",
    port: int | None = None,
) -> Origin:
    """Start the origin of ``kind`` on its port, serving ``root``; returns once it listens.

    ``https`` needs ``tls_cert``; ``quiet`` keeps it from logging every request. ``ns`` and
    ``port`` put one elsewhere: a server the router reaches without any proxy (a ``direct``
    rule's destination) runs in the upstream namespace, on a port of its own.
    """
    port = ORIGIN_PORTS[kind] if port is None else port
    argv = [*ORIGIN, kind, "--port", str(port), "--root", str(root)]
    if kind == "https":
        assert tls_cert is not None, "https needs a certificate"
        argv += ["--cert", str(tls_cert[0]), "--key", str(tls_cert[1])]
    argv += ["--quiet"] if quiet else []
    proc, log = lab.spawn(ns, argv, name=f"{kind} origin")
    try:
        log.wait_for(rf"listening on \S+:{port}$", START_TIMEOUT)
    except TimeoutError:
        lab.stop(proc)
        raise
    return Origin(kind, port, proc, log)


@dataclass
class Origins:
    """The origins kept running in one lab, by kind."""

    lab: Lab
    body: Body
    tls_cert: tuple[Path, Path]
    running: dict[str, Origin] = field(default_factory=dict)

    def start(self, kind: str) -> Origin:
        """The origin of ``kind`` (started now, or kept from a test before), log view empty."""
        origin = self.running.get(kind)
        if origin is None or origin.proc.poll() is not None:
            origin = self.running[kind] = launch(self.lab, kind, self.body.root, self.tls_cert)
        return origin.view()

    def stop(self) -> None:
        for origin in reversed(list(self.running.values())):
            self.lab.stop(origin.proc)
        self.running.clear()
