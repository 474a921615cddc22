"""Zero-copy relay: bytes move socket → pipe → socket inside the kernel with splice(2).

The copying relay (copy.py) pays for every byte twice: into a Python object and out again. Here
the payload never enters user space; Python only decides when to move it. Pipes are taken from a
small pool when a direction has bytes to move and given back as soon as it is drained, so idle
tunnels hold no pipe at all. Flow control is the pipe itself: while a destination cannot take
more, the source is not read, so memory stays bounded by one pipe per busy direction.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import ClassVar

from handyproxy import readiness
from handyproxy.relay.base import Registration, RelayBase
from handyproxy.sockets import (
    PEER_RESETS,
    TCP_CLOSE,
    keep_socket,
    reset_after_fin,
    reset_socket,
    tcp_state,
    unacked,
)

#: Pipe sizes, largest first, and how many pipes of each size one process may hold. A bigger
#: pipe moves more per wake-up (one bulk stream: 1 MiB measured 5-20 % less CPU per GiB than
#: 256 KiB, from fewer wake-ups and splice calls), but the kernel charges every pipe's size to
#: its user: past ``fs.pipe-user-pages-soft`` (64 MiB by default) it refuses to grow pipes and
#: makes new ones 8 KiB. So only a few busy directions get the big size, more a medium one, and
#: the rest keep the kernel's 64 KiB default: what this process adds to that budget by growing
#: pipes stays under 16 MiB.
PIPE_TIERS = ((1024 * 1024, 8), (256 * 1024, 32))
#: The most one splice call asks for: the largest pipe.
PIPE_SIZE = PIPE_TIERS[0][0]
#: A splice that moved less than this found the socket drained by a peer that sends little at
#: a time (a request, a reply, a TLS record): asking again would only meet EAGAIN. After a
#: bigger one more bytes of a stream are likely to have arrived while they were written out,
#: and reading on spares a wake-up (measured: 64 KiB here cost a bulk stream 10 % more calls).
SHORT_READ = 16 * 1024
COPY_CHUNK = 64 * 1024
POOL_MAX = 64
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class PipePool:
    """Empty non-blocking pipes to reuse; creating and sizing one costs three syscalls."""

    def __init__(
        self, tiers: tuple[tuple[int, int], ...] = PIPE_TIERS, keep: int = POOL_MAX
    ) -> None:
        self.tiers = tiers
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.open = 0  # pipes in use or kept, for the server's descriptor budget
        self.sized: dict[int, int] = {}  # write end -> its tier, for the pipes we grew
        self.per_tier = [0] * len(tiers)

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.open += 1
        for tier, (size, most) in enumerate(self.tiers):
            if self.per_tier[tier] >= most:
                continue
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
            except OSError:  # over the per-user pipe budget: try a smaller size
                continue
            self.sized[w] = tier
            self.per_tier[tier] += 1
            break
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        """Take back a pipe that is empty; a pool already full closes it."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        tier = self.sized.pop(pipe[1], None)
        if tier is not None:
            self.per_tier[tier] -= 1
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1


def available() -> str | None:
    """None when splice(2) works here, else why not (seccomp filters and old kernels say no)."""
    a, b = socket.socketpair()
    pipe = None
    try:
        pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        a.send(b"x")
        if os.splice(b.fileno(), pipe[1], 1, flags=_FLAGS) != 1:
            return "splice moved no byte"
    except OSError as exc:
        return f"splice: {exc.strerror or exc}"
    finally:
        a.close()
        b.close()
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
    return None


