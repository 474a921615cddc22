"""One connection's whole story, in order: original destination, loop guard, sniff, CONNECT,
relay, and one access record at the end.

Errors from the steps are narrow exceptions; they are caught here and turned into a reset of
the client, and the one access record says how the tunnel ended. Only an unexpected exception
(a bug) is logged twice: its traceback first, then that record with ``end=error``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from handyproxy import connect, origdst
from handyproxy.address import authority, unmap
from handyproxy.config import Config
from handyproxy.log import access, logger
from handyproxy.relay.base import RelayBase
from handyproxy.sniff import http as sniff_http
from handyproxy.sniff import tls as sniff_tls
from handyproxy.sockets import reset_socket, tune_socket

READ_SIZE = 4096


@dataclass(eq=False)
class Hub:
    """State shared by all tunnels of one process, owned by the server."""

    config: Config
    listen_ports: set[int]
    # Set by the server; passed around because asyncio.get_running_loop() costs a getpid().
    loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
    upstreams: list[tuple[int, tuple]] = field(default_factory=list)  # (family, sockaddr)
    upstream_endpoints: list[tuple[str, int]] = field(default_factory=list)
    relay_cls: type[RelayBase] = None  # type: ignore[assignment]
    tunnels: set[Tunnel] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)
    total: int = 0
    draining: bool = False


class Tunnel:
    """Bookkeeping for one client connection, from accept to the access record."""

    __slots__ = (
        "client_ip",
        "client_port",
        "dst",
        "hub",
        "relay",
        "sock",
        "started",
        "status",
        "target",
        "task",
        "upoll",
    )

    def __init__(self, hub: Hub, sock: socket.socket, client: tuple) -> None:
        self.hub = hub
        self.sock = sock
        self.client_ip = unmap(client[0])  # v4 clients of a dual-stack socket count as v4
        self.client_port: int = client[1]
        self.dst = "-"
        self.target = "-"
        self.status: int | None = None
        self.started = time.monotonic()
        self.relay: RelayBase | None = None
        self.task: asyncio.Task[None] | None = None
        self.upoll: UpstreamPoll | None = None

    @property
    def client(self) -> str:
        """The client's address as logged: ``ip:port``, IPv6 bracketed."""
        return authority(self.client_ip, self.client_port)

    async def run(self) -> None:
        """Set the tunnel up; from then on the relay's callbacks carry it, no task remains."""
        hub, cfg, sock = self.hub, self.hub.config, self.sock
        try:
            try:
                dst = origdst.original_dst(sock, self.client_ip)
            except origdst.OrigDstError:
                self.refuse("not-redirected")
                return
            self.dst = authority(*dst)
            local = sock.getsockname()[:2] if dst[1] in hub.listen_ports else None
            reason = origdst.is_self(dst, local, hub.listen_ports, hub.upstream_endpoints)
            if reason:
                self.refuse(reason)
                return
            # TCP_NODELAY and keepalive come from the listener (accept copies them).
            host = dst[0]
            first = b""
            if cfg.sniffing and (not cfg.sniff_ports or dst[1] in cfg.sniff_ports):
                first, name = await sniff(sock, cfg.effective_sniff_timeout, cfg.sniff_max_bytes)
                if name:
                    host = name
            self.target = authority(host, dst[1])
            upstream, leftover = await self.open_upstream(host, dst[1])
            await self.start_relay(upstream, first, leftover)
        except connect.ConnectError as exc:
            self.fail("connect-failed", exc.reason)
        except asyncio.CancelledError:
            self.fail("shutdown", "cancelled during setup")
            raise
        except Exception as exc:
            logger.exception("tunnel setup failed", extra={"fields": {"client": self.client}})
            self.fail("error", f"{type(exc).__name__}: {exc}")
        finally:
            self.task = None

    async def open_upstream(self, host: str, port: int) -> tuple[socket.socket, bytes]:
        """Dial the upstream and ask for the tunnel, all within the dial timeout.

        Returns the connected socket and any bytes the upstream sent after its reply header.
        The socket is left in ``self.upoll``'s care (still registered for reading) until
        start_relay hands it to the relay.
        """
        loop = self.hub.loop
        cfg = self.hub.config
        task = asyncio.current_task(loop)
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_later(cfg.dial_timeout, expire)
        sock: socket.socket | None = None
        try:
            sock = await self.dial(loop)
            poll = self.upoll
            assert poll is not None
            request = connect.build_request(host, port)
            try:
                sent = sock.send(request)  # a fresh socket takes a few hundred bytes at once
            except BlockingIOError:
                sent = 0
            if sent < len(request):
                poll.close()  # sock_sendall registers (and drops) a writer of its own
                await loop.sock_sendall(sock, request[sent:])
            buf = b""
            while True:
                # The reply is one round trip away at least: wait before reading.
                await poll.wait(write=False)
                try:
                    chunk = sock.recv(READ_SIZE)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise connect.ConnectError("upstream closed before its reply ended")
                buf += chunk
                try:
                    parsed = connect.parse_reply(buf)
                except connect.ConnectReplyError as exc:
                    raise connect.ConnectError(str(exc)) from None
                if parsed is not None:
                    break
        except asyncio.CancelledError:
            self.drop_upstream(sock)
            if not expired:
                raise  # shutdown
            task.uncancel()
            raise connect.ConnectError(f"no answer within {cfg.dial_timeout:g}s") from None
        except OSError as exc:
            self.drop_upstream(sock)
            raise connect.ConnectError(f"upstream connection failed: {exc}") from None
        except BaseException:  # ConnectError: do not leak the socket
            self.drop_upstream(sock)
            raise
        finally:
            timer.cancel()
        self.status, length = parsed
        if not 200 <= self.status < 300:
            self.drop_upstream(sock)
            raise connect.ConnectError("upstream refused the tunnel", self.status)
        return sock, buf[length:]

    def drop_upstream(self, sock: socket.socket | None) -> None:
        """Unregister, then close (in that order: libuv must never poll a closed descriptor)."""
        if self.upoll is not None:
            self.upoll.close()
            self.upoll = None
        if sock is not None:
            sock.close()

    async def dial(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """Connect to the first upstream address that answers."""
        hub = self.hub
        if not hub.upstreams:
            raise connect.ConnectError("upstream proxy name did not resolve")
        errors = []
        for family, sockaddr in hub.upstreams:
            try:
                # SOCK_NONBLOCK here spares the ioctl that setblocking(False) would cost.
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # EMFILE: this tunnel fails, the process goes on
                raise connect.ConnectError(f"cannot open a socket: {exc.strerror}") from None
            self.upoll = poll = UpstreamPoll(loop, sock.fileno())
            try:
                # Not loop.sock_connect: uvloop resolves the (already numeric) address again
                # in its thread pool for every call.
                err = sock.connect_ex(sockaddr)
                if err == errno.EINPROGRESS:
                    await poll.wait(write=True)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                self.drop_upstream(sock)
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            except BaseException:
                self.drop_upstream(sock)
                raise
            tune_socket(sock)
            return sock
        raise connect.ConnectError("cannot reach upstream: " + "; ".join(errors))

    async def start_relay(self, upstream: socket.socket, first: bytes, leftover: bytes) -> None:
        """Deliver the bytes already read on each side, then hand both sockets to the relay."""
        loop = self.hub.loop
        relay_cls = self.hub.relay_cls
        if first or leftover or not relay_cls.adopts_reader:
            # A transport must find the socket unregistered, and while we wait to write
            # below, a parked reader would fire on every loop turn.
            self.drop_upstream(None)
        if first or leftover:
            try:
                if first:
                    await loop.sock_sendall(upstream, first)
                if leftover:
                    await loop.sock_sendall(self.sock, leftover)
            except BaseException:
                reset_socket(upstream)
                upstream.close()
                raise
        relay = relay_cls(self.finished, loop.time())
        self.relay = relay
        # The relay's reader replaces the parked one on the same registration.
        await relay.start(loop, self.sock, upstream)
        self.upoll = None
        relay.seed(len(first), len(leftover))

    def refuse(self, reason: str) -> None:
        self.fail("refused", reason)

    def fail(self, end: str, reason: str) -> None:
        reset_socket(self.sock)
        self.sock.close()
        self.log(end, reason=reason)
        self.release()

    def finished(self, relay: RelayBase) -> None:
        self.log(relay.end or "eof")
        self.release()

    def release(self) -> None:
        hub = self.hub
        if self in hub.tunnels:
            hub.tunnels.discard(self)
            n = hub.per_client.get(self.client_ip, 0) - 1
            if n > 0:
                hub.per_client[self.client_ip] = n
            else:
                hub.per_client.pop(self.client_ip, None)

    def log(self, end: str, reason: str | None = None) -> None:
        if not access.isEnabledFor(logging.INFO):
            return
        relay = self.relay
        fields = {
            "client": self.client,
            "dst": self.dst,
            "target": self.target,
            "status": self.status if self.status is not None else "-",
            "up": relay.bytes_up if relay else 0,
            "down": relay.bytes_down if relay else 0,
            "duration": f"{time.monotonic() - self.started:.3f}s",
            "end": end,
        }
        if reason:
            fields["reason"] = reason
        access.info("tunnel end", extra={"fields": fields})


class UpstreamPoll:
    """Readiness of the upstream socket during set-up, on one registration from connect to relay.

    uvloop (libuv) builds a poll handle when a descriptor gets its first reader or writer and
    tears it down when it loses its last, an ioctl and several epoll_ctl calls each time.
    Switching from writer to reader in place, and leaving the reader registered for the relay to
    take over, keeps a single handle for the socket's whole life.
    """

    __slots__ = ("fd", "fut", "loop", "reading", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.fut: asyncio.Future[None] | None = None
        self.reading = False
        self.writing = False

    def wake(self) -> None:
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, write: bool) -> None:
        """Until the socket is writable (a connect finished) or readable (a reply arrived)."""
        loop, fd = self.loop, self.fd
        self.fut = fut = loop.create_future()
        if write and not self.writing:
            loop.add_writer(fd, self.wake)
            self.writing = True
            if self.reading:
                loop.remove_reader(fd)
                self.reading = False
        elif not write and not self.reading:
            loop.add_reader(fd, self.wake)  # before dropping the writer: the handle survives
            self.reading = True
            if self.writing:
                loop.remove_writer(fd)
                self.writing = False
        try:
            await fut
        finally:
            self.fut = None

    def close(self) -> None:
        """Drop the registration; always before the socket is closed."""
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False


async def sniff(sock: socket.socket, timeout: float, max_bytes: int) -> tuple[bytes, str | None]:
    """Read the client's first bytes until a name is found, they cannot hold one, or time is up.

    Every byte read is returned so the caller can replay it into the tunnel in order.
    """
    loop = asyncio.get_running_loop()
    buf = b""
    deadline = loop.time() + timeout
    while len(buf) < max_bytes:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            async with asyncio.timeout(remaining):
                chunk = await loop.sock_recv(sock, max_bytes - len(buf))
        except TimeoutError:
            break
        if not chunk:
            break
        buf += chunk
        result = sniff_tls.server_name(buf) if buf[0] == 0x16 else sniff_http.host_name(buf)
        if isinstance(result, str):
            return buf, result
        if result is None:
            break
    return buf, None
