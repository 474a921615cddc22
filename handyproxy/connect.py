"""The HTTP CONNECT handshake with the upstream proxy: the request and its reply.

The reply parser reports where the header ends, because an origin that speaks first (SSH, SMTP,
FTP banners) can have its first bytes arrive in the same read as the proxy's reply; those bytes
belong to the client and must not be dropped.
"""

from __future__ import annotations

import re

from handyproxy import __version__
from handyproxy.address import authority

MAX_REPLY_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r?")


class ConnectReplyError(Exception):
    """The upstream's reply is not an HTTP status header we can act on."""


class ConnectError(Exception):
    """The tunnel could not be opened; ``status`` is the upstream's code when it sent one."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def build_request(host: str, port: int) -> bytes:
    """The whole CONNECT request, sent in one write so proxies see it in one segment."""
    target = authority(host, port).encode("ascii")
    return (
        b"CONNECT " + target + b" HTTP/1.1\r\n"
        b"Host: " + target + b"\r\n"
        b"User-Agent: handyproxy/" + __version__.encode() + b"\r\n"
        b"\r\n"
    )


def parse_reply(buf: bytes) -> tuple[int, int] | None:
    """``(status, header_length)`` once the reply header is complete, None while it is not.

    Raises ConnectReplyError as soon as the bytes cannot be an HTTP/1 reply, or the header grows
    past MAX_REPLY_BYTES, so a hostile or confused upstream cannot hold memory or the client.
    """
    first_nl = buf.find(b"\n")
    if first_nl < 0:
        if len(buf) >= 5 and not buf.startswith(b"HTTP/"):
            raise ConnectReplyError(f"not an HTTP reply: {bytes(buf[:32])!r}")
        if len(buf) > MAX_REPLY_BYTES:
            raise ConnectReplyError("reply status line too long")
        return None
    m = _STATUS_LINE.fullmatch(buf[:first_nl])
    if m is None:
        raise ConnectReplyError(f"bad status line: {bytes(buf[: min(first_nl, 64)])!r}")
    status = int(m.group(1))
    pos = first_nl + 1
    while True:
        nl = buf.find(b"\n", pos, MAX_REPLY_BYTES)
        if nl < 0:
            if len(buf) >= MAX_REPLY_BYTES:
                raise ConnectReplyError(f"reply header larger than {MAX_REPLY_BYTES} bytes")
            return None
        if nl == pos or (nl == pos + 1 and buf[pos] == 0x0D):
            return status, nl + 1
        pos = nl + 1
