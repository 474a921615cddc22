"""Server Name Indication from a TLS ClientHello.

The hello may be split over several TLS records and TCP segments (large post-quantum key shares
make that common), so records are reassembled before the handshake message is parsed.
"""

from __future__ import annotations

from handyproxy.sniff import MORE, Sniffer, _More, valid_name

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
NAME_TYPE_HOST = 0x00
MAX_RECORD = 16384 + 2048  # RFC 8446 5.2: TLSCiphertext limit; plaintext is stricter.


class _Short(Exception):
    """The message ended inside a field: malformed, not "need more"."""


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_bytes), "big"))


def _complete(payload: bytearray) -> bytes | None:
    if len(payload) < 4:
        return None
    need = 4 + int.from_bytes(payload[1:4], "big")
    return bytes(payload[:need]) if len(payload) >= need else None


class ClientHelloSniffer(Sniffer):
    """Records are reassembled as they arrive: each record header is read once, each payload
    byte copied once, and the ClientHello parsed once, when it is whole."""

    __slots__ = ("buf", "payload", "record", "record_end", "taken")

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.payload = bytearray()  # handshake bytes from the records so far
        self.record = 0  # where the record being read starts
        self.record_end = -1  # where it ends; -1 while its header is not yet read
        self.taken = 0  # stream bytes up to here are in ``payload``

    def _feed(self, chunk: bytes) -> str | _More | None:
        buf = self.buf
        buf += chunk
        while True:
            if self.record_end < 0:
                header = buf[self.record : self.record + 5]
                if (header and header[0] != RECORD_HANDSHAKE) or (
                    len(header) > 1 and header[1] != 3
                ):
                    return None
                if len(header) < 5:
                    return MORE
                length = int.from_bytes(header[3:5], "big")
                if length == 0 or length > MAX_RECORD:
                    return None
                self.taken = self.record + 5
                self.record_end = self.taken + length
            end = min(self.record_end, len(buf))
            if end > self.taken:
                self.payload += buf[self.taken : end]
                self.work += end - self.taken
                self.taken = end
            payload = self.payload
            if payload and payload[0] != HANDSHAKE_CLIENT_HELLO:
                return None
            message = _complete(payload)
            if message is not None:
                self.work += len(message)
                try:
                    return _parse_client_hello(_Reader(message[4:]))
                except _Short:
                    return None
            if self.taken < self.record_end:
                return MORE
            self.record, self.record_end = self.record_end, -1


def server_name(data: bytes) -> str | _More | None:
    """The SNI host name of the ClientHello at the start of ``data``; MORE or None otherwise."""
    return ClientHelloSniffer().feed(data)


def _parse_client_hello(r: _Reader) -> str | None:
    r.take(2)  # legacy_version
    r.take(32)  # random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if r.pos == len(r.data):
        return None  # no extensions at all (SSL 3.0 style hello)
    extensions = _Reader(r.vector(2))
    while extensions.pos < len(extensions.data):
        ext_type = extensions.u16()
        ext = extensions.vector(2)
        if ext_type == EXT_SERVER_NAME:
            return _parse_server_name_list(_Reader(ext))
    return None


def _parse_server_name_list(r: _Reader) -> str | None:
    names = _Reader(r.vector(2))
    while names.pos < len(names.data):
        name_type = names.u8()
        name = names.vector(2)
        if name_type == NAME_TYPE_HOST:
            return valid_name(name)
    return None
