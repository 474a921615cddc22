"""SNI from a TLS ClientHello, on real hellos from the ``ssl`` module and on hand-built ones.

The sniffer sees whatever the client sent first, cut wherever TCP cut it; it must ask for more
while a hello may still be arriving, give the name once it is whole, and give up (None, so the
tunnel uses the original IP) on anything that is not a well-formed hello with a DNS name.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from kit.wire import tls_client_hello

from handyproxy import tunnel
from handyproxy.sniff import MORE
from handyproxy.sniff.tls import server_name


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec(2, body)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    """A server_name extension listing ``names``."""
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


SUPPORTED_VERSIONS = ext(43, vec(1, b"\x03\x04\x03\x03"))
ALPN = ext(16, vec(2, vec(1, b"h2") + vec(1, b"http/1.1")))


def hello_message(extensions: bytes | None, *, session_id: bytes = bytes(32)) -> bytes:
    """A ClientHello handshake message (type, 24-bit length, body)."""
    body = (
        b"\x03\x03"
        + bytes(range(32))
        + vec(1, session_id)
        + vec(2, b"\x13\x01\x13\x02\xc0\x2f")
        + vec(1, b"\x00")
        + (vec(2, extensions) if extensions is not None else b"")
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int | None = None, content_type: int = 0x16) -> bytes:
    """Wrap a handshake message in TLS records of at most ``size`` payload bytes."""
    size = size or len(message)
    out = b""
    for i in range(0, len(message), size):
        chunk = message[i : i + size]
        out += bytes([content_type, 3, 1]) + vec(2, chunk)
    return out


def hello(extensions: bytes | None, **kwargs: bytes) -> bytes:
    return records(hello_message(extensions, **kwargs))


def test_real_client_hello_gives_its_server_name() -> None:
    data = tls_client_hello("origin.example")
    assert data[0] == 0x16
    assert server_name(data) == "origin.example"


def test_real_client_hello_name_is_lower_cased() -> None:
    assert server_name(tls_client_hello("Origin.EXAMPLE")) == "origin.example"


def test_bytes_after_the_hello_do_not_matter() -> None:
    data = tls_client_hello("origin.example")
    assert server_name(data + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05hello") == (
        "origin.example"
    )


def test_real_client_hello_split_at_every_tcp_offset_asks_for_more_then_names() -> None:
    data = tls_client_hello("origin.example")
    for cut in range(len(data)):
        assert server_name(data[:cut]) is MORE, cut
    assert server_name(data) == "origin.example"


def real_message(name: str) -> bytes:
    data = tls_client_hello(name)
    assert int.from_bytes(data[3:5], "big") == len(data) - 5  # one record
    return data[5:]


@pytest.mark.parametrize("first", [1, 4, 5, 40, 200, -1])
def test_hello_split_across_two_tls_records_gives_the_name(first: int) -> None:
    message = real_message("origin.example")
    cut = first % len(message)
    data = records(message[:cut]) + records(message[cut:])
    assert server_name(data) == "origin.example"


@pytest.mark.parametrize("size", [1, 7, 100])
def test_hello_split_across_many_small_records_gives_the_name(size: int) -> None:
    assert server_name(records(real_message("origin.example"), size)) == "origin.example"


def test_two_record_hello_split_at_every_tcp_offset_asks_for_more_then_names() -> None:
    message = real_message("origin.example")
    data = records(message, 150)
    assert data.count(b"\x16\x03\x01") >= 3
    for cut in range(len(data)):
        assert server_name(data[:cut]) is MORE, cut
    assert server_name(data) == "origin.example"


def test_bytearray_input_works() -> None:
    assert server_name(bytearray(tls_client_hello("origin.example"))) == "origin.example"


def test_hand_built_hello_gives_its_name() -> None:
    data = hello(SUPPORTED_VERSIONS + sni(b"www.origin.example") + ALPN)
    assert server_name(data) == "www.origin.example"


def test_trailing_dot_is_dropped() -> None:
    assert server_name(hello(sni(b"origin.example."))) == "origin.example"


def test_first_host_name_entry_wins_after_other_name_types() -> None:
    entries = b"\x07" + vec(2, b"opaque") + b"\x00" + vec(2, b"origin.example")
    assert server_name(hello(ext(0, vec(2, entries)))) == "origin.example"


def test_real_client_hello_without_server_hostname_has_no_name() -> None:
    assert server_name(tls_client_hello(None)) is None


def test_real_client_hello_to_an_ip_address_has_no_name() -> None:
    assert server_name(tls_client_hello("198.51.100.7")) is None


@pytest.mark.parametrize(
    "extensions",
    [
        None,  # no extensions block at all
        b"",  # an empty one
        SUPPORTED_VERSIONS + ALPN,
        sni(),  # server_name with an empty list
        sni(b"origin.example", name_type=7),
    ],
)
def test_hello_without_a_host_name_gives_none(extensions: bytes | None) -> None:
    assert server_name(hello(extensions)) is None


@pytest.mark.parametrize(
    "name",
    [
        b"198.51.100.7",
        b"198.51.100.7.",
        b"2001:db8::1",
        b"[2001:db8::1]",
        b"127.1",
        b"",
        b"bad name.example",
        b"-lead.example",
        b"trail-.example",
        b"a..example",
        b"origin.example:443",
        b"caf\xc3\xa9.example",
        b"nul\x00.example",
        b"a" * 64 + b".example",
        b".".join([b"a" * 63] * 4),
    ],
)
def test_sni_that_is_not_a_dns_name_gives_none(name: bytes) -> None:
    assert server_name(hello(sni(name))) is None


def test_longest_valid_name_is_accepted() -> None:
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])
    assert len(name) == 253
    assert server_name(hello(sni(name))) == name.decode()


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def good() -> tuple[bytes, bytes]:
    """A hello and its extensions block, for the length-corruption tests."""
    extensions = SUPPORTED_VERSIONS + sni(b"origin.example") + ALPN
    return hello(extensions), extensions


def test_extension_block_length_past_the_message_gives_none() -> None:
    data, extensions = good()
    offset = len(data) - len(extensions) - 2
    assert server_name(corrupt(data, offset, (len(extensions) + 1).to_bytes(2, "big"))) is None


def test_server_name_length_past_its_extension_gives_none() -> None:
    data, _ = good()
    offset = data.index(b"origin.example") - 2
    assert server_name(corrupt(data, offset, b"\x00\xff")) is None


def test_server_name_list_length_past_its_extension_gives_none() -> None:
    data, _ = good()
    offset = data.index(b"origin.example") - 5
    assert data[offset : offset + 2] == (17).to_bytes(2, "big")
    assert server_name(corrupt(data, offset, b"\x01\x00")) is None


def test_extension_length_past_the_block_gives_none() -> None:
    data, _ = good()
    offset = data.index(b"origin.example") - 7
    assert server_name(corrupt(data, offset, b"\x7f\xff")) is None


def test_session_id_length_past_the_message_gives_none() -> None:
    message = hello_message(sni(b"origin.example"))
    message = corrupt(message, 4 + 34, b"\xff")
    assert server_name(records(message)) is None


def test_handshake_length_shorter_than_its_content_gives_none() -> None:
    message = hello_message(SUPPORTED_VERSIONS + sni(b"origin.example"))
    short = message[:1] + (len(message) - 4 - 10).to_bytes(3, "big") + message[4:]
    assert server_name(records(short)) is None


def test_handshake_message_cut_in_its_vectors_gives_none() -> None:
    message = hello_message(sni(b"origin.example"))
    for keep in (10, 40, 70, len(message) - 5):
        body = message[4:keep]
        truncated = b"\x01" + len(body).to_bytes(3, "big") + body
        assert server_name(records(truncated)) is None, keep


def test_handshake_length_longer_than_what_arrived_asks_for_more() -> None:
    message = hello_message(sni(b"origin.example"))
    longer = message[:1] + (len(message) - 4 + 100).to_bytes(3, "big") + message[4:]
    assert server_name(records(longer)) is MORE


@pytest.mark.parametrize(
    "data",
    [
        b"\x17\x03\x03\x00\x05hello",  # application data
        b"\x15\x03\x03\x00\x02\x02\x28",  # alert
        b"\x14\x03\x03\x00\x01\x01",  # change_cipher_spec
        b"\x80\x2e\x01\x00\x02",  # SSLv2-style hello
        b"\x16\x02\x00\x00\x05",  # record version 2.0
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\xff\xff",  # record beyond the TLS limit
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"GET / HTTP/1.1\r\nHost: origin.example\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x17",
        b"\x16\x04",
    ],
)
def test_bytes_that_are_not_a_client_hello_give_none(data: bytes) -> None:
    assert server_name(data) is None


def test_content_type_change_inside_a_split_hello_gives_none() -> None:
    message = real_message("origin.example")
    data = records(message[:100]) + records(message[100:], content_type=0x17)
    assert server_name(data) is None


def test_non_client_hello_handshake_split_over_records_gives_none() -> None:
    message = b"\x02" + real_message("origin.example")[1:]
    assert server_name(records(message, 50)) is None


@pytest.mark.parametrize(
    "prefix", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\x02", b"\x16\x03\x01\x02\x00"]
)
def test_a_record_header_not_yet_whole_asks_for_more(prefix: bytes) -> None:
    assert server_name(prefix) is MORE


# The sniff step of a tunnel, reading a real hello from a socketpair in pieces.


def sniff_from(
    pieces: list[bytes], timeout: float = 2.0, max_bytes: int = 8192
) -> tuple[bytes, str | None]:
    client, ours = socket.socketpair()
    ours.setblocking(False)

    async def main() -> tuple[bytes, str | None]:
        loop = asyncio.get_running_loop()

        async def send() -> None:
            for piece in pieces:
                await loop.sock_sendall(client, piece)
                await asyncio.sleep(0.01)  # the pace: each piece reaches the sniffer on its own

        client.setblocking(False)
        sender = asyncio.create_task(send())
        result = await tunnel.sniff(ours, timeout, max_bytes)
        await sender
        return result

    try:
        return asyncio.run(main())
    finally:
        client.close()
        ours.close()


def test_tunnel_sniff_reads_a_hello_sent_in_pieces_and_keeps_every_byte() -> None:
    data = records(real_message("origin.example"), 200)
    pieces = [data[:3], data[3:210], data[210:]]
    assert sniff_from(pieces) == (data, "origin.example")


def test_tunnel_sniff_gives_up_at_the_timeout_with_the_bytes_so_far() -> None:
    data = tls_client_hello("origin.example")
    assert sniff_from([data[:50]], timeout=0.2) == (data[:50], None)


def test_tunnel_sniff_stops_at_max_bytes() -> None:
    data = tls_client_hello("origin.example")
    first, name = sniff_from([data], max_bytes=100)
    assert (first, name) == (data[:100], None)
