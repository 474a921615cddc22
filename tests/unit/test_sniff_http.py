"""The Host header of a plain HTTP/1 request, by example.

Only a DNS name steers the tunnel; the port in ``Host: name:port`` never does, because the tunnel
must reach the port the client really connected to. Anything odd falls back to the original IP.
"""

from __future__ import annotations

import pytest

from handyproxy.sniff import MORE
from handyproxy.sniff.http import host_name

GET = b"GET /index.html HTTP/1.1\r\nHost: origin.example\r\nAccept: */*\r\n\r\n"


def test_get_with_host_gives_the_name() -> None:
    assert host_name(GET) == "origin.example"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: origin.example:8080\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: origin.example:1\r\n\r\n",
    ],
)
def test_port_in_host_is_ignored(request_bytes: bytes) -> None:
    assert host_name(request_bytes) == "origin.example"


@pytest.mark.parametrize("header", [b"host", b"HOST", b"hOsT"])
def test_header_name_is_case_insensitive(header: bytes) -> None:
    assert host_name(b"GET / HTTP/1.1\r\n" + header + b": origin.example\r\n\r\n") == (
        "origin.example"
    )


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\nHost: origin.example\r\n\r\n",
        b"GET / HTTP/1.1\nHost: origin.example\n\n",
        b"GET / HTTP/1.0\r\nHost:origin.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \t origin.example \t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: Origin.EXAMPLE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: origin.example.\r\n\r\n",
        b"POST /form HTTP/1.1\r\nHost: origin.example\r\nContent-Length: 3\r\n\r\na=b",
        b"OPTIONS * HTTP/1.1\r\nHost: origin.example\r\n\r\n",
        b"M-SEARCH * HTTP/1.1\r\nHost: origin.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: origin.example\r\n",  # header line whole, rest not yet
    ],
)
def test_common_request_shapes_give_the_name(request_bytes: bytes) -> None:
    assert host_name(request_bytes) == "origin.example"


def test_absolute_form_request_line_still_uses_the_host_header() -> None:
    data = b"GET http://origin.example/path?q=1 HTTP/1.1\r\nHost: origin.example\r\n\r\n"
    assert host_name(data) == "origin.example"


def test_bytearray_input_works() -> None:
    assert host_name(bytearray(GET)) == "origin.example"


def test_request_without_host_gives_none() -> None:
    assert host_name(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n") is None
    assert host_name(b"GET / HTTP/1.0\r\n\r\n") is None
    assert host_name(b"GET / HTTP/1.0\n\n") is None


def test_every_prefix_before_the_host_line_ends_asks_for_more() -> None:
    end = GET.index(b"origin.example\r\n") + len(b"origin.example\r\n")
    for cut in range(end):
        assert host_name(GET[:cut]) is MORE, cut
    for cut in range(end, len(GET) + 1):
        assert host_name(GET[:cut]) == "origin.example", cut


@pytest.mark.parametrize(
    "prefix",
    [b"", b"G", b"GE", b"GET", b"GET ", b"GET /", b"GET / HT", b"GET / HTTP/1.1\r"],
)
def test_request_line_split_asks_for_more(prefix: bytes) -> None:
    assert host_name(prefix) is MORE


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x16\x03\x01\x02\x00\x01",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x00\x00\x00\x01",
        b"get / HTTP/1.1\r\nHost: origin.example\r\n\r\n",  # methods are case-sensitive
        b"GET / HTTP/2.0\r\nHost: origin.example\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /\r\n",  # HTTP/0.9
        b"GET  / HTTP/1.1\r\nHost: origin.example\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: origin.example\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: origin.example\r\n\r\n",
        b"AVERYLONGMETHODNAMEXYZ / HTTP/1.1\r\n",
        b"AVERYLONGMETHODNAMEXYZ",
        b"220 smtp.example ESMTP\r\n",
        b"GET /\x00 HTTP/1.1",
    ],
)
def test_bytes_that_are_not_an_http1_request_give_none(request_bytes: bytes) -> None:
    assert host_name(request_bytes) is None


@pytest.mark.parametrize(
    "value",
    [
        b"[2001:db8::1]",
        b"[2001:db8::1]:8080",
        b"198.51.100.7",
        b"198.51.100.7:80",
        b"127.1",
        b"",
        b"origin example",
        b"origin.example:http",
        b"origin.example:80:80",
        b"user@origin.example",
        b"-lead.example",
        b"a" * 64 + b".example",
        b"caf\xc3\xa9.example",
    ],
)
def test_host_that_is_not_a_dns_name_gives_none(value: bytes) -> None:
    assert host_name(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n") is None


def test_folded_header_gives_none() -> None:
    data = b"GET / HTTP/1.1\r\nX-Long: a\r\n  b\r\nHost: origin.example\r\n\r\n"
    assert host_name(data) is None
    folded_host = b"GET / HTTP/1.1\r\nHost:\r\n origin.example\r\n\r\n"
    assert host_name(folded_host) is None


@pytest.mark.parametrize(
    "line",
    [b"No colon here", b"Bad Name: x", b": no name", b"Host : origin.example", b"\x00: x"],
)
def test_malformed_header_line_gives_none(line: bytes) -> None:
    assert host_name(b"GET / HTTP/1.1\r\n" + line + b"\r\nHost: origin.example\r\n\r\n") is None


def test_first_host_header_wins() -> None:
    data = b"GET / HTTP/1.1\r\nHost: first.example\r\nHost: second.example\r\n\r\n"
    assert host_name(data) == "first.example"
