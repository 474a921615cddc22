"""When the forwarder must not or cannot tunnel: it refuses connections that were not redirected
or that would loop back into the upstream, and when the upstream is down, says 403 or never
answers, the client gets a prompt reset instead of an empty success."""

from __future__ import annotations

import re

import pytest
from kit.client import Client, host_of
from kit.fixtures import each_family
from kit.forwarder import DOWN_UPSTREAM

from handyproxy.lab.netns import PROXY_PORT

pytestmark = pytest.mark.integration

REQUEST = b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n"
PROMPT = 2.0  # seconds: far below every dial timeout used here; slack for a loaded CI host


def test_direct_connection_to_listener_is_refused(
    family, client: Client, start_upstream, start_handyproxy
):
    """The client dials the router's own address: not redirected, so no tunnel is opened."""
    upstream = start_upstream("builtin")
    forwarder = start_handyproxy()

    client.expect_refused(family, forwarder.port, "router", REQUEST)

    record = forwarder.access(f"client={host_of(family, 'client')}:", "end=refused ")
    assert "reason=not-redirected" in record
    assert not upstream.log.matching("CONNECT"), "a refused connection reached the upstream"


def test_connection_to_the_upstream_itself_is_refused_as_a_loop(
    family, client: Client, start_upstream, start_handyproxy
):
    """The client dials the upstream proxy's address; REDIRECT sends it to the forwarder, which
    must not CONNECT the proxy to itself."""
    upstream = start_upstream("builtin")
    forwarder = start_handyproxy(upstream_proxy=f"{host_of(family, 'upstream')}:{PROXY_PORT}")

    client.expect_refused(family, PROXY_PORT, "upstream", REQUEST)

    record = forwarder.access("end=refused ")
    assert "reason=loop" in record
    assert not upstream.log.matching("CONNECT")


def test_upstream_down_resets_client_promptly(family, client: Client, start_handyproxy):
    """Nothing listens on the upstream port: the dial fails at once, and so must the client."""
    forwarder = start_handyproxy(dial_timeout="5s", upstream_proxy=DOWN_UPSTREAM)

    elapsed = client.expect_reset(family, 80, REQUEST)

    assert elapsed < PROMPT
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert "status=- " in record
    assert "end=connect-failed" in record


@each_family
@pytest.mark.parametrize("proxy", ["squid", "tinyproxy", "builtin"])
def test_upstream_403_resets_client_promptly(
    proxy, family, client: Client, start_upstream, start_handyproxy
):
    upstream = start_upstream(proxy, deny_all=True)
    forwarder = start_handyproxy(dial_timeout="5s")

    elapsed = client.expect_reset(family, 80, REQUEST)

    assert elapsed < PROMPT
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert "status=403 " in record
    assert "end=connect-failed" in record
    upstream.log.wait_for(r"403|DENIED|refused")  # the upstream did say no


def test_upstream_that_never_answers_resets_client_after_dial_timeout(
    family, client: Client, start_upstream, start_handyproxy
):
    upstream = start_upstream("builtin", mode="stall")
    forwarder = start_handyproxy(dial_timeout="700ms")

    elapsed = client.expect_reset(family, 80, REQUEST)

    assert 0.5 <= elapsed < 0.7 + PROMPT
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert "status=- " in record
    assert "end=connect-failed" in record
    upstream.log.wait_for(rf"CONNECT {re.escape(host_of(family))}:80 ")
