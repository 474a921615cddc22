"""Both relays on real TCP sockets over loopback, on uvloop (what the forwarder runs).

What only a real kernel decides is tested here: the state a socket is in after its peer's
reset (shutdown(2) then fails with ENOTCONN), and the hand-over of the upstream socket's poll
registration from the set-up to the relay (``UpstreamPoll.hand_over``).
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import uvloop
from kit.waiting import until

from handyproxy.relay import RELAYS, load
from handyproxy.relay.base import RelayBase
from handyproxy.relay.copy import CopyRelay, Half
from handyproxy.relay.splice import Direction, PipePool, SpliceRelay
from handyproxy.sockets import LINGER_RESET, TCP_CLOSE, tcp_state
from handyproxy.tunnel import _unpark
from handyproxy.upstream.dial import UpstreamPoll

T = TypeVar("T")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1: (the peer, the relay's end), both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    for sock in (peer, ours):
        sock.setblocking(False)
    return peer, ours


def run(main: Callable[[], Awaitable[T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def test_a_client_reset_after_its_half_close_ends_the_splice_tunnel_as_client_reset() -> None:
    """Client sends FIN, then RST; the origin's FIN finds the client socket CLOSE.

    The splice relay's shutdown(SHUT_WR) of the client then fails with ENOTCONN: that is the
    client's reset, and the record must say so rather than ``error``.
    """
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)

    async def main() -> str | None:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = SpliceRelay(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None)
        client_app.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(loop.sock_recv(origin, 100), 5) == b""  # FIN forwarded
        client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client_app.close()  # RST
        await until(lambda: finished.done() or tcp_state(client_ours) == TCP_CLOSE, "reset")
        origin.shutdown(socket.SHUT_WR)
        done = await asyncio.wait_for(finished, 5)
        return done.end

    try:
        end = run(main)
    finally:
        for sock in socks:
            sock.close()
    assert end == "client-reset"


@pytest.mark.parametrize("name", sorted(RELAYS))
def test_the_relay_takes_over_the_set_ups_registration_and_bytes_flow(name: str) -> None:
    """The set-up leaves a reader parked on the upstream socket; start() hands it over.

    The origin has sent before the relay starts: its bytes must reach the client through the
    relay's own reader (splice: the same registration, taken over in place; copy: dropped, then
    a transport), and the set-up's object must no longer touch the descriptor afterwards.
    """
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)

    async def main() -> tuple[bytes, bytes, str | None]:
        loop = asyncio.get_running_loop()
        poll = UpstreamPoll(loop, upstream_ours.fileno())
        poll.want(write=True)  # connecting
        poll.want(write=False)  # the reply: a reader, left parked for the relay
        origin.sendall(b"banner")
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = load(name)(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, poll)
        poll.close()  # a no-op now: it must not take the relay's reader away
        got = b""
        while len(got) < 6:
            got += await asyncio.wait_for(loop.sock_recv(client_app, 100), 5)
        await loop.sock_sendall(client_app, b"ping")
        up = await asyncio.wait_for(loop.sock_recv(origin, 100), 5)
        client_app.shutdown(socket.SHUT_WR)
        origin.shutdown(socket.SHUT_WR)
        done = await asyncio.wait_for(finished, 5)
        return got, up, done.end

    try:
        got, up, end = run(main)
    finally:
        for sock in socks:
            sock.close()
    assert (got, up, end) == (b"banner", b"ping", "eof")


def test_only_the_splice_relay_counts_descriptors_and_its_pipes_go_back() -> None:
    """The server's descriptor budget asks the relay class: copy holds none beyond sockets,
    splice counts its own pool's pipes, which a drained tunnel gives back to the pool."""
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)
    pool = SpliceRelay.pool
    opened_before, free_before = pool.open, len(pool.free)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = SpliceRelay(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None)
        await loop.sock_sendall(client_app, b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(await asyncio.wait_for(loop.sock_recv(origin, 1 << 16), 5))
        client_app.shutdown(socket.SHUT_WR)
        origin.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(finished, 5)

    try:
        run(main)
    finally:
        for sock in socks:
            sock.close()
    assert CopyRelay.descriptors_in_use() == 0
    assert pool.open >= 1 or opened_before >= 1  # a pipe was used (or reused from before)
    assert SpliceRelay.descriptors_in_use() == 2 * pool.open
    assert len(pool.free) == pool.open  # every pipe is back, none is held by an ended tunnel
    assert len(pool.free) >= free_before


@pytest.mark.parametrize("more_before_relay", [False, True], ids=["quiet", "client-sent-more"])
@pytest.mark.parametrize("name", sorted(RELAYS))
def test_the_relay_takes_over_the_client_reader_sniffing_left(
    name: str, more_before_relay: bool
) -> None:
    """Sniffing leaves its reader parked on the client socket (``tunnel._Sniff``); the relay
    takes it over. If the client sends more first, the parked reader drops itself (a level-
    triggered reader would fire on every loop turn) and the relay registers afresh; the
    bytes are not lost either way."""
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)

    async def main() -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        cpoll = UpstreamPoll(loop, client_ours.fileno())
        cpoll.want(write=False)
        cpoll.watcher = _unpark
        if more_before_relay:
            client_app.sendall(b"early")
            await until(lambda: not cpoll.reading, "the parked reader dropped itself")
        dropped = not cpoll.reading
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = load(name)(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None, cpoll)
        await loop.sock_sendall(client_app, b"late")
        want = b"earlylate" if more_before_relay else b"late"
        got = b""
        while len(got) < len(want):
            got += await asyncio.wait_for(loop.sock_recv(origin, 100), 5)
        client_app.shutdown(socket.SHUT_WR)
        origin.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(finished, 5)
        return got, dropped

    try:
        got, dropped = run(main)
    finally:
        for sock in socks:
            sock.close()
    assert got == (b"earlylate" if more_before_relay else b"late")
    assert dropped == more_before_relay


