"""Reaching an upstream: resolving it, connecting (Happy Eyeballs), and the CONNECT exchange.

Everything here waits on one readiness registration per socket (UpstreamPoll) and under one
Deadline per tunnel set-up, with no task of its own: the tunnel's set-up task awaits it all.
A failure the upstream is to blame for raises ``Failure`` (its ``kind`` feeds the health
counters); running out of descriptors is ours, and raises ``ConnectError`` directly.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Sequence

from handyproxy import connect, readiness
from handyproxy.connect import ConnectError
from handyproxy.sockets import tune_socket

READ_SIZE = 4096
#: RFC 8305 section 5: start the next address this long after the previous one if it has not
#: connected (or failed) by then.
CONNECTION_ATTEMPT_DELAY = 0.25
#: Failure kinds, stable: they are the keys of ``Upstream.failures`` and metrics labels.
FAILURE_KINDS = (
    "refused",
    "unreachable",
    "timeout",
    "reset",
    "closed",
    "bad-reply",
    "no-address",
    "error",
)
_ERRNO_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ENETDOWN: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.EADDRNOTAVAIL: "unreachable",
    errno.ETIMEDOUT: "timeout",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
}

Address = tuple[int, tuple]  # (family, sockaddr)


class Failure(Exception):
    """The upstream failed before it answered; the tunnel may try another one."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


class Expired(Exception):
    """A wait ran into its Deadline; ``limit`` when it was the per-upstream connect bound."""

    def __init__(self, limit: bool = False) -> None:
        super().__init__("deadline")
        self.limit = limit


def failure_from_errno(err: int, where: str) -> Failure:
    return Failure(_ERRNO_KINDS.get(err, "error"), f"{where}: {os.strerror(err)}")


def failure_from_oserror(exc: OSError, where: str) -> Failure:
    if exc.errno:
        return failure_from_errno(exc.errno, where)
    return Failure("error", f"{where}: {exc}")


def _new_socket(family: int) -> socket.socket:
    try:
        # SOCK_NONBLOCK here spares the ioctl that setblocking(False) would cost.
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EMFILE: this tunnel fails, the process and the upstream are fine
        raise ConnectError(f"cannot open a socket: {exc.strerror}") from None


