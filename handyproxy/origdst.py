"""Where a REDIRECTed or DNATed connection was really going, from the kernel's conntrack entry.

One function covers both families: a dual-stack listener accepts IPv4 clients as v4-mapped IPv6
sockets, and for those the IPv4 option (SOL_IP) is the one conntrack answers.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
from collections.abc import Collection

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
    listen_ports: Collection[int],
    upstreams: Collection[tuple[str, int]],
    upstream_ports: Collection[int] = (),
) -> str | None:
    """Why a destination must not be tunnelled, or None.

    - ``not-redirected``: the original destination is the listener's own address.
    - ``loop``: it is a known address of an upstream proxy (``upstreams`` holds them unmapped),
      or another of our ports on a loopback or our own address.
    - ``upstream-port``: it is on a port an upstream listens on (``upstream_ports``, empty when
      the operator allowed them). The proxy's host may answer on addresses nobody told us
      about (a second IPv4 address, its IPv6 address); through such an address the proxy would
      connect to itself, and the client could then ask it for any port. Refusing the port
      keeps that promise without having to know every address.

    ``local`` (the accepted socket's own address) matters only when ``dst`` is on one of our
    ports, so the caller may pass None for any other destination and save a syscall.
    """
    port = dst[1]
    dst_ip = unmap(dst[0])
    if (dst_ip, port) in upstreams:
        return "loop"
    if port in upstream_ports:
        return "upstream-port"
    if port not in listen_ports:
        return None
    if local is None:
        raise ValueError("is_self needs the local address for a destination on a listen port")
    if same_endpoint(dst, local):
        return "not-redirected"
    if dst_ip == unmap(local[0]) or _is_loopback(dst_ip):
        return "loop"
    return None


_ABSOLUTE_FORM = re.compile(rb"[A-Z][A-Z-]{0,19} +[A-Za-z][A-Za-z0-9+.-]*://")
_CONNECT = b"CONNECT "


def is_proxy_request(first: bytes) -> bool:
    """Whether a client's first bytes address an HTTP proxy: ``CONNECT`` (or the start of it,
    when the client stopped there) or a request with an absolute URI (``GET http://...``).

    A client that speaks to a proxy through a tunnel aimed at a proxy port is nesting tunnels;
    when that proxy is ours, the nested request would reach any port it names.
    """
    if not first:
        return False
    if first.startswith(_CONNECT) or _CONNECT.startswith(first[: len(_CONNECT)]):
        return True
    return _ABSOLUTE_FORM.match(first) is not None
