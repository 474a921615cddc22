"""Relay property, end to end: random chunk sizes, random pauses, half-closes in either order,
through the real forwarder on the lab's REDIRECT path; the bytes each side receives are exactly
the bytes the other side sent, and the access record counts them.

The test process plays both ends: the client (a socket in the client namespace) and the upstream
proxy (a listening socket in the upstream namespace that answers the CONNECT itself and then acts
as the origin). Hypothesis chooses the script; a failing script is shrunk to a minimal one.
"""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.wire import recv_until_end

from handyproxy.lab.netns import ORIGIN_V4

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLY = b"HTTP/1.1 200 Connection established\r\n\r\n"
_ports = itertools.count(20000)  # a fresh destination port per example names its record

steps = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["client", "origin"]), st.integers(min_value=1, max_value=200_000)
        ),
        st.tuples(st.just("pause"), st.integers(min_value=0, max_value=30)),
        st.tuples(st.sampled_from(["shut-client", "shut-origin"]), st.just(0)),
    ),
    max_size=12,
)


class Reader(threading.Thread):
    """Drain one socket until EOF so flow control never deadlocks the sender."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.end = "running"

    def run(self) -> None:
        self.sock.settimeout(30)
        try:
            while chunk := self.sock.recv(262144):
                self.data += chunk
            self.end = "eof"
        except OSError as exc:
            self.end = type(exc).__name__


@pytest.fixture
def tunnel_factory(lab, relay, upstream_listener, start_handyproxy):
    """Returns ``open(port, banner) -> (client_sock, origin_sock)`` plus the forwarder."""
    listener = upstream_listener
    fwd = start_handyproxy("-relay", relay, "-half-close-timeout", "0")

    def open_tunnel(
        port: int, banner: bytes, rest: bytes = b"", fin: bool = False
    ) -> tuple[socket.socket, socket.socket]:
        client = lab.connect("client", ORIGIN_V4, port)
        origin, _ = listener.accept()
        origin.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = origin.recv(4096)
            assert chunk, "forwarder closed before sending its CONNECT"
            head += chunk
        assert head.startswith(f"CONNECT {ORIGIN_V4}:{port} HTTP/1.1\r\n".encode())
        assert head.endswith(b"\r\n\r\n"), "bytes after the CONNECT header before the reply"
        origin.sendall(REPLY + banner)  # the origin's first bytes ride with the reply
        if rest:
            origin.sendall(rest)
        if fin:
            origin.shutdown(socket.SHUT_WR)
        return client, origin

    return open_tunnel, fwd


@given(
    script=steps,
    banner=st.binary(max_size=600),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_relay_delivers_exactly_the_bytes_sent_both_ways(tunnel_factory, script, banner, seed):
    open_tunnel, fwd = tunnel_factory
    rng = random.Random(seed)
    port = next(_ports)
    client, origin = open_tunnel(port, banner)
    readers = {"client": Reader(client), "origin": Reader(origin)}
    for reader in readers.values():
        reader.start()
    sent = {"client": bytearray(), "origin": bytearray(banner)}
    shut = set()
    socks = {"client": client, "origin": origin}
    for op, n in script:
        if op == "pause":
            time.sleep(n / 1000)  # a scripted pause: one of the timings hypothesis varies
        elif op.startswith("shut-"):
            side = op[5:]
            if side not in shut:
                socks[side].shutdown(socket.SHUT_WR)
                shut.add(side)
        elif op not in shut:
            data = rng.randbytes(n)
            socks[op].sendall(data)
            sent[op] += data
    for side in ("origin", "client"):
        if side not in shut:
            socks[side].shutdown(socket.SHUT_WR)
    for reader in readers.values():
        reader.join(30)
    client.close()
    origin.close()
    assert readers["client"].end == "eof"
    assert readers["origin"].end == "eof"
    assert bytes(readers["origin"].data) == bytes(sent["client"])
    assert bytes(readers["client"].data) == bytes(sent["origin"])
    record = fwd.wait_record(lambda r: r["dst"] == f"{ORIGIN_V4}:{port}", timeout=10)
    assert (record["end"], record["up"], record["down"]) == (
        "eof",
        str(len(sent["client"])),
        str(len(sent["origin"])),
    )


def test_origin_that_closes_right_after_the_reply_gives_the_client_fin(tunnel_factory):
    """A banner and FIN in the reply's segment (SMTP "421 busy"): the client sees both, no RST."""
    open_tunnel, fwd = tunnel_factory
    for _ in range(20):
        port = next(_ports)
        client, origin = open_tunnel(port, b"421 too busy\r\n")
        origin.shutdown(socket.SHUT_WR)
        data, how = recv_until_end(client, timeout=5)
        client.close()
        origin.close()
        assert (data, how) == (b"421 too busy\r\n", "eof")
        record = fwd.wait_record(lambda r, port=port: r["dst"] == f"{ORIGIN_V4}:{port}")
        assert record["end"] == "eof"


def test_burst_and_fin_right_after_the_reply_reach_a_client_that_already_half_closed(
    tunnel_factory,
):
    """The shrunk example of a hypothesis failure: 12 banner bytes with the 200, 161,765 more,
    16 more, FIN, while the client has already sent its FIN. The client must get every byte."""
    open_tunnel, _ = tunnel_factory
    for i in range(10):
        rng = random.Random(i)
        banner, burst, tail = rng.randbytes(12), rng.randbytes(161_765), rng.randbytes(16)
        port = next(_ports)
        # All of it, and the FIN, arrive while the forwarder is still setting the relay up.
        client, origin = open_tunnel(port, banner, burst + tail, fin=True)
        reader = Reader(client)
        reader.start()
        client.shutdown(socket.SHUT_WR)
        reader.join(15)
        client.close()
        origin.close()
        assert reader.end == "eof"
        got = bytes(reader.data)
        assert got == banner + burst + tail, f"run {i}: {len(got)} of {12 + 161_765 + 16} bytes"
