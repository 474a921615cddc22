"""Regression: a sniffed "name" in a numeric form (``0x7f000001``, ``0x7f.1``, ``0xcb.0.113.2``)
is an address to the upstream's resolver. The forwarder must treat it as an IP literal and
CONNECT to the original destination's IP, never to what the client wrote, end to end (HTTP Host
and TLS SNI).
"""

from __future__ import annotations

import ssl

import pytest
from pathkit import Client, Forwarder, Upstream, recv_until

from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

NUMERIC_NAMES = ["0x7f000001", "0x7f.1", "0xcb.0.113.2"]


@pytest.fixture
def sniffing(start_origin, start_upstream, start_handyproxy) -> tuple[Forwarder, Upstream]:
    """Both origins, the built-in proxy (it logs each CONNECT target), sniffing on."""
    start_origin("http")
    start_origin("https")
    return start_handyproxy(sniff_timeout="2s"), start_upstream("builtin")


def client_hello(name: str) -> bytes:
    """The ClientHello Python's own TLS client sends for ``name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_a_numeric_host_header_falls_back_to_the_original_ip(
    name: str, client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    with client.connect(4, 80) as sock:
        sock.sendall(f"GET /index.html HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        assert b"origin index\n" in recv_until(sock, b"origin index\n")
    record = forwarder.access(f"dst={lablib.ORIGIN_V4}:80 ")
    assert f"target={lablib.ORIGIN_V4}:80 " in record
    upstream.log.wait_for(rf"CONNECT {lablib.ORIGIN_V4}:80 ")
    assert not upstream.log.matching(rf"CONNECT {name}")


def test_a_real_name_is_still_used_so_the_regression_test_can_fail(
    client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    with client.connect(4, 80) as sock:
        sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert b"origin index\n" in recv_until(sock, b"origin index\n")
    assert "target=origin.test:80 " in forwarder.access(f"dst={lablib.ORIGIN_V4}:80 ")
    upstream.log.wait_for(r"CONNECT origin.test:80 ")


@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_a_numeric_sni_falls_back_to_the_original_ip(
    name: str, client: Client, sniffing: tuple[Forwarder, Upstream]
):
    forwarder, upstream = sniffing
    hello = client_hello(name)
    assert name.encode() in hello  # the SNI really carries the numeric form
    with client.connect(4, 443) as sock:
        sock.sendall(hello)
        sock.settimeout(5)
        assert sock.recv(5)[:1] == b"\x16"  # the origin's ServerHello came through the tunnel
    record = forwarder.access(f"dst={lablib.ORIGIN_V4}:443 ")
    assert f"target={lablib.ORIGIN_V4}:443 " in record
    upstream.log.wait_for(rf"CONNECT {lablib.ORIGIN_V4}:443 ")
