"""Addresses as the forwarder reads and writes them: ``host:port``, IPv6 brackets, host names.

Every place that parses or prints an endpoint (flags, TOML, the CONNECT request, log records,
the sniffers' name check) uses these functions, so the rules are written once.
"""

from __future__ import annotations

import ipaddress
import re
import socket


def authority(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, as RFC 9110 9.3.6 requires."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmap(host: str) -> str:
    """``::ffff:198.51.100.2`` → ``198.51.100.2``, so v4 clients on a v6 socket log as v4."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def split_hostport(
    text: str, default_port: int | None = None, *, kernel_port: bool = False
) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port``, ``host`` or ``[v6]``; bare IPv6 is ambiguous.

    A missing port takes ``default_port``; ``kernel_port`` allows port 0 (for an address we
    listen on: the kernel picks). Raises ValueError naming what is wrong.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    port_text: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    elif s.count(":") > 1:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [2001:db8::1]:3128")
    elif ":" in s:
        host, port_text = s.split(":", 1)
    else:
        host, port_text = s, None
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not valid_host(host):
        raise ValueError(f"invalid host name {host!r}")
    if port_text is None or port_text == "":
        if default_port is None or port_text == "":
            raise ValueError(f"missing port in {text!r}")
        return host, default_port
    low = 0 if kernel_port else 1
    if not (port_text.isascii() and port_text.isdigit()) or not low <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from {low} to 65535")
    return host, int(port_text)


HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def valid_host(host: str) -> bool:
    """An IP literal, or a DNS name of 1-63 character labels (underscores allowed)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    return all(HOST_LABEL.fullmatch(label) for label in name.split("."))


def is_numeric_host(name: str) -> bool:
    """True for every spelling a resolver takes as an address rather than a name.

    Besides the canonical forms this covers what inet_aton(3) accepts (``0x7f000001``,
    ``0x7f.1``, ``017700000001``, ``127.1``): getaddrinfo in a proxy turns those into addresses
    without asking DNS, so a "name" in one of those forms is an IP literal in disguise.
    """
    text = name[:-1] if name.endswith(".") else name
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(text)
    except (OSError, ValueError):
        return False
    return True


def valid_hostname(name: str) -> bool:
    """A DNS name a client may ask us to CONNECT to: valid labels and not an address in disguise."""
    if not name.isascii() or name.replace(".", "").isdigit():  # no all-numeric top label
        return False
    return valid_host(name) and not is_numeric_host(name)
