"""The relay's rules, driven by hand through the protocol callbacks with mock transports.

Every way a tunnel can end (FIN each way, RST from either side, idle, half-close) and the flow
control between the halves are decided here, so each rule gets a test that calls the callbacks
in the order the event loop would. The last test runs the same relay on real socketpairs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from handyproxy.relay import copy as relay_mod
from handyproxy.relay.base import RelayBase
from handyproxy.relay.copy import HIGH_WATER, LOW_WATER, CopyRelay


class MockTransport:
    """Records what the relay asks of a transport."""

    def __init__(self, name: str, fail_writes: bool = False) -> None:
        self.name = name
        self.fail_writes = fail_writes
        self.written: list[bytes] = []
        self.eof_written = 0
        self.closed = 0
        self.aborted = 0
        self.paused = False
        self.pause_calls = 0
        self.resume_calls = 0
        self.limits: tuple[int | None, int | None] | None = None
        self.buffered = 0  # what get_write_buffer_size() reports: bytes not yet handed on

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        if self.fail_writes:
            raise RuntimeError("transport is closed")
        self.written.append(bytes(data))

    def write_eof(self) -> None:
        self.eof_written += 1

    def close(self) -> None:
        self.closed += 1

    def abort(self) -> None:
        self.aborted += 1

    def is_closing(self) -> bool:
        return bool(self.closed or self.aborted)

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.resume_calls += 1

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return None if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Tunnel:
    """A relay joined to two mock transports the way ``CopyRelay.start`` joins real ones."""

    def __init__(self, now: float = 0.0, **transport_kwargs: bool) -> None:
        self.done: list[RelayBase] = []
        self.relay = CopyRelay(self.done.append, now)
        self.ct = MockTransport("client")
        self.ut = MockTransport("upstream", **transport_kwargs)
        self.relay.upstream.connection_made(self.ut)  # type: ignore[arg-type]
        self.relay.client.connection_made(self.ct)  # type: ignore[arg-type]
        self.relay.upstream.resume_reading()

    @property
    def client(self) -> relay_mod.Half:
        return self.relay.client

    @property
    def upstream(self) -> relay_mod.Half:
        return self.relay.upstream


def test_both_transports_get_the_write_buffer_limits() -> None:
    t = Tunnel()
    assert t.ct.limits == (HIGH_WATER, LOW_WATER)
    assert t.ut.limits == (HIGH_WATER, LOW_WATER)
    assert LOW_WATER < HIGH_WATER


def test_upstream_bytes_and_eof_held_before_the_client_exists_arrive_first_and_in_order() -> None:
    """uvloop may read before connection_made's pause takes effect, so a held upstream keeps
    what arrives and start() delivers it ahead of anything later, then passes the EOF on."""
    relay = CopyRelay(lambda r: None, 0.0)
    ut, ct = MockTransport("upstream"), MockTransport("client")
    relay.upstream.held = True
    relay.upstream.connection_made(ut)  # type: ignore[arg-type]
    relay.upstream.data_received(b"220 banner\r\n")
    relay.client.connection_made(ct)  # type: ignore[arg-type]
    relay.upstream.data_received(b"more")  # arrives after the client exists, still held
    relay.upstream.eof_received()
    assert ct.data == b""
    assert ct.eof_written == 0

    async def adopt() -> None:
        loop = FakeLoop()
        await relay.start(loop, None, None, None)  # type: ignore[arg-type]

    class FakeLoop:
        async def create_connection(self, factory, sock):
            return ut, factory()

        async def connect_accepted_socket(self, factory, sock):
            return ct, factory()

    asyncio.run(adopt())
    assert ct.data == b"220 banner\r\nmore"
    assert ct.eof_written == 1
    assert relay.bytes_down == len(b"220 banner\r\nmore")


def test_data_flows_both_ways_and_is_counted() -> None:
    t = Tunnel()
    t.client.data_received(b"GET / HTTP/1.1\r\n")
    t.client.data_received(b"\r\n")
    t.upstream.data_received(b"HTTP/1.1 200 OK\r\n\r\nhello")
    assert t.ut.data == b"GET / HTTP/1.1\r\n\r\n"
    assert t.ct.data == b"HTTP/1.1 200 OK\r\n\r\nhello"
    assert (t.relay.bytes_up, t.relay.bytes_down) == (18, 24)
    assert t.done == []


def test_seeded_bytes_count_towards_the_totals() -> None:
    t = Tunnel()
    t.relay.seed(517, 22)
    t.client.data_received(b"abc")
    assert (t.relay.bytes_up, t.relay.bytes_down) == (520, 22)


def test_full_upstream_buffer_pauses_client_reads_until_it_drains() -> None:
    t = Tunnel()
    t.upstream.pause_writing()
    assert t.ct.paused
    assert not t.ut.paused
    t.upstream.pause_writing()
    assert t.ct.pause_calls == 1  # idempotent
    t.upstream.resume_writing()
    assert not t.ct.paused
    assert t.ct.resume_calls == 1


def test_full_client_buffer_pauses_upstream_reads_until_it_drains() -> None:
    t = Tunnel()
    pauses, resumes = t.ut.pause_calls, t.ut.resume_calls
    t.client.pause_writing()
    assert t.ut.paused
    t.client.resume_writing()
    t.client.resume_writing()
    assert not t.ut.paused
    assert (t.ut.pause_calls, t.ut.resume_calls) == (pauses + 1, resumes + 1)


def test_client_eof_half_closes_upstream_and_the_answer_still_flows() -> None:
    t = Tunnel()
    t.client.data_received(b"request")
    assert t.client.eof_received() is True  # keep our write side open
    assert t.ut.eof_written == 1
    assert t.ct.eof_written == 0
    assert (t.ct.closed, t.ut.closed, t.ct.aborted, t.ut.aborted) == (0, 0, 0, 0)
    assert t.relay.half_closed
    t.upstream.data_received(b"answer")
    assert t.ct.data == b"answer"
    assert t.done == []


def test_upstream_eof_half_closes_client_and_uploads_still_flow() -> None:
    t = Tunnel()
    assert t.upstream.eof_received() is True
    assert t.ct.eof_written == 1
    assert t.ut.eof_written == 0
    t.client.data_received(b"more")
    assert t.ut.data == b"more"
    assert (t.ct.closed, t.ut.closed) == (0, 0)


def test_eof_both_ways_closes_both_with_fin_and_ends_eof() -> None:
    t = Tunnel()
    t.client.eof_received()
    t.upstream.eof_received()
    assert (t.ct.eof_written, t.ut.eof_written) == (1, 1)
    assert t.ct.closed >= 1
    assert t.ut.closed >= 1
    assert (t.ct.aborted, t.ut.aborted) == (0, 0)
    assert t.relay.end == "eof"
    assert t.done == []  # not until the sockets really closed
    t.client.connection_lost(None)
    assert t.done == []
    t.upstream.connection_lost(None)
    assert t.done == [t.relay]
    assert t.relay.end == "eof"


@pytest.mark.parametrize(
    ("side", "end"), [("client", "client-reset"), ("upstream", "upstream-reset")]
)
def test_a_reset_on_one_side_resets_the_other(side: str, end: str) -> None:
    t = Tunnel()
    half = getattr(t, side)
    peer_transport = t.ut if side == "client" else t.ct
    own_transport = t.ct if side == "client" else t.ut
    half.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert peer_transport.aborted == 1
    assert own_transport.aborted == 0
    assert t.relay.end == end
    assert t.done == []
    half.peer.connection_lost(None)  # the aborted transport reports its end without an error
    assert t.done == [t.relay]
    assert t.relay.end == end


def test_a_reset_after_a_half_close_still_resets_the_peer() -> None:
    t = Tunnel()
    t.client.eof_received()
    t.upstream.connection_lost(ConnectionResetError(104, "reset"))
    assert t.ct.aborted == 1
    assert t.relay.end == "upstream-reset"


def test_clean_close_of_one_side_closes_the_other_without_reset() -> None:
    t = Tunnel()
    t.client.connection_lost(None)
    assert t.ut.closed == 1
    assert t.ut.aborted == 0
    assert t.relay.end == "eof"


def test_on_done_runs_exactly_once_whatever_the_order() -> None:
    for first, second in (("client", "upstream"), ("upstream", "client")):
        t = Tunnel()
        getattr(t, first).connection_lost(OSError(32, "Broken pipe"))
        getattr(t, second).connection_lost(ConnectionResetError(104, "reset"))
        assert t.done == [t.relay]
        assert t.relay.end == f"{first}-reset"


def test_write_failure_on_the_peer_ends_the_tunnel_with_resets() -> None:
    t = Tunnel(fail_writes=True)
    t.client.data_received(b"data")
    assert (t.ct.aborted, t.ut.aborted) == (1, 1)
    assert t.relay.end == "error"


def test_flow_control_is_a_no_op_once_a_half_closed() -> None:
    t = Tunnel()
    t.client.connection_lost(None)
    t.upstream.pause_writing()  # would pause the client, which is gone
    assert t.ct.pause_calls == 0


def test_fail_before_the_upstream_exists_resets_only_the_client() -> None:
    relay = CopyRelay(lambda r: None, 0.0)
    ct = MockTransport("client")
    relay.client.connection_made(ct)  # type: ignore[arg-type]
    relay.fail(relay.client, "shutdown")
    assert ct.aborted == 1
    assert relay.end == "shutdown"


def ticks(t: Tunnel, idle: float, half: float) -> Callable[[float], None]:
    return lambda now: t.relay.check_timers(now, idle, half)


def test_idle_timeout_resets_both_sides() -> None:
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=10.0, half=0.0)
    for now in range(10):
        tick(float(now))
    assert (t.ct.aborted, t.ut.aborted) == (0, 0)
    tick(10.0)
    assert (t.ct.aborted, t.ut.aborted) == (1, 1)
    assert t.relay.end == "idle-timeout"


def test_traffic_either_way_restarts_the_idle_clock() -> None:
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=10.0, half=0.0)
    tick(0.0)
    tick(8.0)
    t.upstream.data_received(b"x")
    tick(9.0)
    tick(18.0)
    assert t.ct.aborted == 0
    t.client.data_received(b"y")
    tick(18.5)
    tick(28.0)
    assert t.ct.aborted == 0
    tick(28.5)
    assert t.ct.aborted == 1
    assert t.relay.end == "idle-timeout"


def test_half_close_timeout_ends_a_tunnel_stuck_after_one_eof() -> None:
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=0.0, half=5.0)
    tick(0.0)
    tick(100.0)
    assert t.ct.aborted == 0  # quiet but not half-closed: no idle timeout set
    t.client.eof_received()
    t.upstream.data_received(b"answer")
    tick(101.0)
    tick(105.0)
    assert t.ct.aborted == 0
    tick(106.0)
    assert (t.ct.aborted, t.ut.aborted) == (1, 1)
    assert t.relay.end == "half-close-timeout"


def test_half_close_timeout_counts_from_when_the_last_bytes_are_through() -> None:
    """The upstream's FIN is in but the slow client has not taken the bytes before it: not
    quiet, a reset would cut them. The timer starts once the buffer is empty."""
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=0.0, half=5.0)
    t.upstream.data_received(b"last bytes")
    t.upstream.eof_received()
    t.ct.buffered = 10
    tick(0.0)
    tick(50.0)
    assert t.ct.aborted == 0
    t.ct.buffered = 0  # emptied between the ticks at 50 and 51
    tick(51.0)
    tick(54.0)
    assert t.ct.aborted == 0
    tick(55.0)
    assert (t.ct.aborted, t.relay.end) == (1, "half-close-timeout")


def test_half_close_timeout_wins_over_a_longer_idle_timeout() -> None:
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=60.0, half=5.0)
    t.upstream.eof_received()
    tick(0.0)
    tick(5.0)
    assert t.relay.end == "half-close-timeout"


def test_zero_timeouts_never_end_a_tunnel() -> None:
    t = Tunnel(now=0.0)
    t.client.eof_received()
    tick = ticks(t, idle=0.0, half=0.0)
    for now in (0.0, 1e3, 1e6, 1e9):
        tick(now)
    assert (t.ct.aborted, t.ut.aborted) == (0, 0)
    assert t.relay.end is None


def test_first_end_reason_is_kept() -> None:
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=1.0, half=0.0)
    tick(0.0)
    tick(1.0)
    t.client.connection_lost(None)
    t.upstream.connection_lost(ConnectionResetError(104, "reset"))
    assert t.relay.end == "idle-timeout"
    assert t.done == [t.relay]


LOOPS = pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


def socketpairs() -> tuple[socket.socket, ...]:
    """client app, relay's client socket, origin (behind the proxy), relay's upstream socket."""
    client_app, client_ours = socket.socketpair()
    origin, upstream_ours = socket.socketpair()
    socks = (client_app, client_ours, origin, upstream_ours)
    for sock in socks:
        sock.setblocking(False)
    return socks


@LOOPS
def test_relay_on_real_socketpairs_half_closes_and_finishes(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The same rules through a real event loop: FIN one way, data the other, then the end."""
    socks = client_app, client_ours, origin, upstream_ours = socketpairs()

    async def main() -> tuple[bytes, bytes, RelayBase]:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = CopyRelay(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None)
        await loop.sock_sendall(client_app, b"request")
        client_app.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await loop.sock_recv(origin, 4096):
            got += chunk  # ends at the forwarded FIN
        await loop.sock_sendall(origin, b"answer" * 10000)
        origin.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := await loop.sock_recv(client_app, 65536):
            back += chunk
        done = await asyncio.wait_for(finished, 5)
        return got, back, done

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            got, back, done = runner.run(main())
    finally:
        for sock in socks:
            sock.close()
    assert got == b"request"
    assert back == b"answer" * 10000
    assert done.end == "eof"
    assert (done.bytes_up, done.bytes_down) == (7, 60000)


