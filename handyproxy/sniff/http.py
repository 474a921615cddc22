"""The Host header of a plain HTTP/1 request.

Only the name is returned: the port of ``Host: name:port`` is ignored on purpose, because the
tunnel must go to the port the client really connected to.
"""

from __future__ import annotations

import re

from handyproxy.sniff import MORE, _More, valid_name

_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]{0,19} [\x21-\x7e]+ HTTP/1\.[0-9]\r?")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\r?")
_HOST_VALUE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?")
_MAX_METHOD = 20


def host_name(data: bytes) -> str | _More | None:
    """The Host header's name once its line is complete; MORE while a request may still hold it."""
    data = bytes(data)
    first_nl = data.find(b"\n")
    if first_nl < 0:
        return MORE if _could_be_request_start(data) else None
    if not _REQUEST_LINE.fullmatch(data[:first_nl]):
        return None
    pos = first_nl + 1
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return MORE
        line = data[pos:nl]
        if line in (b"", b"\r"):
            return None  # end of headers, no Host
        if line[:1] in (b" ", b"\t"):
            return None  # obsolete line folding: refuse rather than guess
        m = _HEADER.fullmatch(line)
        if m is None:
            return None
        if m.group(1).lower() == b"host":
            return _name_from_host(m.group(2))
        pos = nl + 1


def _could_be_request_start(data: bytes) -> bool:
    """Whether ``data`` can still grow into a request line, so waiting is worth it."""
    method, sp, rest = data.partition(b" ")
    if not sp:
        return len(method) <= _MAX_METHOD and all(0x41 <= c <= 0x5A or c == 0x2D for c in method)
    if not method or not all(0x41 <= c <= 0x5A or c == 0x2D for c in method):
        return False
    return all(0x21 <= c <= 0x7E or c in (0x20, 0x0D) for c in rest)


def _name_from_host(value: bytes) -> str | None:
    m = _HOST_VALUE.fullmatch(value)
    if m is None or m.group(1).startswith(b"["):
        return None
    return valid_name(m.group(1))
