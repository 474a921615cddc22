"""Regression: a sniffed "name" in a numeric form (``0x7f000001``, ``0x7f.1``, ``0xcb.0.113.2``)
is an address to the upstream's resolver. The forwarder must treat it as an IP literal and
CONNECT to the original destination's IP, never to what the client wrote, end to end (HTTP Host
and TLS SNI).
"""

from __future__ import annotations

import pytest
from kit.client import Client
from kit.forwarder import Forwarder
from kit.origins import INDEX, ORIGIN_NAME
from kit.upstreams import Upstream
from kit.wire import recv_until, tls_client_hello

from handyproxy.lab.netns import ORIGIN_V4

pytestmark = pytest.mark.integration

NUMERIC_NAMES = ["0x7f000001", "0x7f.1", "0xcb.0.113.2"]


@pytest.fixture
def sniffing(start_origin, start_upstream, start_handyproxy) -> tuple[Forwarder, Upstream]:
    """Both origins, the built-in proxy (it logs each CONNECT target), sniffing on."""
    start_origin("http")
    start_origin("https")
    upstream = start_upstream("builtin")
    return start_handyproxy(sniff_timeout="2s"), upstream


@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_a_numeric_host_header_falls_back_to_the_original_ip(
    name: str, client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    with client.connect(4, 80) as sock:
        sock.sendall(f"GET /index.html HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        assert INDEX.encode() in recv_until(sock, INDEX.encode())
    record = forwarder.access(f"dst={ORIGIN_V4}:80 ")
    assert f"target={ORIGIN_V4}:80 " in record
    upstream.log.wait_for(rf"CONNECT {ORIGIN_V4}:80 ")
    assert not upstream.log.matching(rf"CONNECT {name}")


def test_a_real_name_is_still_used_so_the_regression_test_can_fail(
    client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    with client.connect(4, 80) as sock:
        sock.sendall(f"GET /index.html HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\n\r\n".encode())
        assert INDEX.encode() in recv_until(sock, INDEX.encode())
    assert f"target={ORIGIN_NAME}:80 " in forwarder.access(f"dst={ORIGIN_V4}:80 ")
    upstream.log.wait_for(rf"CONNECT {ORIGIN_NAME}:80 ")


@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_a_numeric_sni_falls_back_to_the_original_ip(
    name: str, client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    hello = tls_client_hello(name)
    assert name.encode() in hello  # the SNI really carries the numeric form
    with client.connect(4, 443) as sock:
        sock.sendall(hello)
        sock.settimeout(5)
        assert sock.recv(5)[:1] == b"\x16"  # the origin's ServerHello came through the tunnel
    record = forwarder.access(f"dst={ORIGIN_V4}:443 ")
    assert f"target={ORIGIN_V4}:443 " in record
    upstream.log.wait_for(rf"CONNECT {ORIGIN_V4}:443 ")
