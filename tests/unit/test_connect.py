"""The CONNECT request and the parsing of the upstream's reply, by example.

The reply decides whether a client gets a tunnel or a reset, and the bytes after its header may
be the origin's banner (SSH, SMTP, FTP), which the original forwarder lost. The last tests run
the upstream set's dial and CONNECT exchange against a scripted upstream on a loopback port, for
the split reads, early closes and timeouts the parser alone cannot see.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from handyproxy import __version__, address, connect
from handyproxy.connect import MAX_REPLY_BYTES, ConnectError, ConnectReplyError, parse_reply
from handyproxy.upstream import Upstream, UpstreamSet, UpstreamSpec

AGENT = b"User-Agent: handyproxy/" + __version__.encode() + b"\r\n"


@pytest.mark.parametrize(
    ("host", "port", "target"),
    [
        ("origin.example", 443, b"origin.example:443"),
        ("198.51.100.7", 22, b"198.51.100.7:22"),
        ("2001:db8::7", 443, b"[2001:db8::7]:443"),
        ("::ffff:198.51.100.7", 80, b"[::ffff:198.51.100.7]:80"),
    ],
)
def test_build_request_is_one_exact_connect_with_host(host: str, port: int, target: bytes) -> None:
    assert connect.build_request(host, port) == (
        b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n" + AGENT + b"\r\n"
    )


def test_authority_brackets_only_ipv6() -> None:
    assert address.authority("2001:db8::1", 443) == "[2001:db8::1]:443"
    assert address.authority("198.51.100.1", 443) == "198.51.100.1:443"
    assert address.authority("origin.example", 8443) == "origin.example:8443"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", 200),
        (b"HTTP/1.0 200 Connection established\r\n\r\n", 200),
        (b"HTTP/1.1 200\r\n\r\n", 200),
        (b"HTTP/1.1 200 \r\n\r\n", 200),
        (b"HTTP/1.1 200 OK\r\nProxy-Agent: squid/5.7\r\nVia: 1.1 proxy\r\n\r\n", 200),
        (b"HTTP/1.1 200 OK\n\n", 200),
        (b"HTTP/1.1 200 OK\nVia: 1.1 proxy\n\n", 200),
        (b"HTTP/1.1 200 OK\r\nVia: 1.1 proxy\n\r\n", 200),
        (b"HTTP/1.1 201 Created\r\n\r\n", 201),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
        (b"HTTP/1.1 299 Whatever\r\n\r\n", 299),
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", 502),
        (b"HTTP/1.1 100 Continue\r\n\r\n", 100),
    ],
)
def test_parse_reply_returns_status_and_exact_header_length(reply: bytes, status: int) -> None:
    assert parse_reply(reply) == (status, len(reply))


def test_parse_reply_407_header_ends_before_its_body() -> None:
    header = (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="proxy"\r\n'
        b"Content-Type: text/html\r\nContent-Length: 24\r\n\r\n"
    )
    body = b"<h1>auth required</h1>\r\n"
    assert parse_reply(header + body) == (407, len(header))


@pytest.mark.parametrize(
    "banner",
    [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"220 mail.example ESMTP Postfix\r\n",
        b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"\x00\xff\n\n",
    ],
)
def test_bytes_after_the_header_are_left_exactly_as_they_came(banner: bytes) -> None:
    header = b"HTTP/1.1 200 Connection established\r\n\r\n"
    buf = header + banner
    status, length = parse_reply(buf)  # type: ignore[misc]
    assert status == 200
    assert buf[length:] == banner


def test_parse_reply_accepts_a_bytearray() -> None:
    assert parse_reply(bytearray(b"HTTP/1.1 200 OK\r\n\r\nSSH-")) == (200, 19)


REPLIES = [
    b"HTTP/1.1 200 Connection established\r\n\r\n",
    b"HTTP/1.0 200\n\n",
    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nProxy-Agent: tinyproxy/1.11.1\r\n\r\n",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_every_prefix_of_a_reply_header_asks_for_more(reply: bytes) -> None:
    for cut in range(len(reply)):
        assert parse_reply(reply[:cut]) is None, cut


@pytest.mark.parametrize("reply", REPLIES)
def test_a_header_split_at_any_byte_gives_the_same_answer_once_whole(reply: bytes) -> None:
    expected = parse_reply(reply)
    banner = b"SSH-2.0-x\r\n"
    for cut in range(len(reply) + 1):
        buf = bytearray()
        results = []
        for piece in (reply[:cut], reply[cut:] + banner):
            buf += piece
            results.append(parse_reply(buf))
        assert results[-1] == expected, cut
        assert bytes(buf[expected[1] :]) == banner  # type: ignore[index]


@pytest.mark.parametrize(
    "buf",
    [
        b"SSH-2",
        b"<html",
        b"\x16\x03\x01\x00\x05",
        b"http/1.1 200 OK\r\n",
        b"HTTPS/1.1 200 OK",
        b"GARBAGE\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_garbage_raises_as_soon_as_it_cannot_be_a_reply(buf: bytes) -> None:
    with pytest.raises(ConnectReplyError):
        parse_reply(buf)


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/2 200",
        b"HTTP/2.0 200 OK",
        b"HTTP/0.9 200 OK",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 OK 200",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1\t200 OK",
        b"HTTP/1.1 2a0 OK",
        b"HTTP/1.1 200OK",
        b" HTTP/1.1 200 OK",
    ],
)
def test_status_lines_that_are_not_http1_are_rejected(line: bytes) -> None:
    with pytest.raises(ConnectReplyError):
        parse_reply(line + b"\r\n\r\n")


def test_status_line_longer_than_the_limit_raises_before_its_end() -> None:
    buf = b"HTTP/1.1 200 " + b"x" * MAX_REPLY_BYTES
    with pytest.raises(ConnectReplyError):
        parse_reply(buf)


def test_header_without_an_end_raises_once_past_the_limit() -> None:
    buf = b"HTTP/1.1 200 OK\r\n"
    while len(buf) < MAX_REPLY_BYTES:
        buf += b"X-Padding: " + b"a" * 100 + b"\r\n"
    with pytest.raises(ConnectReplyError, match=str(MAX_REPLY_BYTES)):
        parse_reply(buf)


def _padded_reply(total: int) -> bytes:
    start = b"HTTP/1.1 200 OK\r\nX-Pad: "
    end = b"\r\n\r\n"
    return start + b"a" * (total - len(start) - len(end)) + end


def test_a_header_of_exactly_the_limit_is_accepted() -> None:
    reply = _padded_reply(MAX_REPLY_BYTES)
    assert parse_reply(reply + b"banner") == (200, MAX_REPLY_BYTES)


def test_a_header_one_byte_over_the_limit_is_refused() -> None:
    reply = _padded_reply(MAX_REPLY_BYTES + 1)
    with pytest.raises(ConnectReplyError):
        parse_reply(reply)


def test_connect_error_keeps_reason_and_status() -> None:
    exc = ConnectError("upstream refused the tunnel", 407)
    assert (exc.reason, exc.status, str(exc)) == ("upstream refused the tunnel", 407, exc.reason)
    assert ConnectError("timeout").status is None


# The CONNECT exchange, which feeds parse_reply from real reads. The upstream is a listening
# socket on a loopback port, scripted: it reads the request and answers in the given pieces.


def exchange(
    pieces: list[bytes],
    *,
    close: bool = False,
    dial_timeout: float = 5.0,
) -> tuple[tuple[int | None, bytes] | ConnectError, bytes]:
    """Run ``UpstreamSet.open`` against the script; return its outcome and the request."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    spec = UpstreamSpec("127.0.0.1", listener.getsockname()[1])
    upstreams = UpstreamSet([Upstream(spec)], dial_timeout=dial_timeout)

    async def upstream() -> tuple[bytes, socket.socket]:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(listener)
        request = await loop.sock_recv(conn, 4096)
        for piece in pieces:
            await loop.sock_sendall(conn, piece)
            await asyncio.sleep(0.005)
        if close:
            conn.shutdown(socket.SHUT_WR)
        return request, conn

    async def main() -> tuple[tuple[int | None, bytes] | ConnectError, bytes]:
        await upstreams.start(asyncio.get_running_loop())
        peer = asyncio.create_task(upstream())
        outcome: tuple[int | None, bytes] | ConnectError
        try:
            opened = await upstreams.open("origin.example", 22)
            opened.poll.close()
            opened.sock.close()
            outcome = (opened.status, opened.leftover)
        except ConnectError as exc:
            outcome = exc
        request, conn = await peer
        conn.close()
        upstreams.close()
        return outcome, request

    try:
        return asyncio.run(main())
    finally:
        listener.close()


