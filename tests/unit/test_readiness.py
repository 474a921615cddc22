"""handyproxy.readiness: the tunnels' own epoll behind one loop registration."""

from __future__ import annotations

import asyncio
import gc
import os
import socket

import pytest
import uvloop
from kit.waiting import until

from handyproxy import readiness


def run(main) -> None:  # type: ignore[no-untyped-def]
    uvloop.run(main())


def test_one_epoll_per_loop_made_on_first_use() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = readiness.of(loop)
        assert readiness.of(loop) is ready
        ready.close()
        assert readiness.of(loop) is not ready
        readiness.of(loop).close()

    run(main)


def test_reader_and_writer_wake_and_changes_reach_the_epoll() -> None:
    async def main() -> None:
        ready = readiness.of(asyncio.get_running_loop())
        a, b = socket.socketpair()
        a.setblocking(False)
        woke: list[str] = []
        try:
            ready.add_writer(a.fileno(), lambda: woke.append("w"))
            await until(lambda: "w" in woke)  # a fresh socket is writable
            ready.add_reader(a.fileno(), lambda: woke.append("r"))
            ready.remove_writer(a.fileno())
            assert ready.masks[a.fileno()] == readiness._IN
            woke.clear()
            b.send(b"x")
            await until(lambda: "r" in woke)
            assert "w" not in woke
            # Level-triggered: an unread byte wakes the reader again.
            count = len(woke)
            await until(lambda: len(woke) > count)
            assert ready.remove_reader(a.fileno())
            assert not ready.remove_reader(a.fileno())  # already gone: nothing to do
            assert a.fileno() not in ready.masks
        finally:
            a.close()
            b.close()
            ready.close()

    run(main)


def test_a_hang_up_wakes_both_and_a_callback_may_drop_the_other() -> None:
    async def main() -> None:
        ready = readiness.of(asyncio.get_running_loop())
        a, b = socket.socketpair()
        a.setblocking(False)
        fd = a.fileno()
        woke: list[str] = []

        def reader() -> None:
            woke.append("r")
            ready.remove_reader(fd)
            ready.remove_writer(fd)  # the writer must then not run in this turn

        try:
            ready.add_reader(fd, reader)
            ready.add_writer(fd, lambda: woke.append("w"))
            await until(lambda: "w" in woke)  # writable at once
            woke.clear()
            b.close()  # EOF and hang-up
            await until(lambda: "r" in woke)
            await asyncio.sleep(0)
            assert woke == ["r"]
            assert fd not in ready.masks
        finally:
            a.close()
            ready.close()

    run(main)


def test_a_callback_that_raises_is_reported_and_the_others_still_run() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = readiness.of(loop)
        reported: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        pairs = [socket.socketpair() for _ in range(2)]
        woke: list[int] = []

        def bad() -> None:
            raise ValueError("bug")

        try:
            first, second = pairs[0][0].fileno(), pairs[1][0].fileno()
            ready.add_writer(first, bad)
            ready.add_writer(second, lambda: woke.append(second))
            await until(lambda: woke and reported)
            assert isinstance(reported[0]["exception"], ValueError)
            assert str(first) in reported[0]["message"]
        finally:
            for s in (first, second):
                ready.remove_writer(s)
            for a, b in pairs:
                a.close()
                b.close()
            ready.close()

    run(main)


def test_a_registration_the_kernel_dropped_with_its_file_is_made_again() -> None:
    """A descriptor closed while registered (a bug elsewhere) leaves the epoll with its file;
    a new socket given the same number must still be registrable, not fail with ENOENT."""

    async def main() -> None:
        ready = readiness.of(asyncio.get_running_loop())
        a, b = socket.socketpair()
        fd = a.fileno()
        ready.add_reader(fd, lambda: None)
        a.close()
        b.close()
        c, d = socket.socketpair()
        try:
            if c.fileno() != fd:
                os.dup2(c.fileno(), fd)
                c.close()
                c = socket.socket(fileno=fd)
            woke: list[str] = []
            ready.add_writer(fd, lambda: woke.append("w"))  # modify() -> ENOENT -> register
            await until(lambda: woke)
            ready.remove_writer(fd)
            ready.remove_reader(fd)
            assert fd not in ready.masks
        finally:
            c.close()
            d.close()
            ready.close()

    run(main)


def test_a_freed_loop_takes_its_epoll_with_it() -> None:
    loop = uvloop.new_event_loop()
    ready = readiness.of(loop)
    epfd = ready.ep.fileno()
    assert os.readlink(f"/proc/self/fd/{epfd}") == "anon_inode:[eventpoll]"
    del ready
    loop.close()
    del loop
    gc.collect()
    assert len(readiness._ours) == 0
    with pytest.raises(OSError):
        os.readlink(f"/proc/self/fd/{epfd}")
