"""Regression: a client must not reach the upstream proxy itself through another address of the
proxy's host. squid here answers on every address of the upstream host, including a second IPv4
address and the IPv6 address the forwarder was never told about. Before the fix, a client that
connected to one of them on port 3128 got a tunnel into squid, and its own nested CONNECT then
reached any port (here the origin's port 25 banner, which no client may name).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from pathkit import PROXY_PORT, Client, Upstream, recv_all

from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

SECOND_V4, SECOND_V6 = "203.0.113.3", "2001:db8:113::3"
#: every address of the upstream host the forwarder does not know (it knows 203.0.113.2:3128)
UNKNOWN = [SECOND_V4, lablib.UPSTREAM_V6, SECOND_V6]
NESTED = f"CONNECT {lablib.ORIGIN_V4}:25 HTTP/1.1\r\nHost: {lablib.ORIGIN_V4}:25\r\n\r\n"


@pytest.fixture
def second_addresses(lab: lablib.Lab) -> Iterator[None]:
    ns, dev = lab.ns("upstream"), lab.device("upstream", "router")
    added = [(f"{SECOND_V4}/24", []), (f"{SECOND_V6}/64", ["nodad"])]
    for address, extra in added:
        subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", dev, *extra], check=True)
    yield
    for address, _ in added:
        subprocess.run(["ip", "-n", ns, "addr", "del", address, "dev", dev], check=False)


@pytest.fixture
def squid(second_addresses: None, start_origin, start_upstream) -> Upstream:
    """squid on every address of the upstream host; the origin's banner on port 25."""
    start_origin("banner")
    return start_upstream("squid")


def nested_connect(client: Client, address: str) -> bytes | None:
    """Connect to ``address``:3128, speak CONNECT to the origin's port 25; the bytes that came
    back, or None when the connection was reset (refused)."""
    try:
        sock = client.lab.connect("client", address, PROXY_PORT)
    except ConnectionResetError:
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
    forwarder = start_handyproxy()  # upstream 203.0.113.2:3128, nothing else
    assert nested_connect(client, address) is None
    record = forwarder.access(f"dst={address if ':' not in address else f'[{address}]'}:3128 ")
    assert "end=refused " in record and "reason=upstream-port" in record
    assert not squid.log.matching(rf"CONNECT {lablib.ORIGIN_V4}:25 ")
    assert not squid.log.matching(r"CONNECT \S+:3128 ")


@pytest.mark.parametrize("address", UNKNOWN)
def test_when_upstream_ports_are_allowed_a_nested_proxy_request_is_still_refused(
    address: str, squid: Upstream, client: Client, start_handyproxy
):
    forwarder = start_handyproxy(allow_upstream_ports="true")
    assert nested_connect(client, address) is None
    record = forwarder.access("end=refused ")
    assert "reason=proxy-request" in record
    assert not squid.log.matching(rf"CONNECT {lablib.ORIGIN_V4}:25 ")
    # the same for a forward-proxy GET with an absolute URI
    sock = client.lab.connect("client", address, PROXY_PORT)
    with sock:
        sock.settimeout(5)
        sock.sendall(f"GET http://{lablib.ORIGIN_V4}:25/ HTTP/1.1\r\n\r\n".encode())
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
    record = forwarder.access(f"dst={SECOND_V4}:3128 ")
    assert "status=200 " in record and "end=eof" in record
    squid.log.wait_for(rf"CONNECT {SECOND_V4}:3128 ", 10)