def test_exchange_sends_the_request_and_keeps_the_banner_of_the_same_read() -> None:
    outcome, request = exchange(
        [b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-OpenSSH_9.2\r\n"]
    )
    assert request == connect.build_request("origin.example", 22)
    assert outcome == (200, b"SSH-2.0-OpenSSH_9.2\r\n")


def test_exchange_reassembles_a_reply_split_over_many_reads() -> None:
    reply = b"HTTP/1.1 200 OK\r\nProxy-Agent: p\r\n\r\n"
    pieces = [reply[i : i + 3] for i in range(0, len(reply) - 3, 3)]
    pieces.append(reply[len(pieces) * 3 :] + b"220 smtp ready\r\n")
    outcome, _ = exchange(pieces)
    assert outcome == (200, b"220 smtp ready\r\n")


@pytest.mark.parametrize("status", [200, 204, 299])
def test_exchange_opens_the_tunnel_on_any_2xx(status: int) -> None:
    outcome, _ = exchange([b"HTTP/1.0 %d Fine\n\n" % status])
    assert outcome == (status, b"")


@pytest.mark.parametrize("status", [407, 403, 502, 199, 300])
def test_exchange_refuses_a_non_2xx_reply_with_its_status(status: int) -> None:
    outcome, _ = exchange([b"HTTP/1.1 %d No\r\nContent-Length: 4\r\n\r\nbody" % status])
    assert isinstance(outcome, ConnectError)
    assert outcome.status == status


@pytest.mark.parametrize("sent", [[], [b"HTTP/1.1 200 OK\r\n"], [b"HTTP/1.1 20"]])
def test_exchange_fails_when_the_upstream_closes_before_the_reply_ends(sent: list[bytes]) -> None:
    outcome, _ = exchange(sent, close=True)
    assert isinstance(outcome, ConnectError)
    assert outcome.status is None
    assert "closed" in outcome.reason


def test_exchange_fails_on_garbage_without_waiting_for_the_timeout() -> None:
    started = time.monotonic()
    outcome, _ = exchange([b"SSH-2.0-OpenSSH\r\n"], dial_timeout=30.0)
    assert isinstance(outcome, ConnectError)
    assert outcome.status is None
    assert time.monotonic() - started < 5


def test_exchange_fails_on_an_oversized_header() -> None:
    outcome, _ = exchange(
        [b"HTTP/1.1 200 OK\r\n" + b"X-Pad: aaaaaaaa\r\n" * 2000], dial_timeout=30.0
    )
    assert isinstance(outcome, ConnectError)
    assert str(MAX_REPLY_BYTES) in outcome.reason


def test_exchange_times_out_when_the_upstream_never_answers() -> None:
    started = time.monotonic()
    outcome, _ = exchange([b"HTTP/1.1 200 OK\r\n"], dial_timeout=0.2)
    assert isinstance(outcome, ConnectError)
    assert "no answer" in outcome.reason
    assert 0.15 < time.monotonic() - started < 5


def test_the_request_carries_proxy_authorization_when_given() -> None:
    auth = connect.basic_authorization("alice", "pä:ss")
    assert auth == b"Basic YWxpY2U6cMOkOnNz"  # RFC 7617: UTF-8, then base64
    request = connect.build_request("origin.test", 443, auth)
    assert request == (
        b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n" + AGENT
        + b"Proxy-Authorization: Basic YWxpY2U6cMOkOnNz\r\n\r\n"
    )  # fmt: skip
    assert b"Proxy-Authorization" not in connect.build_request("origin.test", 443)


@pytest.mark.parametrize(
    ("headers", "schemes"),
    [
        (b'Proxy-Authenticate: Basic realm="corp"\r\n', ["Basic"]),
        (b"proxy-authenticate: NTLM\r\nProxy-Authenticate: Negotiate\r\n", ["NTLM", "Negotiate"]),
        (b'Proxy-Authenticate: Basic realm="a,b", NTLM\r\n', ["Basic", "NTLM"]),
        (b'Proxy-Authenticate: Digest realm="x", nonce="abc", qop="auth"\r\n', ["Digest"]),
        (b"Proxy-Authenticate:Basic\r\nProxy-Authenticate: Basic\r\n", ["Basic"]),
        (b"WWW-Authenticate: Basic\r\n", []),
        (b"", []),
    ],
)
def test_auth_schemes_names_only_the_schemes_a_407_asks_for(
    headers: bytes, schemes: list[str]
) -> None:
    header = b"HTTP/1.1 407 Proxy Authentication Required\r\n" + headers + b"\r\n"
    assert connect.auth_schemes(header) == schemes
