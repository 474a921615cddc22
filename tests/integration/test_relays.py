"""Every relay (splice, the default, and copy) keeps the same promises on the real path: every
byte in order both ways, the origin's first bytes, half-close, resets passed on as resets, and
the idle and half-close timers."""

from __future__ import annotations

import os
import socket
import time

import pytest
from kit.client import Client, host_of
from kit.waiting import wait_until
from kit.wire import (
    echo_exchange,
    expect_reset,
    recv_all,
    recv_until,
    recv_until_end,
    reset_close,
)

from handyproxy.lab.netns import CLIENT_V4, ORIGIN_V4, PROXY_PORT, UPSTREAM_V4
from handyproxy.sockets import TCP_ESTABLISHED, TCP_FIN_WAIT2, tcp_state

pytestmark = pytest.mark.integration

#: Fits what the forwarder takes in while its client does not read (a pipe, or the copy relay's
#: write buffer, plus socket buffers), and is more than the client's side can hold.
GONE_BODY = 160 * 1024
#: Fits the forwarder's socket buffer towards a client that does not read, so the forwarder
#: reads the upstream's FIN behind it at once.
SLOW_BODY = 32 * 1024


def test_bulk_bytes_arrive_intact_both_ways(
    relay, family, client: Client, start_origin, start_upstream, start_handyproxy
):
    """4 MiB up, then the echo origin's digest down: both directions byte-exact."""
    origin = start_origin("echo")
    start_upstream("builtin")
    forwarder = start_handyproxy(relay=relay)
    payload = os.urandom(4 * 1024 * 1024 + 7)

    with client.connect(family, origin.port) as sock:
        reply, expected = echo_exchange(sock, payload)

    assert reply == expected
    record = forwarder.access(f"dst={host_of(family)}:{origin.port} ")
    assert f"up={len(payload)} " in record
    assert f"down={len(reply)} " in record
    assert "end=eof" in record


def test_banner_in_the_same_read_as_the_200_reaches_the_client(
    relay, family, client: Client, start_origin, start_upstream, start_handyproxy
):
    origin = start_origin("banner")
    start_upstream("builtin", greedy=True)
    start_handyproxy(relay=relay)

    with client.connect(family, origin.port) as sock:
        assert recv_until(sock, b"\r\n") == b"220 origin.test banner\r\n"
        sock.sendall(b"QUIT\r\n")
        assert recv_all(sock) == b"221 bye\r\n"


def test_client_reset_is_passed_on_and_logged(
    relay, family, client: Client, start_origin, start_upstream, start_handyproxy
):
    origin = start_origin("echo")
    start_upstream("builtin")
    forwarder = start_handyproxy(relay=relay)

    sock = client.connect(family, origin.port)
    sock.sendall(b"x" * 1000)
    origin.log.wait_for("echo receiving")  # the bytes crossed: the relay carries the tunnel
    reset_close(sock)

    record = forwarder.access(f"dst={host_of(family)}:{origin.port} ")
    assert "end=client-reset" in record


def test_idle_tunnel_is_reset_after_idle_timeout(
    relay, client: Client, start_origin, start_upstream, start_handyproxy
):
    origin = start_origin("echo")
    start_upstream("builtin")
    forwarder = start_handyproxy(relay=relay, idle_timeout="1s")

    with client.connect(4, origin.port) as sock:
        sock.sendall(b"hello")
        waited = expect_reset(sock, timeout=8.0)

    assert 0.5 <= waited <= 4.0
    assert "end=idle-timeout" in forwarder.access(f"dst={host_of(4)}:{origin.port} ")


def test_quiet_half_closed_tunnel_is_reset_after_half_close_timeout(
    relay, client: Client, start_origin, start_upstream, start_handyproxy
):
    """The banner origin closes after a line that is not QUIT; the client keeps its side open
    and silent, so only the half-close timer can end the tunnel."""
    origin = start_origin("banner")
    start_upstream("builtin")
    forwarder = start_handyproxy(relay=relay, half_close_timeout="1s")

    with client.connect(4, origin.port) as sock:
        sock.sendall(b"NOOP\r\n")
        assert recv_all(sock) == b"220 origin.test banner\r\n"  # then the origin's FIN
        started = time.monotonic()
        record = forwarder.access(f"dst={host_of(4)}:{origin.port} ", timeout=8.0)
        waited = time.monotonic() - started

    assert "end=half-close-timeout" in record
    assert waited <= 4.0


