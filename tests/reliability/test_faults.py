"""Faults in the middle of a tunnel: the other side is told with a reset, never a clean FIN that
would pass a truncated transfer off as complete, and both descriptors are released.

Each test measures the forwarder's descriptor count when idle, breaks one side of a running
tunnel, then checks what the other side saw, the access record's ``end=`` and that the count is
back where it started.
"""

from __future__ import annotations

import socket
import time

import pytest
from kit.wire import recv_until_end, reset_close

from handyproxy.lab.netns import ORIGIN_V4
from handyproxy.lab.origin import payload

pytestmark = pytest.mark.integration


def test_upstream_reset_mid_tunnel_resets_client(
    lab, start_upstream, start_handyproxy, relay, family
):
    upstream = start_upstream("builtin", mode="echo", fault="reset", after=3000)
    fwd = start_handyproxy("-relay", relay)
    baseline = fwd.fd_count()
    sock = lab.connect("client", lab.address("origin", family), 5000)
    sock.sendall(b"a" * 1000)
    assert sock.recv(4096)  # the tunnel works before the fault
    sock.sendall(b"b" * 5000)
    data, how = recv_until_end(sock, timeout=5)
    sock.close()
    assert how == "reset", f"client saw {how} after {len(data)} bytes"
    record = fwd.wait_record()
    assert record["end"] == "upstream-reset"
    assert record["status"] == "200"
    upstream.wait_event("fault")
    assert fwd.wait_fds(baseline) == baseline
    assert fwd.alive()


def test_upstream_dying_mid_tunnel_resets_client(lab, start_upstream, start_handyproxy, relay):
    """The proxy process crashes holding unread bytes, so its kernel resets the connection.

    The client sends everything first and only then reads, so the one ECONNRESET the kernel
    reports goes to the read we assert on (a concurrent sender could swallow it).
    """
    start_upstream("builtin", mode="echo", fault="die", after=50_000)
    fwd = start_handyproxy("-relay", relay)
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 5001)
    try:
        sock.sendall(b"u" * 300_000)
    except ConnectionResetError:
        data, how = b"", "reset"
    else:
        data, how = recv_until_end(sock, timeout=8)
    sock.close()
    assert how == "reset", f"client saw {how} after {len(data)} bytes"
    record = fwd.wait_record()
    assert record["end"] == "upstream-reset"
    assert fwd.wait_fds(baseline) == baseline
    assert fwd.alive()


def test_upstream_stalling_mid_tunnel_is_reset_both_ways_at_idle_timeout(
    lab, start_upstream, start_handyproxy, relay
):
    upstream = start_upstream("builtin", mode="echo", fault="stall", after=100)
    fwd = start_handyproxy("-relay", relay, "-idle-timeout", "2s")
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 5002)
    started = time.monotonic()
    sock.sendall(b"x" * 200)
    _data, how = recv_until_end(sock, timeout=10)
    elapsed = time.monotonic() - started
    sock.close()
    assert how == "reset"
    assert 1.5 <= elapsed <= 5.0, elapsed
    assert fwd.wait_record()["end"] == "idle-timeout"
    end = upstream.wait_event("end", timeout=5)
    assert end["end"] == "reset", end
    assert fwd.wait_fds(baseline) == baseline


def test_origin_reset_mid_download_resets_client(
    lab, start_upstream, start_origin, start_handyproxy, relay, family
):
    start_upstream("builtin")
    start_origin("http")
    fwd = start_handyproxy("-relay", relay)
    baseline = fwd.fd_count()
    sock = lab.connect("client", lab.address("origin", family), 80)
    sock.sendall(b"GET /dl?size=2000000&seed=7&reset=300000 HTTP/1.0\r\n\r\n")
    data, how = recv_until_end(sock, timeout=10)
    sock.close()
    assert how == "reset", f"client saw {how} after {len(data)} bytes"
    body = data.partition(b"\r\n\r\n")[2]
    assert len(body) <= 300_000
    assert body == payload(7, 2_000_000)[: len(body)]  # what arrived is intact
    assert fwd.wait_record()["end"] == "upstream-reset"
    assert fwd.wait_fds(baseline) == baseline


def test_client_reset_mid_download_resets_upstream_side(
    lab, start_upstream, start_origin, start_handyproxy, relay
):
    upstream = start_upstream("builtin")
    start_origin("http")
    fwd = start_handyproxy("-relay", relay)
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 80)
    sock.sendall(b"GET /dl?size=5000000&seed=1&rate=500000 HTTP/1.0\r\n\r\n")
    got = 0
    while got < 100_000:
        got += len(sock.recv(65536))
    reset_close(sock)
    assert fwd.wait_record()["end"] == "client-reset"
    end = upstream.wait_event("end", timeout=5)
    assert end["end"] == "reset", f"upstream saw {end['end']}, not a reset"
    assert fwd.wait_fds(baseline) == baseline


@pytest.mark.fresh_lab  # it takes the client's link down
def test_client_vanishing_without_fin_is_reset_at_idle_timeout(
    lab, start_upstream, start_handyproxy, relay
):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-relay", relay, "-idle-timeout", "2s")
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 5003)
    sock.sendall(b"hello")
    assert sock.recv(100) == b"hello"
    assert fwd.fd_count() == baseline + 2  # client and upstream sockets
    # The client's host disappears: no FIN, no RST, nothing ever again.
    lab.run("client", ["ip", "link", "set", lab.device("client", "router"), "down"], check=True)
    vanished = time.monotonic()
    record = fwd.wait_record(timeout=10)
    assert record["end"] == "idle-timeout"
    assert time.monotonic() - vanished <= 5.0
    end = upstream.wait_event("end", timeout=5)
    assert end["end"] == "reset", f"upstream saw {end['end']}, not a reset"
    assert fwd.wait_fds(baseline) == baseline
    sock.close()


def test_client_half_close_then_silence_is_reset_at_half_close_timeout(
    lab, start_upstream, start_handyproxy, relay
):
    """A client that sends FIN while the server never closes cannot pin descriptors forever."""
    upstream = start_upstream("builtin", mode="hold")
    fwd = start_handyproxy("-relay", relay, "-half-close-timeout", "2s")
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 5004)
    sock.sendall(b"last words")
    sock.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    _data, how = recv_until_end(sock, timeout=10)
    sock.close()
    assert how == "reset", f"client saw {how}"
    assert 1.5 <= time.monotonic() - started <= 5.0
    record = fwd.wait_record()
    assert record["end"] == "half-close-timeout"
    assert record["up"] == "10"
    end = upstream.wait_event("end", timeout=5)
    assert (end["end"], end["up"]) == ("reset", "10")
    assert fwd.wait_fds(baseline) == baseline