class Direction:
    """One direction of a tunnel: ``src`` is read, ``dst`` is written.

    After a short read (``SHORT_READ``) the direction returns to the loop instead of asking
    again for an EAGAIN, since ``handyproxy.readiness`` is level-triggered and wakes it again
    for more bytes, a FIN or an error (libuv, polling for the loop itself, reported an error
    only once, so reads had to go on until EAGAIN).
    """

    __slots__ = (
        "buf",
        "dst",
        "dst_name",
        "dst_sock",
        "eof",
        "gone",
        "moved",
        "pending",
        "pipe",
        "reading",
        "ready",
        "relay",
        "reverse",
        "shut",
        "src",
        "src_name",
        "src_sock",
        "writing",
    )

    def __init__(
        self,
        relay: SpliceRelay,
        src: socket.socket,
        dst: socket.socket,
        src_name: str,
        dst_name: str,
    ) -> None:
        self.relay = relay
        self.ready = relay.ready
        self.src_sock = src
        self.dst_sock = dst
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.src_name = src_name
        self.dst_name = dst_name
        self.reverse: Direction = None  # type: ignore[assignment]  # dst -> src
        self.pipe: tuple[int, int] | None = None
        self.buf: bytes | None = None  # user-space fallback when no pipe can be had
        self.pending = 0
        self.moved = 0
        self.eof = False
        self.gone = False  # the source was reset after its FIN: it takes no more bytes either
        self.shut = False
        self.reading = False
        self.writing = False

    def start_reading(self) -> None:
        if not self.reading and not self.eof:
            self.reading = True
            self.ready.add_reader(self.src, self.on_readable)

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.ready.remove_reader(self.src)

    def on_readable(self) -> None:
        while self.reading:
            if self.pipe is None:
                try:
                    self.pipe = self.relay.pool.get()
                except OSError:  # out of descriptors: copy this chunk instead of stalling
                    if not self.copy_chunk():
                        return
                    continue
            try:
                n = os.splice(self.src, self.pipe[1], PIPE_SIZE, flags=_FLAGS)
            except BlockingIOError:
                self.release_pipe()
                return
            except OSError as exc:
                self.relay.failed(self.src_name, exc)
                return
            if n == 0:
                self.source_ended()
                return
            self.moved += n
            self.pending += n
            if not self.flush() or n < SHORT_READ:
                return

    def copy_chunk(self) -> bool:
        """Move one chunk through user space; True when the caller may read on."""
        try:
            data = os.read(self.src, COPY_CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.relay.failed(self.src_name, exc)
            return False
        if not data:
            self.source_ended()
            return False
        self.buf = data
        self.moved += len(data)
        self.pending = len(data)
        return self.flush()

    def source_ended(self) -> None:
        """Read returned 0: a FIN, or a reset whose error the other direction already took.

        Without our own FIN on this socket, a peer's FIN leaves it in CLOSE_WAIT; CLOSE means
        the connection was reset too. A reset before the FIN means the client must see a reset,
        never a clean end. A reset after it (a proxy's closed socket timed out while we held its
        last bytes) loses nothing from the source: deliver them, then end the tunnel cleanly,
        since nothing can reach that side any more.
        """
        if not self.reverse.shut and tcp_state(self.src_sock) == TCP_CLOSE:
            if not reset_after_fin(self.src_sock):
                self.relay.failed(self.src_name, ConnectionResetError(errno.ECONNRESET, "reset"))
                return
            self.gone = True
        self.eof = True
        self.stop_reading()
        self.flush()

    def flush(self) -> bool:
        """Write what is pending; True when all is out and reading may go on."""
        while self.pending:
            try:
                if self.buf is not None:
                    n = os.write(self.dst, self.buf[-self.pending :])
                else:
                    assert self.pipe is not None
                    n = os.splice(self.pipe[0], self.dst, self.pending, flags=_FLAGS)
            except BlockingIOError:
                self.stop_reading()  # the destination is full: stop taking more
                if not self.writing:
                    self.writing = True
                    self.ready.add_writer(self.dst, self.on_writable)
                return False
            except OSError as exc:
                self.relay.failed(self.dst_name, exc)
                return False
            self.pending -= n
        if self.writing:
            self.writing = False
            self.ready.remove_writer(self.dst)
        self.buf = None
        self.release_pipe()
        if self.eof:
            if not self.shut:
                self.shut = True
                try:
                    self.dst_sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.relay.failed(self.dst_name, exc)
                    return False
                self.relay.direction_done()
            return False
        return True

    def on_writable(self) -> None:
        if self.flush():
            self.start_reading()
            self.on_readable()  # bytes may be waiting already; take them now

    def release_pipe(self) -> None:
        if self.pipe is not None and self.pending == 0:
            self.relay.pool.put(self.pipe)
            self.pipe = None

    def close(self) -> None:
        """Forget the fds (the relay closes the sockets); a pipe with bytes left is destroyed.

        Its links to the relay and the other direction go too (see ``RelayBase.finish``): no
        callback can reach this object once its registrations are dropped.
        """
        self.stop_reading()
        if self.writing:
            self.writing = False
            self.ready.remove_writer(self.dst)
        if self.pipe is not None:
            if self.pending:
                self.relay.pool.discard(self.pipe)
            else:
                self.relay.pool.put(self.pipe)
            self.pipe = None
        self.relay = self.reverse = None  # type: ignore[assignment]


class SpliceRelay(RelayBase):
    """Two splice directions over the raw client and upstream sockets."""

    __slots__ = ("client", "down", "ready", "up", "upstream")

    #: The pipes of every splice tunnel of this process, and so its descriptor accounting: only
    #: this relay knows it holds descriptors beyond the tunnels' sockets.
    pool: ClassVar[PipePool] = PipePool()

    def __init__(self, on_done: Callable[[RelayBase], None], now: float) -> None:
        super().__init__(on_done, now)
        self.ready: readiness.Readiness = None  # type: ignore[assignment]
        self.client: socket.socket | None = None
        self.upstream: socket.socket | None = None

    async def start(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        registration: Registration | None,
        client_registration: Registration | None = None,
    ) -> None:
        self.ready = readiness.of(loop)
        self.client = client
        self.upstream = upstream
        self.up = Direction(self, client, upstream, "client", "upstream")
        self.down = Direction(self, upstream, client, "upstream", "client")
        self.up.reverse = self.down
        self.down.reverse = self.up
        if client_registration is None:
            self.up.start_reading()
        else:  # the client's reader left by sniffing, taken over the same way
            client_registration.hand_over(self.up.on_readable)
            self.up.reading = True
        if registration is None:
            self.down.start_reading()
        else:  # the upstream's reader replaces the set-up's on the same registration
            registration.hand_over(self.down.on_readable)
            self.down.reading = True

    @classmethod
    def unavailable(cls) -> str | None:
        return available()

    @classmethod
    def descriptors_in_use(cls) -> int:
        return 2 * cls.pool.open

    @property
    def bytes_up(self) -> int:
        return self.up.moved + self.extra_up

    @property
    def bytes_down(self) -> int:
        return self.down.moved + self.extra_down

    @property
    def half_closed(self) -> bool:
        return self.up.eof or self.down.eof

    @property
    def delivering(self) -> bool:
        return any(
            d.eof and (d.pending > 0 or unacked(d.dst_sock) > 0) for d in (self.up, self.down)
        )

    def direction_done(self) -> None:
        """A direction delivered its FIN; the tunnel ends once neither has more to carry."""
        if (self.up.shut or self.down.gone) and (self.down.shut or self.up.gone):
            self.end = self.end or "eof"
            self.close(reset=False)

    def failed(self, side: str, exc: OSError) -> None:
        reason = f"{side}-reset" if exc.errno in PEER_RESETS else "error"
        self.abort(reason)

    def abort(self, reason: str) -> None:
        self.end = self.end or reason
        self.close(reset=True)

    def close(self, reset: bool) -> None:
        if self.client is None or self.upstream is None:
            return
        self.up.close()
        self.down.close()
        for sock in (self.client, self.upstream):
            if reset:
                reset_socket(sock)
            else:
                keep_socket(sock)
            sock.close()
        self.client = self.upstream = None
        self.finish()