class Deadline:
    """One timer bounding every wait of a tunnel's set-up; it fails whichever future is pending.

    ``limit()`` adds a tighter, temporary bound (connecting to one upstream while another could
    still take over); its expiry raises ``Expired(limit=True)`` and leaves the rest of the
    budget for the next upstream.
    """

    __slots__ = ("expired", "fut", "handle", "limit_handle", "loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = loop
        self.when = loop.time() + seconds
        self.fut: asyncio.Future | None = None
        self.expired = False
        self.handle = loop.call_at(self.when, self._fire)
        self.limit_handle: asyncio.TimerHandle | None = None

    def remaining(self) -> float:
        return self.when - self.loop.time()

    def watch(self, fut: asyncio.Future) -> None:
        """Make ``fut`` the wait this deadline ends; raises Expired if it already has."""
        if self.expired:
            raise Expired()
        self.fut = fut

    def _fire(self) -> None:
        self.expired = True
        self._fail(Expired())

    def _fire_limit(self) -> None:
        self.limit_handle = None
        self._fail(Expired(limit=True))

    def _fail(self, exc: Expired) -> None:
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def limit(self, seconds: float) -> None:
        """Bound the waits until ``unlimit()`` to ``seconds`` from now, if that is sooner."""
        when = self.loop.time() + seconds
        if when < self.when:
            self.limit_handle = self.loop.call_at(when, self._fire_limit)

    def unlimit(self) -> None:
        if self.limit_handle is not None:
            self.limit_handle.cancel()
            self.limit_handle = None

    def cancel(self) -> None:
        self.handle.cancel()
        self.unlimit()
        self.fut = None


class UpstreamPoll:
    """Readiness of a socket during set-up, on one registration from connect to relay.

    The registration is with ``handyproxy.readiness`` (one epoll_ctl per change), switched from
    writer to reader in place and left registered until ``hand_over()`` gives it to the relay:
    the upstream socket (and a sniffed client socket) is registered once for its whole life.

    While a Happy Eyeballs race runs, ``watcher`` receives the wake-ups instead of a future.
    """

    __slots__ = ("fd", "fut", "loop", "reading", "ready", "watcher", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.ready = readiness.of(loop)
        self.fd = fd
        self.fut: asyncio.Future[None] | None = None
        self.reading = False
        self.writing = False
        self.watcher: Callable[[UpstreamPoll], None] | None = None

    def wake(self) -> None:
        watcher = self.watcher
        if watcher is not None:
            watcher(self)
            return
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def want(self, write: bool) -> None:
        """Register for writability (a connect finishing) or readability (a reply arriving)."""
        if write != self.writing or write == self.reading:
            self.ready.watch(self.fd, None if write else self.wake, self.wake if write else None)
            self.writing, self.reading = write, not write

    async def wait(self, write: bool, deadline: Deadline) -> None:
        """Until the socket is writable or readable; raises Expired at the deadline."""
        self.fut = fut = self.loop.create_future()
        deadline.watch(fut)
        self.want(write)
        try:
            await fut
        finally:
            self.fut = None

    def hand_over(self, reader: Callable[[], None] | None) -> None:
        """Give the socket's registration to the relay: the one place that knows how.

        A relay that polls the raw descriptor itself (splice, on the same
        ``handyproxy.readiness``) passes its reader: it replaces the set-up's callback on the
        same registration, and at most the writer's interest is dropped. A relay that wraps the
        socket in a transport (copy), or a caller that must write on the socket with the loop's
        help first, passes None: the descriptor leaves our epoll, because the loop's own
        registration and ours must never both hold it (a parked reader would also fire on every
        loop turn while the caller waits). Either way this object no longer touches the
        descriptor: ``close()`` after it is a no-op, and the relay owns the reader it passed.
        """
        if reader is None:
            self.close()
            return
        self.ready.watch(self.fd, reader, None)
        self.reading = self.writing = False
        self.watcher = None

    def close(self) -> None:
        """Drop the registration; always before the socket is closed."""
        if self.reading:
            self.ready.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.ready.remove_writer(self.fd)
            self.writing = False


def drop(sock: socket.socket | None, poll: UpstreamPoll | None) -> None:
    """Unregister, then close (in that order: no registration may outlive its descriptor)."""
    if poll is not None:
        poll.close()
    if sock is not None:
        sock.close()


def order_addresses(infos: Sequence[Address]) -> tuple[Address, ...]:
    """RFC 8305 section 4: drop duplicates, then alternate families, IPv6 first."""
    seen: set[tuple] = set()
    v6: list[Address] = []
    v4: list[Address] = []
    for family, sockaddr in infos:
        key = (family, sockaddr[:2])
        if key in seen:
            continue
        seen.add(key)
        (v6 if family == socket.AF_INET6 else v4).append((family, sockaddr))
    ordered: list[Address] = []
    for i in range(max(len(v6), len(v4))):
        ordered += v6[i : i + 1] + v4[i : i + 1]
    return tuple(ordered)


def numeric_addresses(host: str, port: int) -> tuple[Address, ...]:
    """The address of an IP literal, without a resolver (scope ids included); empty when the
    system cannot use it (a scope naming no interface): the upstream then starts down."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except OSError:
        return ()
    return order_addresses([(family, sockaddr) for family, _, _, _, sockaddr in infos])


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[Address, ...]:
    """Resolve in the loop's thread pool; raises Failure("no-address") when it does not."""
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Failure("no-address", f"{host} does not resolve: {exc.strerror or exc}") from None
    addrs = order_addresses([(family, sockaddr) for family, _, _, _, sockaddr in infos])
    if not addrs:
        raise Failure("no-address", f"{host} resolves to no address")
    return addrs


async def connect_first(
    loop: asyncio.AbstractEventLoop, addrs: Sequence[Address], deadline: Deadline
) -> tuple[socket.socket, UpstreamPoll, int]:
    """Connect to the first of ``addrs`` that answers (RFC 8305); returns its index too.

    One address, the usual case, costs one socket and one registration and nothing else.
    """
    if not addrs:
        raise Failure("no-address", "no address known (the name has not resolved)")
    if len(addrs) > 1:
        return await _Race(loop, addrs).run(deadline)
    family, sockaddr = addrs[0]
    sock = _new_socket(family)
    poll = UpstreamPoll(loop, sock.fileno())
    try:
        # Not loop.sock_connect: uvloop resolves the (already numeric) address again in its
        # thread pool for every call.
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            await poll.wait(True, deadline)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise Failure(_ERRNO_KINDS.get(err, "error"), os.strerror(err))
    except BaseException:
        drop(sock, poll)
        raise
    tune_socket(sock)
    return sock, poll, 0


class _Race:
    """Connection attempts to several addresses, each started CONNECTION_ATTEMPT_DELAY after the
    previous one (or at once when it fails); the first to connect wins, the rest are closed."""

    __slots__ = ("errors", "fut", "live", "loop", "pending", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, addrs: Sequence[Address]) -> None:
        self.loop = loop
        self.pending = list(enumerate(addrs))
        self.live: dict[UpstreamPoll, tuple[socket.socket, int, str]] = {}
        self.errors: list[Failure] = []
        self.fut: asyncio.Future[tuple[socket.socket, UpstreamPoll, int]] = loop.create_future()
        self.timer: asyncio.TimerHandle | None = None

    async def run(self, deadline: Deadline) -> tuple[socket.socket, UpstreamPoll, int]:
        try:
            deadline.watch(self.fut)
            self.start_next()
            return await self.fut
        finally:
            if self.timer is not None:
                self.timer.cancel()
            fut, winner = self.fut, None
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                winner = fut.result()[1]
            for poll, (sock, _, _) in list(self.live.items()):
                if poll is not winner:
                    drop(sock, poll)
            self.live.clear()

    def start_next(self) -> None:
        self.timer = None
        while self.pending and not self.fut.done():
            index, (family, sockaddr) = self.pending.pop(0)
            try:
                sock = _new_socket(family)
            except ConnectError as exc:
                self.fut.set_exception(exc)
                return
            poll = UpstreamPoll(self.loop, sock.fileno())
            err = sock.connect_ex(sockaddr)
            if err == 0:
                self.win(sock, poll, index)
                return
            if err != errno.EINPROGRESS:
                sock.close()
                self.errors.append(failure_from_errno(err, sockaddr[0]))
                continue
            poll.watcher = self.ready
            poll.want(write=True)
            self.live[poll] = (sock, index, sockaddr[0])
            if self.pending:
                self.timer = self.loop.call_later(CONNECTION_ATTEMPT_DELAY, self.start_next)
            return
        self.check_lost()

    def ready(self, poll: UpstreamPoll) -> None:
        sock, index, host = self.live[poll]
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            self.win(sock, poll, index)
            return
        del self.live[poll]
        drop(sock, poll)
        self.errors.append(failure_from_errno(err, host))
        if self.timer is not None:  # a failure starts the next attempt at once
            self.timer.cancel()
        self.start_next()

    def check_lost(self) -> None:
        if not self.live and not self.pending and not self.fut.done():
            last = self.errors[-1]
            self.fut.set_exception(Failure(last.kind, "; ".join(e.text for e in self.errors)))

    def win(self, sock: socket.socket, poll: UpstreamPoll, index: int) -> None:
        if self.fut.done():
            return
        poll.watcher = None
        self.live[poll] = (sock, index, "")  # kept open by run(), whichever path won
        tune_socket(sock)
        self.fut.set_result((sock, poll, index))


async def exchange(
    sock: socket.socket, poll: UpstreamPoll, request: bytes, deadline: Deadline
) -> tuple[int, bytes, int]:
    """Send the CONNECT request and read the reply header: ``(status, bytes read, header end)``.

    Bytes past the header end are the origin's, early (a banner); the caller delivers them.
    """
    try:
        sent = sock.send(request)  # a fresh socket takes a few hundred bytes at once
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise failure_from_oserror(exc, "sending CONNECT") from None
    while sent < len(request):
        await poll.wait(True, deadline)
        try:
            sent += sock.send(request[sent:])
        except BlockingIOError:
            pass
        except OSError as exc:
            raise failure_from_oserror(exc, "sending CONNECT") from None
    buf = b""
    while True:
        # The reply is one round trip away at least: wait before reading.
        await poll.wait(False, deadline)
        try:
            chunk = sock.recv(READ_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise failure_from_oserror(exc, "reading the reply") from None
        if not chunk:
            raise Failure("closed", "upstream closed before its reply ended")
        buf += chunk
        try:
            parsed = connect.parse_reply(buf)
        except connect.ConnectReplyError as exc:
            raise Failure("bad-reply", str(exc)) from None
        if parsed is not None:
            return parsed[0], buf, parsed[1]