def test_upstream_gone_after_its_fin_still_delivers_every_byte(
    request, relay, lab, upstream_listener, start_handyproxy
):
    """An upstream that sent everything and its FIN and is then gone (a proxy's FIN_WAIT2 socket
    times out after a minute; its kernel answers our next segment with a reset) while the client
    was not reading: its bytes are all here, so the client gets every one and a clean end, not a
    reset. The lifecycle Molecule scenario met this with tinyproxy and downloads held 65 s."""
    forwarder = start_handyproxy("-relay", relay)
    port = 20001
    client = lab.socket("client")
    request.addfinalizer(client.close)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client barely reads
    client.settimeout(5)
    client.connect((ORIGIN_V4, port))
    upstream, _ = upstream_listener.accept()
    request.addfinalizer(upstream.close)
    assert recv_until(upstream, b"\r\n\r\n").startswith(f"CONNECT {ORIGIN_V4}:{port} ".encode())
    body = os.urandom(GONE_BODY)
    upstream.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + body)
    upstream.shutdown(socket.SHUT_WR)
    # Everything and the FIN acknowledged by the forwarder's kernel, then the reset.
    wait_until(lambda: tcp_state(upstream) == TCP_FIN_WAIT2, what="the body and FIN acked")
    reset_close(upstream)
    wait_until(
        lambda: not lab.run(
            "router", ["ss", "-Htn", "dst", f"{UPSTREAM_V4}:{PROXY_PORT}"], capture_output=True,
            text=True, check=True,
        ).stdout.strip(),
        what="the forwarder's upstream socket reset",
    )  # fmt: skip
    # The case to prove: the forwarder still holds bytes for the client, so has not ended it.
    assert tcp_state(client) == TCP_ESTABLISHED

    data, how = recv_until_end(client)

    assert (how, len(data), data == body) == ("eof", len(body), True)
    record = forwarder.wait_record(lambda r: r["dst"] == f"{ORIGIN_V4}:{port}")
    assert (record["end"], record["down"]) == ("eof", str(len(body)))


def test_half_close_timer_waits_for_a_slow_client_to_take_the_last_bytes(
    request, relay, lab, upstream_listener, start_handyproxy
):
    """The upstream sent its last bytes and its FIN; the client takes longer than the
    half-close timeout to read them. The timer is for tunnels left half-open with nothing to
    carry, so it must not cut bytes still on their way: they all arrive, then a clean end.
    A second, finished tunnel opened later shows when the timer has had its chance."""
    forwarder = start_handyproxy("-relay", relay, "-half-close-timeout", "1s")

    def tunnel(port: int, body: bytes, rcvbuf: int = 0) -> socket.socket:
        client = lab.socket("client")
        request.addfinalizer(client.close)
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.settimeout(5)
        client.connect((ORIGIN_V4, port))
        upstream, _ = upstream_listener.accept()
        request.addfinalizer(upstream.close)
        assert recv_until(upstream, b"\r\n\r\n").startswith(f"CONNECT {ORIGIN_V4}:".encode())
        upstream.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + body)
        upstream.shutdown(socket.SHUT_WR)
        return client

    body = os.urandom(SLOW_BODY)
    slow = tunnel(20002, body, rcvbuf=4096)
    # The forwarder has read the upstream's FIN and passed it on behind the bytes: half-closed.
    wait_until(
        lambda: lab.run(
            "router", ["ss", "-Htn", "state", "fin-wait-1", "dst", CLIENT_V4], capture_output=True,
            text=True, check=True,
        ).stdout.strip(),
        what="the forwarder's FIN to the slow client queued",
    )  # fmt: skip
    done = tunnel(20003, b"x")
    assert recv_until_end(done) == (b"x", "eof")
    finished = forwarder.wait_record(lambda r: r["dst"] == f"{ORIGIN_V4}:20003", timeout=8)
    assert finished["end"] == "half-close-timeout"

    data, how = recv_until_end(slow)

    assert (how, len(data), data == body) == ("eof", len(body), True)
    slow.shutdown(socket.SHUT_WR)
    record = forwarder.wait_record(lambda r: r["dst"] == f"{ORIGIN_V4}:20002")
    assert (record["end"], record["down"]) == ("eof", str(len(body)))
