"""Property tests for the CONNECT reply parser.

The upstream proxy (or whatever answers on its address) decides these bytes. The parser must give
the same answer however the reply is split into reads, keep the origin's first bytes that follow
the header, and stop a header that never ends or grows without bound.
"""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from handyproxy import connect

LIMIT = connect.MAX_REPLY_BYTES

reason = st.from_regex(r"[\x20-\x7e]{0,30}", fullmatch=True)
header_line = st.from_regex(r"[A-Za-z-]{1,20}: [\x20-\x7e]{0,60}", fullmatch=True)


@st.composite
def replies(draw: st.DrawFn) -> tuple[bytes, int]:
    """A well-formed reply header and its status."""
    status = draw(st.integers(min_value=100, max_value=999))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    text = draw(reason).encode()
    first = version + b" %d" % status + (b" " + text if text or draw(st.booleans()) else b"")
    lines = [first, *(h.encode() for h in draw(st.lists(header_line, max_size=6)))]
    return eol.join(lines) + eol + eol, status


@given(replies(), st.binary(max_size=200))
@settings(max_examples=200)
def test_reply_header_length_leaves_the_origin_bytes_untouched(
    reply: tuple[bytes, int], origin: bytes
) -> None:
    header, status = reply
    assert connect.parse_reply(header + origin) == (status, len(header))


@given(replies(), st.binary(max_size=50), st.data())
@settings(max_examples=200)
def test_every_prefix_of_a_reply_header_is_incomplete(
    reply: tuple[bytes, int], origin: bytes, data: st.DataObject
) -> None:
    header, _ = reply
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    assert connect.parse_reply(header[:cut]) is None


@given(st.binary(max_size=300))
@settings(max_examples=1000)
def test_parse_reply_on_noise_returns_none_a_bounded_header_or_its_own_error(data: bytes) -> None:
    for buf in (data, b"HTTP/1.1 200 OK\r\n" + data, b"HTTP/1.1 " + data):
        try:
            result = connect.parse_reply(buf)
        except connect.ConnectReplyError:
            continue
        if result is None:
            assert len(buf) <= LIMIT
            continue
        status, length = result
        assert 100 <= status <= 999
        assert 0 < length <= min(len(buf), LIMIT)
        assert buf[:length].endswith(b"\n")


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=100))
@settings(max_examples=500)
def test_a_decided_reply_does_not_change_when_more_bytes_arrive(data: bytes, more: bytes) -> None:
    for buf in (data, b"HTTP/1.1 200 OK\r\n" + data):
        try:
            first = connect.parse_reply(buf)
        except connect.ConnectReplyError:
            try:
                connect.parse_reply(buf + more)
            except connect.ConnectReplyError:
                continue
            raise AssertionError("garbage became a valid reply when more bytes came") from None
        if first is not None:
            assert connect.parse_reply(buf + more) == first


@given(
    st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 ", b"HTTP/1.", b""]),
    st.sampled_from([b"X-Pad: " + b"a" * 100 + b"\r\n", b"a", b"\r", b" "]),
    st.integers(min_value=0, max_value=200),
)
@settings(max_examples=200)
def test_header_that_never_ends_is_refused_once_past_the_limit(
    start: bytes, filler: bytes, extra: int
) -> None:
    buf = start + filler * (LIMIT // len(filler) + 1) + b"x" * extra
    assume(len(buf) > LIMIT)
    try:
        result = connect.parse_reply(buf)
    except connect.ConnectReplyError:
        return
    raise AssertionError(f"{len(buf)} bytes without an end of header gave {result!r}")


@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40))
@settings(max_examples=200)
def test_reply_fed_in_random_reads_is_decided_at_the_same_byte(sizes: list[int]) -> None:
    """The forwarder re-parses its growing buffer after every read; the split must not matter."""
    header = b"HTTP/1.0 200 Connection established\r\nProxy-Agent: x\r\n\r\n"
    wire = header + b"SSH-2.0-banner\r\n"
    buf = b""
    pos = 0
    result = None
    for size in [*sizes, len(wire)]:
        buf += wire[pos : pos + size]
        pos += size
        result = connect.parse_reply(buf)
        if result is not None:
            break
    assert result == (200, len(header))
    assert buf[len(header) :] == wire[len(header) : len(buf)]
