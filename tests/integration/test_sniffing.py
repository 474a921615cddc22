"""Hostname sniffing against an upstream that admits a domain name but never an IP address: the
forwarder must CONNECT to the name it read from the HTTP Host header or the TLS SNI."""

from __future__ import annotations

import os

import pytest
from kit.client import Client, host_of
from kit.fixtures import each_family
from kit.origins import ORIGIN_NAME, ORIGIN_PORTS, Body
from kit.wire import echo_exchange, recv_all, sha256_file

pytestmark = pytest.mark.integration


@each_family
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("proxy", ["squid", "tinyproxy"])
def test_sniffed_name_passes_upstream_that_admits_only_the_domain(
    scheme, proxy, family, body: Body, client: Client, start_origin, start_upstream,
    start_handyproxy,
):  # fmt: skip
    start_origin(scheme)
    start_upstream(proxy, allow_domains=[ORIGIN_NAME])
    forwarder = start_handyproxy(sniff_timeout="0")

    # the client resolves origin.test itself (its hosts file) and connects to the IP
    result, out = client.curl(f"{scheme}://{ORIGIN_NAME}/body.bin", family)

    assert result.returncode == 0, result.stderr
    assert sha256_file(out) == body.sha256
    record = forwarder.access(f"dst={host_of(family)}:{ORIGIN_PORTS[scheme]} ")
    assert f"target={ORIGIN_NAME}:{ORIGIN_PORTS[scheme]} " in record
    assert "status=200 " in record


@each_family
@pytest.mark.parametrize("proxy", ["tinyproxy", "squid"])
def test_without_sniffing_upstream_that_admits_only_the_domain_denies_the_ip(
    proxy, family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """The control for the test above: the same client and upstream, sniffing off → 403."""
    start_origin("http")
    start_upstream(proxy, allow_domains=[ORIGIN_NAME])
    forwarder = start_handyproxy()

    result, out = client.curl(f"http://{ORIGIN_NAME}/body.bin", family, timeout=5)

    assert result.returncode != 0
    assert out.stat().st_size == 0
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert f"target={host_of(family)}:80 " in record
    assert "status=403 " in record


def test_sniffing_falls_back_to_the_ip_when_the_server_speaks_first(
    family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """No client bytes arrive before the sniff timeout: the tunnel opens to the IP anyway."""
    origin = start_origin("banner")
    start_upstream("builtin")
    forwarder = start_handyproxy(sniff_timeout="300ms")

    with client.connect(family, origin.port) as sock:
        assert sock.recv(100) == b"220 origin.test banner\r\n"
        sock.sendall(b"QUIT\r\n")

    record = forwarder.access(f"dst={host_of(family)}:{origin.port} ")
    assert f"target={host_of(family)}:{origin.port} " in record


def test_host_header_port_does_not_steer_the_tunnel(
    family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """``Host: origin.test:7`` on a connection to port 80 still tunnels to port 80."""
    start_origin("http")
    start_upstream("builtin")
    forwarder = start_handyproxy(sniff_timeout="0")

    with client.connect(family, 80) as sock:
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: {ORIGIN_NAME}:7\r\nConnection: close\r\n\r\n".encode()
        )
        reply = recv_all(sock)

    assert reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]
    record = forwarder.access(f"dst={host_of(family)}:80 ")
    assert f"target={ORIGIN_NAME}:80 " in record


def test_sniffed_bytes_are_replayed_in_order_when_no_name_is_found(
    family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """Random bytes carry no SNI and no Host: the tunnel falls back to the IP and the origin
    receives every byte the sniffer read, then the rest, in order."""
    origin = start_origin("echo")
    start_upstream("builtin")
    forwarder = start_handyproxy(sniff_timeout="0", sniff_max_bytes=4096)
    payload = os.urandom(256 * 1024)

    with client.connect(family, origin.port) as sock:
        reply, expected = echo_exchange(sock, payload)

    assert reply == expected
    record = forwarder.access(f"dst={host_of(family)}:{origin.port} ")
    assert f"target={host_of(family)}:{origin.port} " in record
