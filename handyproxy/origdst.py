"""Where a REDIRECTed or DNATed connection was really going, from the kernel's conntrack entry.

One function covers both families: a dual-stack listener accepts IPv4 clients as v4-mapped IPv6
sockets, and for those the IPv4 option (SOL_IP) is the one conntrack answers.
"""

from __future__ import annotations

import errno
import socket
import struct

from handyproxy.address import unmap

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope id


class OrigDstError(Exception):
    """The connection has no original destination: it was not redirected."""


def original_dst(sock: socket.socket, end_ip: str | None = None) -> tuple[str, int]:
    """The original ``(ip, port)``; raises OrigDstError when conntrack has none (not NATed).

    ``end_ip`` is either end's address when the caller already has it (the peer's, from
    accept, costs no syscall): only its family matters, and both ends of a connection share it.
    """
    if end_ip is None:
        end_ip = sock.getsockname()[0]
    try:
        if ":" not in end_ip or end_ip.startswith("::ffff:"):
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
            port, addr = _SOCKADDR_IN.unpack(raw)
            return socket.inet_ntop(socket.AF_INET, addr), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, addr = _SOCKADDR_IN6.unpack(raw)
        return socket.inet_ntop(socket.AF_INET6, addr), port
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            raise OrigDstError(f"getsockopt(SO_ORIGINAL_DST): {exc.strerror}") from None
        raise OrigDstError(f"getsockopt(SO_ORIGINAL_DST) failed: {exc}") from None


def same_endpoint(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Compare endpoints across the v4 / v4-mapped spellings of one address.

    Addresses from the kernel (getsockname, inet_ntop, getaddrinfo) are already canonical text,
    so a string comparison after unmapping is exact and much cheaper than ipaddress objects.
    """
    return a[1] == b[1] and unmap(a[0]) == unmap(b[0])


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def is_self(
    dst: tuple[str, int],
    local: tuple[str, int] | None,
    listen_ports: set[int],
    upstreams: list[tuple[str, int]],
) -> str | None:
    """Why a destination must not be tunnelled (``not-redirected`` / ``loop``), or None.

    A connection whose original destination is the listener's own address was never
    redirected; one aimed at the upstream proxy or at another of our ports would loop.
    ``local`` (the accepted socket's own address) matters only when ``dst`` is on one of our
    ports, so the caller may pass None for any other destination and save a syscall.
    """
    if any(same_endpoint(dst, up) for up in upstreams):
        return "loop"
    if dst[1] not in listen_ports:
        return None
    dst_ip = unmap(dst[0])
    if local is None:
        raise ValueError("is_self needs the local address for a destination on a listen port")
    if same_endpoint(dst, local):
        return "not-redirected"
    if dst_ip == unmap(local[0]) or _is_loopback(dst_ip):
        return "loop"
    return None
