"""REDIRECT in the OUTPUT chain: programs on the forwarder's own host are tunnelled too, while
the forwarder's own connection to the upstream is exempt (``meta skuid``), so it cannot loop."""

from __future__ import annotations

import hashlib

import pytest
from kit.client import host_of
from kit.origins import Body

from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
ORIGIN_NET = {4: ("198.18.0.0/24", lablib.UPSTREAM_V4), 6: ("2001:db8:18::/64", lablib.UPSTREAM_V6)}


@pytest.fixture
def router_route_to_origin(lab: lablib.Lab, family: int):
    """A local program needs a route before its connect() reaches OUTPUT. The route points at
    the upstream host, which does not forward, so without the tunnel nothing gets through."""
    net, via = ORIGIN_NET[family]
    lab.run("router", ["ip", f"-{family}", "route", "add", net, "via", via], check=True)
    yield
    lab.run("router", ["ip", f"-{family}", "route", "del", net, "via", via], check=True)


def test_output_chain_redirect_on_the_host_itself_works(
    family, lab: lablib.Lab, body: Body, router_route_to_origin, start_origin,
    start_upstream, start_handyproxy,
):  # fmt: skip
    start_origin("http")
    start_upstream("squid")
    url = f"http://{host_of(family)}/body.bin"
    curl = [*NOBODY, "curl", "-sS", f"-{family}", "--max-time", "10", url]  # body on stdout

    # the control: without the rule the origin is unreachable from the router
    control = lab.run("router", [*curl[:-1], "--connect-timeout", "1", url], capture_output=True)
    assert control.returncode != 0

    # the forwarder runs as root; root's sockets skip the rule, everyone else's are redirected
    forwarder = start_handyproxy(redirect="output", skip_uid=0)
    result = lab.run("router", curl, capture_output=True, timeout=20)

    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == body.sha256
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert "status=200 " in record
    assert "end=eof" in record
