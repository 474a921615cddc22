"""The happy path: a client with no proxy settings reaches the origin through REDIRECT → handyproxy
→ CONNECT upstream, and every byte arrives in both directions, in order, over IPv4 and IPv6."""

from __future__ import annotations

import re

import pytest
from kit.client import Client, host_of
from kit.fixtures import each_family
from kit.origins import ORIGIN_PORTS, SEEN_BY_ORIGIN, Body
from kit.wire import echo_exchange, recv_all, recv_until, sha256_file

from handyproxy.address import authority
from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

REAL_PROXIES = ["squid", "tinyproxy"]


@each_family
@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("proxy", REAL_PROXIES)
def test_download_is_byte_identical(
    scheme, proxy, family, body: Body, client: Client, start_origin, start_upstream,
    start_handyproxy,
):  # fmt: skip
    origin = start_origin(scheme)
    start_upstream(proxy)
    forwarder = start_handyproxy()
    since = origin.log.mark()

    result, out = client.curl(f"{scheme}://{host_of(family)}/body.bin", family)

    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == body.size
    assert sha256_file(out) == body.sha256
    dst = f"{host_of(family)}:{ORIGIN_PORTS[scheme]}"
    record = forwarder.access(f"dst={dst} ")
    assert "status=200" in record
    assert "end=eof" in record
    assert int(record.split(" down=")[1].split()[0]) > body.size
    # the origin was reached from the upstream's side, the only way it can be
    seen_from = re.escape(SEEN_BY_ORIGIN[family])
    origin.log.wait_for(rf"origin (::ffff:)?{seen_from} .*body\.bin", since=since)


def test_download_through_an_upstream_given_as_a_bracketed_ipv6_literal(
    body: Body, client: Client, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    start_upstream("squid")
    forwarder = start_handyproxy(upstream_proxy=authority(lablib.UPSTREAM_V6, lablib.PROXY_PORT))

    result, out = client.curl(f"http://{host_of(4)}/body.bin", 4)

    assert result.returncode == 0, result.stderr
    assert sha256_file(out) == body.sha256
    assert "status=200 " in forwarder.access(f"dst={host_of(4)}:80 ")


@each_family
@pytest.mark.parametrize("proxy", [*REAL_PROXIES, "builtin-greedy"])
def test_banner_arrives_before_client_sends(
    proxy, family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """The origin speaks first; with the greedy proxy its banner shares a read with the 200."""
    origin = start_origin("banner")
    if proxy == "builtin-greedy":
        start_upstream("builtin", greedy=True)
    else:
        start_upstream(proxy)
    forwarder = start_handyproxy()

    with client.connect(family, origin.port) as sock:
        banner = recv_until(sock, b"\r\n")
        assert banner == b"220 origin.test banner\r\n"
        sock.sendall(b"QUIT\r\n")
        assert recv_all(sock) == b"221 bye\r\n"

    record = forwarder.access(f"dst={host_of(family)}:{origin.port} ")
    assert "status=200" in record


def test_client_half_close_still_gets_reply(
    family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """The echo origin answers only after EOF: the half-close must travel, the reply come back.

    Through the built-in proxy only: Debian's squid 5 and tinyproxy 1.11 end the whole CONNECT
    tunnel when the client side reaches EOF (checked by hand), so no forwarder could pass this
    test through them.
    """
    origin = start_origin("echo")
    start_upstream("builtin")
    start_handyproxy()
    payload = bytes(range(256)) * 4096  # 1 MiB

    with client.connect(family, origin.port) as sock:
        reply, expected = echo_exchange(sock, payload)

    assert reply == expected
