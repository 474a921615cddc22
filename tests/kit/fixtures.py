"""The kit's pytest fixtures (``tests/conftest.py`` loads this module as a plugin).

- ``lab``: the namespace lab, one for the whole session; a test marked ``fresh_lab`` (one that
  changes the lab: takes a link down, changes sysctls) gets one of its own instead, and every
  other fixture below then works in that lab.
- ``start_handyproxy(*argv, **flags)``: a forwarder in the router namespace with the REDIRECT
  pointing at it; everything started is stopped after the test, newest first, and its log is
  printed (pytest shows it when the test fails). ``start_forwarder`` is the same factory.
- ``start_upstream(kind, **options)``: squid, tinyproxy or the lab's scriptable CONNECT proxy
  (``builtin``) on port 3128 of the upstream namespace; ``upstream_listener``: that port as a
  bare socket, for a test that plays the upstream itself.
- ``start_origin(kind)``: ``http``, ``https``, ``banner`` or ``echo`` in the origin namespace.
- ``client``: curl and sockets in the client namespace; ``family`` (4, 6) and ``relay`` (each
  name in ``handyproxy.relay.RELAYS``) parametrize a test.

The tests need root, iproute2, nftables, squid, tinyproxy, curl, openssl, procps and
util-linux. CI runs as root with all of them installed, so a missing piece fails the run
instead of skipping it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from handyproxy import relay as relays
from handyproxy.lab import netns
from kit import forwarder, upstreams
from kit.client import Client
from kit.forwarder import Forwarder
from kit.origins import ORIGIN_NAME, Body, Origin, Origins, make_body, make_tls_cert
from kit.upstreams import Slot, Upstream

TOOLS = {
    "ip": "iproute2",
    "ss": "iproute2",
    "nft": "nftables",
    "squid": "squid",
    "tinyproxy": "tinyproxy",
    "curl": "curl",
    "openssl": "openssl",
    "pgrep": "procps",
    "prlimit": "util-linux",
    "setpriv": "util-linux",
}

#: Parametrize ``family`` explicitly, as the decorator nearest the top, so it varies fastest and
#: consecutive tests share an upstream configuration (see ``kit.upstreams.Slot``).
each_family = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fresh_lab: the test changes the lab, so it gets a lab of its own"
    )


def missing_tools() -> list[str]:
    missing = netns.missing_requirements()
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None and tool not in ("ip", "nft"):
            missing.append(f"the {tool!r} command (Debian package {package})")
    return missing


@dataclass
class Site:
    """One lab and what is kept running in it between tests (the upstream, the origins)."""

    lab: netns.Lab
    upstreams: Slot
    origins: Origins

    def close(self) -> None:
        self.upstreams.vacate()
        self.origins.stop()
        self.lab.close()


@contextlib.contextmanager
def open_site(body: Body, tls_cert: tuple[Path, Path]) -> Iterator[Site]:
    """A new lab in which ``origin.test`` resolves for the client and the upstream."""
    missing = missing_tools()
    if missing:
        pytest.fail("the lab tests need " + "; ".join(missing), pytrace=False)
    lab = netns.Lab()
    with lab:
        names = {ORIGIN_NAME: [netns.ORIGIN_V4, netns.ORIGIN_V6]}
        lab.hosts("client", names)
        lab.hosts("upstream", names)
        site = Site(lab, Slot(lab), Origins(lab, body, tls_cert))
        try:
            yield site
        finally:
            site.close()


@pytest.fixture(scope="session")
def body(tmp_path_factory: pytest.TempPathFactory) -> Body:
    return make_body(tmp_path_factory.mktemp("www"))


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for origin.test and both origin addresses: (cert, key)."""
    return make_tls_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def _session_site(body: Body, tls_cert: tuple[Path, Path]) -> Iterator[Site]:
    netns.cleanup_stale()  # labs of runs that died (it would take this process's own, too)
    with open_site(body, tls_cert) as site:
        yield site


@pytest.fixture
def _site(
    request: pytest.FixtureRequest, body: Body, tls_cert: tuple[Path, Path]
) -> Iterator[Site]:
    if request.node.get_closest_marker("fresh_lab"):
        with open_site(body, tls_cert) as site:
            yield site
    else:
        yield request.getfixturevalue("_session_site")


@pytest.fixture
def lab(_site: Site) -> netns.Lab:
    """The namespace lab (``handyproxy.lab.netns.Lab``): shared, or fresh with ``fresh_lab``."""
    return _site.lab


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    """The IP version the client uses to reach the origin."""
    return int(request.param)


