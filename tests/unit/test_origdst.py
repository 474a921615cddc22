"""The original destination from conntrack, and the loop guard, without root or NAT.

A fake socket answers ``getsockopt`` with the packed ``sockaddr_in`` / ``sockaddr_in6`` the kernel
would return, and records the call, so the option level, number and buffer size are checked
exactly: asking the wrong level for a v4-mapped client is the classic mistake here.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from handyproxy import address, origdst
from handyproxy.origdst import OrigDstError, is_self, original_dst


def sockaddr_in(host: str, port: int) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_pton(socket.AF_INET, host)
        + bytes(8)
    )


def sockaddr_in6(host: str, port: int, flowinfo: int = 0, scope_id: int = 0) -> bytes:
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, flowinfo)
        + socket.inet_pton(socket.AF_INET6, host)
        + struct.pack("=I", scope_id)
    )


class FakeSocket:
    """An accepted socket as far as ``original_dst`` can tell."""

    def __init__(self, family: int, local: tuple, answer: bytes | OSError) -> None:
        self.family = family
        self.local = local
        self.answer = answer
        self.calls: list[tuple[int, int, int]] = []

    def getsockname(self) -> tuple:
        return self.local

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes:
        self.calls.append((level, option, buflen))
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer


def test_ipv4_socket_asks_sol_ip_and_parses_sockaddr_in() -> None:
    sock = FakeSocket(socket.AF_INET, ("198.18.0.1", 8443), sockaddr_in("203.0.113.5", 443))
    assert original_dst(sock) == ("203.0.113.5", 443)  # type: ignore[arg-type]
    assert sock.calls == [(socket.SOL_IP, 80, 16)]


def test_v4_mapped_client_on_a_dual_stack_socket_asks_sol_ip() -> None:
    sock = FakeSocket(
        socket.AF_INET6, ("::ffff:198.18.0.1", 8443, 0, 0), sockaddr_in("203.0.113.5", 80)
    )
    assert original_dst(sock) == ("203.0.113.5", 80)  # type: ignore[arg-type]
    assert sock.calls == [(socket.SOL_IP, 80, 16)]


def test_ipv6_socket_asks_ipproto_ipv6_and_parses_sockaddr_in6() -> None:
    sock = FakeSocket(
        socket.AF_INET6,
        ("2001:db8:1::1", 8443, 0, 0),
        sockaddr_in6("2001:db8:2::5", 8080, flowinfo=0x12345, scope_id=7),
    )
    assert original_dst(sock) == ("2001:db8:2::5", 8080)  # type: ignore[arg-type]
    assert sock.calls == [(socket.IPPROTO_IPV6, 80, 28)]


def test_option_numbers_are_the_kernel_headers() -> None:
    assert origdst.SO_ORIGINAL_DST == 80
    assert origdst.IP6T_SO_ORIGINAL_DST == 80


@pytest.mark.parametrize("port", [1, 443, 8443, 65535])
def test_port_is_read_in_network_byte_order(port: int) -> None:
    sock = FakeSocket(socket.AF_INET, ("198.18.0.1", 8443), sockaddr_in("203.0.113.5", port))
    assert original_dst(sock)[1] == port  # type: ignore[arg-type]


def test_local_address_given_by_the_caller_decides_the_family() -> None:
    sock = FakeSocket(socket.AF_INET6, ("2001:db8:1::1", 8443, 0, 0), sockaddr_in("203.0.113.5", 1))
    assert original_dst(sock, "::ffff:198.18.0.1") == ("203.0.113.5", 1)  # type: ignore[arg-type]
    assert sock.calls == [(socket.SOL_IP, 80, 16)]


@pytest.mark.parametrize(
    "err",
    [
        OSError(errno.ENOENT, "No such file or directory"),
        OSError(errno.ENOPROTOOPT, "Protocol not available"),
        OSError(errno.EBADF, "Bad file descriptor"),
    ],
)
@pytest.mark.parametrize(
    ("family", "local"),
    [(socket.AF_INET, ("198.18.0.1", 8443)), (socket.AF_INET6, ("2001:db8::1", 8443, 0, 0))],
)
def test_no_conntrack_entry_raises_origdst_error(err: OSError, family: int, local: tuple) -> None:
    with pytest.raises(OrigDstError):
        original_dst(FakeSocket(family, local, err))  # type: ignore[arg-type]


def test_a_direct_loopback_connection_is_not_taken_for_a_redirected_one() -> None:
    """Without NAT the kernel has no entry (an error) or one whose target is our own address."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        left = socket.create_connection(listener.getsockname())
        right, _ = listener.accept()
    try:
        local = right.getsockname()[:2]
        try:
            dst = original_dst(right)
        except OrigDstError:
            return
        assert dst == local
        assert is_self(dst, local, {local[1]}, []) == "not-redirected"
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("::ffff:198.51.100.2", "198.51.100.2"),
        ("198.51.100.2", "198.51.100.2"),
        ("2001:db8::2", "2001:db8::2"),
        ("::ffff:0:1", "::ffff:0:1"),
        ("::1", "::1"),
    ],
)
def test_unmap_turns_only_v4_mapped_addresses_into_ipv4(host: str, expected: str) -> None:
    assert address.unmap(host) == expected


