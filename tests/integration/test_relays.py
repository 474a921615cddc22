"""Every relay (splice, the default, and copy) keeps the same promises on the real path: every
byte in order both ways, the origin's first bytes, half-close, resets passed on as resets, and
the idle and half-close timers."""

from __future__ import annotations

import os
import time

import pytest
from kit.client import Client, host_of
from kit.wire import echo_exchange, expect_reset, recv_all, recv_until, reset_close

pytestmark = pytest.mark.integration


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