@LOOPS
def test_a_client_that_stops_reading_pauses_the_upstream_and_memory_stays_bounded(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    socks = client_app, client_ours, origin, upstream_ours = socketpairs()
    total = 8 * 1024 * 1024
    payload = bytes(range(256)) * (total // 256)

    async def main() -> tuple[bool, int, bytes]:
        loop = asyncio.get_running_loop()
        relay = CopyRelay(lambda r: None, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None)
        sender = asyncio.create_task(loop.sock_sendall(origin, payload))
        for _ in range(200):  # poll (at most 2 s) until the relay stops reading the upstream
            await asyncio.sleep(0.01)
            if relay.upstream.reading_paused:
                break
        await asyncio.sleep(0.1)  # a window: the origin keeps sending, the buffer must not grow
        paused = relay.upstream.reading_paused
        buffered = relay.client.transport.get_write_buffer_size()
        received = bytearray()
        while len(received) < total:
            received += await loop.sock_recv(client_app, 1 << 20)
        await sender
        relay.abort("test over")
        await asyncio.sleep(0)  # one turn of the loop: the aborted transports close
        return paused, buffered, bytes(received)

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            paused, buffered, received = runner.run(main())
    finally:
        for sock in socks:
            sock.close()
    assert paused
    assert buffered <= HIGH_WATER + 256 * 1024  # the high mark plus at most one read
    assert received == payload


def test_a_download_still_flowing_after_the_client_half_closed_is_not_cut() -> None:
    """The half-close clock runs on quiet time: a long answer to a half-closed request lives."""
    t = Tunnel(now=0.0)
    tick = ticks(t, idle=0.0, half=5.0)
    t.client.eof_received()
    for now in range(60):
        t.upstream.data_received(b"chunk")
        tick(float(now))
    assert (t.ct.aborted, t.ut.aborted) == (0, 0)
    assert t.relay.end is None
