"""Regression: a client must not reach the upstream proxy itself through another address of the
proxy's host. squid here answers on every address of the upstream host, including a second IPv4
address and the IPv6 address the forwarder was never told about. Before the fix, a client that
connected to one of them on port 3128 got a tunnel into squid, and its own nested CONNECT then
reached any port (here the origin's port 25 banner, which no client may name).
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_address

import pytest
from kit.client import Client
from kit.upstreams import Upstream
from kit.wire import connect_or_reset, recv_all

from handyproxy.address import authority
from handyproxy.lab.netns import ORIGIN_V4, PROXY_PORT, UPSTREAM_V4, UPSTREAM_V6, Lab

pytestmark = pytest.mark.integration

#: a second address of the upstream host in each family, on its link to the router
SECOND_V4, SECOND_V6 = str(ip_address(UPSTREAM_V4) + 1), str(ip_address(UPSTREAM_V6) + 1)
#: every address of the upstream host the forwarder does not know (it knows UPSTREAM_V4:3128)
UNKNOWN = [SECOND_V4, UPSTREAM_V6, SECOND_V6]
NESTED = f"CONNECT {ORIGIN_V4}:25 HTTP/1.1\r\nHost: {ORIGIN_V4}:25\r\n\r\n"


@pytest.fixture
def second_addresses(lab: Lab) -> Iterator[None]:
    """The addresses are taken away again after the test, so the shared lab stays as it was."""
    dev = lab.device("upstream", "router")
    added = [(f"{SECOND_V4}/24", []), (f"{SECOND_V6}/64", ["nodad"])]
    for address, extra in added:
        lab.run("upstream", ["ip", "addr", "add", address, "dev", dev, *extra], check=True)
    yield
    for address, _ in added:
        lab.run("upstream", ["ip", "addr", "del", address, "dev", dev])


@pytest.fixture
def squid(second_addresses: None, start_origin, start_upstream) -> Upstream:
    """squid on every address of the upstream host; the origin's banner on port 25."""
    start_origin("banner")
    return start_upstream("squid")


def nested_connect(client: Client, address: str) -> bytes | None:
    """Connect to ``address``:3128, speak CONNECT to the origin's port 25; the bytes that came
    back, or None when the connection was reset (refused)."""
    sock = connect_or_reset(client.lab, "client", address, PROXY_PORT)
    if sock is None:
        return None
    with sock:
        sock.settimeout(5)
        try:
            sock.sendall(NESTED.encode())
            return recv_all(sock)
        except ConnectionResetError:
            return None


@pytest.mark.parametrize("address", UNKNOWN)
def test_another_address_of_the_proxy_host_on_its_port_is_refused(
    address: str, squid: Upstream, client: Client, start_handyproxy
):
    forwarder = start_handyproxy()  # upstream UPSTREAM_V4:3128, nothing else
    assert nested_connect(client, address) is None
    record = forwarder.access(f"dst={authority(address, PROXY_PORT)} ")
    assert "end=refused " in record and "reason=upstream-port" in record
    assert not squid.log.matching(rf"CONNECT {ORIGIN_V4}:25 ")
    assert not squid.log.matching(rf"CONNECT \S+:{PROXY_PORT} ")


@pytest.mark.parametrize("address", UNKNOWN)
def test_when_upstream_ports_are_allowed_a_nested_proxy_request_is_still_refused(
    address: str, squid: Upstream, client: Client, start_handyproxy
):
    forwarder = start_handyproxy(allow_upstream_ports="true")
    assert nested_connect(client, address) is None
    record = forwarder.access("end=refused ")
    assert "reason=proxy-request" in record
    assert not squid.log.matching(rf"CONNECT {ORIGIN_V4}:25 ")
    # the same for a forward-proxy GET with an absolute URI
    sock = client.lab.connect("client", address, PROXY_PORT)
    with sock:
        sock.settimeout(5)
        sock.sendall(f"GET http://{ORIGIN_V4}:25/ HTTP/1.1\r\n\r\n".encode())
        with pytest.raises(ConnectionResetError):
            recv_all(sock)
    forwarder.log.wait_for(r"reason=proxy-request", 5, count=2)


def test_allowed_upstream_ports_still_carry_ordinary_traffic(
    squid: Upstream, client: Client, start_handyproxy
):
    """The allow flag is real: a client speaking plain HTTP to that address gets its tunnel
    (and squid's own answer to a request it cannot serve), not a reset."""
    forwarder = start_handyproxy(allow_upstream_ports="true")
    sock = client.lab.connect("client", SECOND_V4, PROXY_PORT)
    with sock:
        sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        answer = recv_all(sock)
    assert answer.startswith(b"HTTP/1.1 ")
    record = forwarder.access(f"dst={authority(SECOND_V4, PROXY_PORT)} ")
    assert "status=200 " in record and "end=eof" in record
    squid.log.wait_for(rf"CONNECT {SECOND_V4}:{PROXY_PORT} ", 10)
