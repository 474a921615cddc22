"""The sniffers as incremental parsers: pieces give the answer the whole gives, and the work
stays linear in the bytes however they are cut.

A client may dribble its first bytes one per segment (up to ``-sniff-max-bytes``, 1 MiB); a
parser that starts again from the first byte on every read turns that into quadratic CPU on
the event loop. The work counter (``Sniffer.work``: bytes scanned, matched or copied) is what
the regression tests bound, never a clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.wire import tls_client_hello
from test_properties_sniff import client_hello, records

from handyproxy.sniff import MORE, Sniffer
from handyproxy.sniff.http import HostSniffer, host_name
from handyproxy.sniff.tls import ClientHelloSniffer, server_name

HTTP_CASES = [
    b"GET /index.html HTTP/1.1\r\nUser-Agent: curl/8.0\r\nHost: origin.example:8080\r\n\r\n",
    b"GET / HTTP/1.1\nHost: origin.example\n\n",
    b"POST /form HTTP/1.1\r\nContent-Length: 3\r\n\r\na=b",  # no Host
    b"GET / HTTP/1.1\r\n folded: header\r\nHost: origin.example\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: origin.example\r\n\r\n",  # lower-case method: not HTTP/1
    b"GET /\x01 HTTP/1.1\r\nHost: origin.example\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 3000 + b"\r\nHost: late.example\r\n\r\n",
]
TLS_CASES = [
    tls_client_hello("origin.example"),
    tls_client_hello(None),
    records(client_hello(b"split.example", padding=2000), [100, 1, 700]),
    records(client_hello(b"ext.example", extra_ext_first=True), [5]),
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a ServerHello: not ours to read
    b"\x16\x03\x01\x00\x00",  # an empty record
]
PARSERS = [
    pytest.param(HostSniffer, host_name, case, id=f"http{i}") for i, case in enumerate(HTTP_CASES)
] + [
    pytest.param(ClientHelloSniffer, server_name, case, id=f"tls{i}")
    for i, case in enumerate(TLS_CASES)
]


def fed(cls: type[Sniffer], pieces: list[bytes]) -> tuple[object, Sniffer]:
    sniffer = cls()
    answer: object = MORE
    for piece in pieces:
        answer = sniffer.feed(piece)
    return answer, sniffer


@pytest.mark.parametrize(("cls", "whole", "data"), PARSERS)
def test_a_split_at_every_offset_gives_the_answer_of_the_whole(cls, whole, data: bytes) -> None:
    expected = whole(data)
    for cut in range(len(data) + 1):
        first, rest = data[:cut], data[cut:]
        sniffer = cls()
        early = sniffer.feed(first)
        assert early == whole(first), cut  # each prefix answers as the function does
        assert sniffer.feed(rest) == expected, cut


@pytest.mark.parametrize(("cls", "whole", "data"), PARSERS)
def test_one_byte_at_a_time_gives_the_answer_of_the_whole(cls, whole, data: bytes) -> None:
    answer, _ = fed(cls, [data[i : i + 1] for i in range(len(data))])
    assert answer == whole(data)


def test_a_final_answer_is_kept_and_later_bytes_are_not_looked_at() -> None:
    sniffer = HostSniffer()
    assert sniffer.feed(b"GET / HTTP/1.1\r\nHost: origin.example\r\n") == "origin.example"
    work = sniffer.work
    assert sniffer.feed(b"Host: other.example\r\n" * 100) == "origin.example"
    assert sniffer.work == work


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
@settings(max_examples=300)
def test_any_cuts_of_any_bytes_agree_with_the_whole(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    for cls, whole in ((HostSniffer, host_name), (ClientHelloSniffer, server_name)):
        assert fed(cls, pieces)[0] == whole(data)


# Work, counted: an 8 KiB first flight sent one byte per segment.

SIZE = 8192


def dribble(cls: type[Sniffer], data: bytes) -> tuple[object, int]:
    answer, sniffer = fed(cls, [data[i : i + 1] for i in range(len(data))])
    return answer, sniffer.work


def test_an_http_request_dribbled_a_byte_at_a_time_costs_linear_work() -> None:
    pads = b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"v" * 60) for i in range(112))
    data = b"GET / HTTP/1.1\r\n" + pads + b"Host: late.example\r\n\r\n"
    assert len(data) >= SIZE - 100
    answer, work = dribble(HostSniffer, data)
    assert answer == "late.example"
    # Each byte scanned for the newline once and matched once in its line: about 2 per byte.
    # Re-parsing the buffer on every read would be about len(data)**2 / 2 (33 million here).
    assert work <= 3 * len(data)


def test_a_request_line_dribbled_a_byte_at_a_time_costs_linear_work() -> None:
    data = b"GET /" + b"a" * (SIZE - 20) + b" HTTP/1.1\r\nHost: origin.example\r\n\r\n"
    answer, work = dribble(HostSniffer, data)
    assert answer == "origin.example"
    assert work <= 3 * len(data)


def test_a_client_hello_dribbled_a_byte_at_a_time_costs_linear_work() -> None:
    data = records(client_hello(b"origin.example", padding=SIZE - 200), [])
    assert len(data) >= SIZE - 100
    answer, work = dribble(ClientHelloSniffer, data)
    assert answer == "origin.example"
    # Each payload byte copied once, then the whole message parsed once.
    assert work <= 3 * len(data)


def test_a_hello_in_one_byte_records_costs_linear_work() -> None:
    data = records(client_hello(b"origin.example", padding=1500), [1] * 2000)
    answer, work = dribble(ClientHelloSniffer, data)
    assert answer == "origin.example"
    assert work <= 3 * len(data)
