"""The HTTP CONNECT handshake with the upstream proxy: the request and its reply.

Pure bytes in, bytes out: no sockets, no timers (``handyproxy.upstream`` does the I/O).

The reply parser reports where the header ends, because an origin that speaks first (SSH, SMTP,
FTP banners) can have its first bytes arrive in the same read as the proxy's reply; those bytes
belong to the client and must not be dropped.
"""

from __future__ import annotations

import base64
import re

from handyproxy import __version__
from handyproxy.address import authority

MAX_REPLY_BYTES = 16 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?\r?")
_AUTH_SCHEME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class ConnectReplyError(Exception):
    """The upstream's reply is not an HTTP status header we can act on."""


class ConnectError(Exception):
    """The tunnel could not be opened; ``status`` is the upstream's code when it sent one, and
    ``upstream`` the name of the last upstream tried, when there was one."""

    def __init__(self, reason: str, status: int | None = None, upstream: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.upstream = upstream


def basic_authorization(user: str, password: str) -> bytes:
    """The ``Proxy-Authorization`` value for Basic (RFC 7617): UTF-8 ``user:password``, base64."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


_USER_AGENT = b"User-Agent: handyproxy/" + __version__.encode() + b"\r\n"
#: The request's constant end per authorization value (one per upstream): built once.
_TAILS: dict[bytes, bytes] = {}


def build_request(host: str, port: int, authorization: bytes = b"") -> bytes:
    """The whole CONNECT request, sent in one write so proxies see it in one segment.

    ``authorization`` is a ready ``Proxy-Authorization`` value (see basic_authorization). Only
    the target changes from tunnel to tunnel; the rest comes from a cache.
    """
    target = authority(host, port).encode("ascii")
    tail = _TAILS.get(authorization)
    if tail is None:
        auth = b"Proxy-Authorization: " + authorization + b"\r\n" if authorization else b""
        tail = _TAILS.setdefault(authorization, _USER_AGENT + auth + b"\r\n")
    return b"".join((b"CONNECT ", target, b" HTTP/1.1\r\nHost: ", target, b"\r\n", tail))


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


def auth_schemes(header: bytes) -> list[str]:
    """The schemes a 407 reply's ``Proxy-Authenticate`` headers ask for (``["Basic", "NTLM"]``).

    Only the scheme tokens are returned, never parameters: they are what an operator needs in
    the log, and a realm or challenge has no business there.
    """
    schemes: list[str] = []
    for raw in header.split(b"\n")[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or name.strip().lower() != b"proxy-authenticate":
            continue
        text = value.decode("latin-1")
        # Several challenges may share one header: 'Basic realm="x", NTLM'. A scheme is the
        # first token of a comma-separated part; parameters (name=value) fail the token match.
        for part in text.split(","):
            token = part.strip().split(" ", 1)[0]
            if _AUTH_SCHEME.fullmatch(token) and token not in schemes:
                schemes.append(token)
    return schemes