@pytest.fixture(params=[pytest.param(name, id=name) for name in relays.RELAYS])
def relay(request: pytest.FixtureRequest) -> str:
    """Each relay by its ``-relay`` name; one that cannot run here fails rather than letting
    the forwarder fall back and pass as the other."""
    name = str(request.param)
    why = relays.load(name).unavailable()
    if why:
        pytest.fail(f"the {name} relay cannot run on this machine: {why}", pytrace=False)
    return name


@pytest.fixture
def start_handyproxy(lab: netns.Lab) -> Iterator[Callable[..., Forwarder]]:
    """Factory: ``start_handyproxy("-relay", "copy", idle_timeout="2s")``.

    Flags come as argv strings or as keywords (``dial_timeout="1s"`` → ``-dial-timeout 1s``).
    ``redirect`` picks the chain (``prerouting``, ``output``; None or False: no rule), and
    ``family`` and ``skip_uid`` go to ``Lab.redirect``; ``port``, ``nofile``, ``env`` and ``cwd`` to
    ``kit.forwarder.launch``.
    """
    started: list[Forwarder] = []

    def start(
        *argv: str,
        redirect: str | bool | None = "prerouting",
        family: str = "both",
        skip_uid: int | None = None,
        **options: Any,
    ) -> Forwarder:
        fwd = forwarder.launch(lab, *argv, **options)
        started.append(fwd)
        chain = "prerouting" if redirect is True else redirect or None
        if chain:
            lab.redirect(fwd.port, chain=chain, family=family, skip_uid=skip_uid)
        return fwd

    yield start
    with contextlib.suppress(netns.LabError):
        lab.unredirect()
    for fwd in reversed(started):
        lab.stop(fwd.proc)
        # pytest shows a test's captured output only when it fails: then this log explains why
        print(f"--- handyproxy log ({' '.join(fwd.argv[3:])}):\n{fwd.log.text()}")


@pytest.fixture
def start_forwarder(start_handyproxy: Callable[..., Forwarder]) -> Callable[..., Forwarder]:
    """``start_handyproxy`` under the name the reliability tests used."""
    return start_handyproxy


@pytest.fixture
def start_upstream(_site: Site) -> Iterator[Callable[..., Upstream]]:
    """Factory: an upstream proxy in the upstream namespace (IPv4 and IPv6), on port 3128 or
    ``port``.

    ``kind``: ``squid`` or ``tinyproxy`` (Debian's, with a temporary config, no daemon mode), or
    ``builtin`` (``handyproxy.lab.connect_proxy``: every other keyword is one of its flags,
    e.g. ``mode="echo"``, ``fault="reset", after=3000``, ``greedy=True``,
    ``reply_status=407``). ``allow_domains`` admits only those names (never an IP), ``deny_all``
    answers 403, ``users={"name": "password"}`` makes squid ask for Basic credentials;
    ``nofile`` and ``processes`` go to ``kit.upstreams.launch``. On 3128 an upstream is kept
    for the next test that asks for the same; on another port (several upstreams at once, for
    failover) it is the test's own and is stopped after it, newest first.

    A test that needs "no upstream" points the forwarder at ``kit.forwarder.DOWN_UPSTREAM``.
    """
    handed_out: list[Upstream] = []
    own: list[Upstream] = []

    def start(kind: str = "squid", *, port: int = netns.PROXY_PORT, **options: Any) -> Upstream:
        if port == netns.PROXY_PORT:
            upstream = _site.upstreams.start(kind, **options)
        else:
            upstream = upstreams.launch(_site.lab, kind, port=port, **options)
            own.append(upstream)
        handed_out.append(upstream)
        return upstream

    yield start
    for upstream in reversed(own):
        upstream.stop(_site.lab)
    for upstream in handed_out:
        print(
            f"--- {upstream.kind} on {upstream.port}, log during this test:\n{upstream.log.text()}"
        )
    _site.upstreams.end_of_test()


@pytest.fixture
def upstream_listener(_site: Site) -> Iterator[socket.socket]:
    """The upstream's port as a listening socket the test accepts on (it plays the proxy)."""
    _site.upstreams.vacate()
    sock = _site.lab.socket("upstream")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((netns.UPSTREAM_V4, netns.PROXY_PORT))
        sock.listen(16)
        sock.settimeout(10)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def start_origin(_site: Site) -> Callable[[str], Origin]:
    """Factory: ``start_origin("echo")``, the origin of that kind on its port (kept running)."""
    return _site.origins.start


@pytest.fixture
def client(lab: netns.Lab, tmp_path: Path) -> Client:
    return Client(lab, tmp_path)
