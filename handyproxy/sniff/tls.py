"""Server Name Indication from a TLS ClientHello.

The hello may be split over several TLS records and TCP segments (large post-quantum key shares
make that common), so records are reassembled before the handshake message is parsed.
"""

from __future__ import annotations

from handyproxy.sniff import MORE, _More, valid_name

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


def _handshake_bytes(data: bytes) -> bytes | _More | None:
    """Concatenate handshake-record payloads until one whole handshake message is present."""
    payload = bytearray()
    pos = 0
    while (message := _complete(payload)) is None:
        header = data[pos : pos + 5]
        if (header and header[0] != RECORD_HANDSHAKE) or (len(header) > 1 and header[1] != 3):
            return None
        if len(header) < 5:
            return MORE
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD:
            return None
        payload += data[pos + 5 : pos + 5 + length]
        if payload and payload[0] != HANDSHAKE_CLIENT_HELLO:
            return None
        if pos + 5 + length > len(data):
            return _complete(payload) or MORE
        pos += 5 + length
    return message


def server_name(data: bytes) -> str | _More | None:
    """The SNI host name of the ClientHello at the start of ``data``; MORE or None otherwise."""
    message = _handshake_bytes(bytes(data))
    if message is None or isinstance(message, _More):
        return message
    if message[0] != HANDSHAKE_CLIENT_HELLO:
        return None
    try:
        return _parse_client_hello(_Reader(message[4:]))
    except _Short:
        return None


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