LOCAL = ("198.18.0.1", 8443)
UPSTREAMS = [("203.0.113.2", 3128), ("2001:db8:3::2", 3128)]
PORTS = {8443, 8444}


@pytest.mark.parametrize(
    ("dst", "local", "reason"),
    [
        (("198.18.0.1", 8443), LOCAL, "not-redirected"),
        (("198.18.0.1", 8443), ("::ffff:198.18.0.1", 8443), "not-redirected"),
        (("::ffff:198.18.0.1", 8443), LOCAL, "not-redirected"),
        (("2001:db8::1", 8443), ("2001:db8::1", 8443), "not-redirected"),
        (("203.0.113.2", 3128), LOCAL, "loop"),
        (("::ffff:203.0.113.2", 3128), LOCAL, "loop"),
        (("2001:db8:3::2", 3128), LOCAL, "loop"),
        (("198.18.0.1", 8444), LOCAL, "loop"),
        (("127.0.0.1", 8443), LOCAL, "loop"),
        (("127.0.0.53", 8444), LOCAL, "loop"),
        (("::1", 8443), ("2001:db8::1", 8443), "loop"),
        (("203.0.113.5", 443), LOCAL, None),
        (("203.0.113.5", 8443), LOCAL, None),
        (("203.0.113.2", 3129), LOCAL, None),
        (("203.0.113.3", 3128), LOCAL, None),
        (("198.18.0.1", 443), LOCAL, None),
        (("127.0.0.1", 80), LOCAL, None),
        (("2001:db8::5", 443), ("2001:db8::1", 8443), None),
    ],
)
def test_is_self_refuses_unredirected_and_looping_destinations(
    dst: tuple[str, int], local: tuple[str, int], reason: str | None
) -> None:
    assert is_self(dst, local, PORTS, UPSTREAMS) == reason


def test_same_endpoint_matches_across_v4_mapped_spellings() -> None:
    assert origdst.same_endpoint(("::ffff:198.51.100.2", 80), ("198.51.100.2", 80))
    assert not origdst.same_endpoint(("198.51.100.2", 80), ("198.51.100.2", 81))
    assert not origdst.same_endpoint(("198.51.100.2", 80), ("198.51.100.3", 80))


@pytest.mark.parametrize(
    ("dst", "reason"),
    [
        (("203.0.113.5", 443), None),
        (("203.0.113.2", 3128), "loop"),
        (("::ffff:203.0.113.2", 3128), "loop"),
        (("2001:db8::5", 8080), None),
    ],
)
def test_is_self_needs_no_local_address_off_the_listen_ports(
    dst: tuple[str, int], reason: str | None
) -> None:
    """The tunnel skips getsockname() for these: only a listen port can be our own address."""
    assert is_self(dst, None, PORTS, UPSTREAMS) == reason


def test_is_self_asks_for_the_local_address_on_a_listen_port() -> None:
    with pytest.raises(ValueError, match="local address"):
        is_self(("198.18.0.1", 8443), None, PORTS, UPSTREAMS)


@pytest.mark.parametrize(
    ("dst", "reason"),
    [
        (("203.0.113.3", 3128), "upstream-port"),  # another address of the proxy's host
        (("2001:db8:3::9", 3128), "upstream-port"),
        (("198.18.0.7", 8080), "upstream-port"),
        (("203.0.113.2", 3128), "loop"),  # a known address is still named a loop
        (("198.18.0.7", 3129), None),
    ],
)
def test_is_self_refuses_every_address_on_an_upstream_port(
    dst: tuple[str, int], reason: str | None
) -> None:
    assert is_self(dst, None, PORTS, UPSTREAMS, {3128, 8080}) == reason


def test_upstream_ports_are_let_through_when_allowed() -> None:
    """-allow-upstream-ports passes an empty set; the tunnel then checks the first bytes."""
    assert is_self(("203.0.113.3", 3128), None, PORTS, UPSTREAMS, frozenset()) is None


@pytest.mark.parametrize(
    ("first", "nested"),
    [
        (b"CONNECT 198.18.0.2:22 HTTP/1.1\r\nHost: 198.18.0.2:22\r\n\r\n", True),
        (b"CONNECT ", True),
        (b"CONN", True),  # a client that stopped mid-method is not given the benefit of doubt
        (b"GET http://198.18.0.2:8080/ HTTP/1.1\r\n\r\n", True),
        (b"POST   https://x.example/ HTTP/1.1\r\n", True),
        (b"GET ftp://x.example/ HTTP/1.0\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n", False),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", False),
        (b"\x16\x03\x01\x00\x05hello", False),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False),
        (b"", False),
        (b"connect x:1 HTTP/1.1\r\n", False),  # methods are case-sensitive
    ],
)
def test_is_proxy_request_spots_a_client_speaking_to_a_proxy(first: bytes, nested: bool) -> None:
    assert origdst.is_proxy_request(first) is nested