@pytest.mark.parametrize("name", sorted(RELAYS))
def test_an_upstream_reset_before_the_hand_over_ends_the_tunnel_as_upstream_reset(
    name: str,
) -> None:
    """The origin resets while the set-up's reader is parked: the hand-over must leave the
    relay a registration that still wakes it, and its first read finds the reset (with the
    loop's own registrations uvloop reported the error once and closed the poll handle; the
    bug this guards against aborted the worker)."""
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)

    async def main() -> str | None:
        loop = asyncio.get_running_loop()
        poll = UpstreamPoll(loop, upstream_ours.fileno())
        woken: list[bool] = []
        poll.watcher = lambda _p: woken.append(True)
        poll.want(write=False)
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        origin.close()  # RST
        await until(lambda: bool(woken), "the parked reader saw the reset")
        await asyncio.sleep(0)  # one more turn with the error pending
        finished: asyncio.Future[RelayBase] = loop.create_future()
        relay = load(name)(finished.set_result, loop.time())
        await relay.start(loop, client_ours, upstream_ours, poll)
        done = await asyncio.wait_for(finished, 5)
        return done.end

    try:
        end = run(main)
    finally:
        for sock in socks:
            sock.close()
    assert end == "upstream-reset"


class _Owner:
    """Stands in for the tunnel: it holds its relay, and ``on_done`` is its bound method."""

    def __init__(self, done: asyncio.Future[str | None]) -> None:
        self.done = done
        self.relay: RelayBase | None = None

    def finished(self, relay: RelayBase) -> None:
        self.done.set_result(relay.end)


def _cyclic_garbage(kinds: tuple[type, ...], main: Callable[[], Awaitable[T]]) -> tuple[T, list]:
    """Run ``main`` with the cyclic collector off and return the objects of ``kinds`` that only
    the collector could free afterwards (reference counting frees the rest at once)."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = run(main)
        gc.collect()
        found = [obj for obj in gc.garbage if isinstance(obj, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    return result, [type(obj).__name__ for obj in found]


@pytest.mark.parametrize("ending", ["eof", "client-reset"])
@pytest.mark.parametrize("name", sorted(RELAYS))
def test_an_ended_tunnel_is_freed_without_the_cyclic_collector(name: str, ending: str) -> None:
    """An ended relay lets go of its tunnel and its halves of each other, so nothing of it waits
    for the cyclic collector, whose passes over a busy process stall every tunnel in it."""
    client_app, client_ours = tcp_pair()
    origin, upstream_ours = tcp_pair()
    socks = (client_app, client_ours, origin, upstream_ours)

    async def main() -> str | None:
        loop = asyncio.get_running_loop()
        owner = _Owner(loop.create_future())
        owner.relay = relay = load(name)(owner.finished, loop.time())
        await relay.start(loop, client_ours, upstream_ours, None)
        await loop.sock_sendall(client_app, b"ping")
        got = b""
        while len(got) < 4:
            got += await asyncio.wait_for(loop.sock_recv(origin, 100), 5)
        if ending == "eof":
            client_app.shutdown(socket.SHUT_WR)
            origin.shutdown(socket.SHUT_WR)
        else:
            client_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            client_app.close()
        return await asyncio.wait_for(owner.done, 5)

    try:
        end, garbage = _cyclic_garbage((RelayBase, _Owner, Direction, Half), main)
    finally:
        for sock in socks:
            sock.close()
    assert end == ending
    assert garbage == []


def test_the_pipe_pool_grows_only_a_few_pipes_big_and_forgets_their_size_when_closed() -> None:
    """The kernel charges every pipe's size to its user (``fs.pipe-user-pages-soft``), so the
    pool grows the first pipes of each tier and leaves the rest at the kernel's default."""
    page = os.sysconf("SC_PAGE_SIZE")
    pool = PipePool(tiers=((64 * page, 1), (32 * page, 2)), keep=0)
    pipes = [pool.get() for _ in range(4)]
    try:
        sizes = [fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) for _, w in pipes]
        assert sizes == [64 * page, 32 * page, 32 * page, 16 * page]  # 16 pages: the default
        pool.put(pipes.pop(0))  # keep=0: closed at once, and its big size is free again
        pipes.append(pool.get())
        assert fcntl.fcntl(pipes[-1][1], fcntl.F_GETPIPE_SZ) == 64 * page
        assert pool.per_tier == [1, 2]
    finally:
        for pipe in pipes:
            pool.discard(pipe)
    assert (pool.open, pool.per_tier, pool.sized) == (0, [0, 0], {})
