"""The Host header of a plain HTTP/1 request.

Only the name is returned: the port of ``Host: name:port`` is ignored on purpose, because the
tunnel must go to the port the client really connected to.
"""

from __future__ import annotations

import re

from handyproxy.sniff import MORE, Sniffer, _More, valid_name

_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]{0,19} [\x21-\x7e]+ HTTP/1\.[0-9]\r?")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\r?")
_HOST_VALUE = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?")
_METHOD_CHARS = re.compile(rb"[A-Z-]*")
_TARGET_CHARS = re.compile(rb"[\x20-\x7e\r]*")  # what may follow the method before the newline
_MAX_METHOD = 20


class HostSniffer(Sniffer):
    """The Host header, line by line: each byte is scanned once for the newline and each whole
    line matched once; an unfinished request line is checked only in its new bytes."""

    __slots__ = ("buf", "checked", "line", "request_line", "scanned", "space")

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.line = 0  # where the line being read starts
        self.scanned = 0  # up to here no newline follows ``line``
        self.request_line = False  # the request line is whole and valid
        self.checked = 0  # the unfinished request line is plausible up to here
        self.space = -1  # where its method ends

    def _feed(self, chunk: bytes) -> str | _More | None:
        buf = self.buf
        buf += chunk
        while True:
            nl = buf.find(b"\n", self.scanned)
            self.work += (nl if nl >= 0 else len(buf)) - self.scanned
            if nl < 0:
                self.scanned = len(buf)
                if not self.request_line and not self._could_be_request_start():
                    return None
                return MORE
            line = bytes(buf[self.line : nl])
            self.work += len(line)
            self.line = self.scanned = nl + 1
            if not self.request_line:
                if not _REQUEST_LINE.fullmatch(line):
                    return None
                self.request_line = True
                continue
            if line in (b"", b"\r"):
                return None  # end of headers, no Host
            if line[:1] in (b" ", b"\t"):
                return None  # obsolete line folding: refuse rather than guess
            m = _HEADER.fullmatch(line)
            if m is None:
                return None
            if m.group(1).lower() == b"host":
                return _name_from_host(m.group(2))

    def _could_be_request_start(self) -> bool:
        """Whether the request line so far can still grow into one, judged on new bytes only."""
        buf, start = self.buf, self.checked
        self.checked = len(buf)
        self.work += len(buf) - start
        if self.space < 0:
            sp = buf.find(b" ", start)
            end = sp if sp >= 0 else len(buf)
            if end > _MAX_METHOD or not _METHOD_CHARS.fullmatch(buf, start, end):
                return False
            if sp < 0:
                return True
            if sp == 0:
                return False
            self.space, start = sp, sp + 1
        return _TARGET_CHARS.fullmatch(buf, start) is not None


def host_name(data: bytes) -> str | _More | None:
    """The Host header's name once its line is complete; MORE while a request may still hold it."""
    return HostSniffer().feed(data)


def _name_from_host(value: bytes) -> str | None:
    m = _HOST_VALUE.fullmatch(value)
    if m is None or m.group(1).startswith(b"["):
        return None
    return valid_name(m.group(1))
