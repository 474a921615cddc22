"""One connection's whole story, in order: original destination, loop guard, sniff, CONNECT,
relay, and one access record at the end.

Errors from the steps are narrow exceptions; they are caught here, turned into a reset of the
client, and logged once.
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
from handyproxy.config import Config
from handyproxy.log import access, logger
from handyproxy.relay import Relay, RelayBase, reset_socket
from handyproxy.sniff import http as sniff_http
from handyproxy.sniff import tls as sniff_tls
from handyproxy.splice import SpliceRelay

READ_SIZE = 4096
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4


@dataclass(eq=False)
class Hub:
    """State shared by all tunnels of one process, owned by the server."""

    config: Config
    listen_ports: set[int]
    upstreams: list[tuple[int, tuple]] = field(default_factory=list)  # (family, sockaddr)
    upstream_endpoints: list[tuple[str, int]] = field(default_factory=list)
    tunnels: set[Tunnel] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    total: int = 0
    draining: bool = False


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay (we forward what we get at once) and keepalive to find vanished peers."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


class Tunnel:
    """Bookkeeping for one client connection, from accept to the access record."""

    __slots__ = (
        "client",
        "client_ip",
        "dst",
        "hub",
        "relay",
        "sock",
        "started",
        "status",
        "target",
        "task",
    )

    def __init__(self, hub: Hub, sock: socket.socket, client: tuple) -> None:
        self.hub = hub
        self.sock = sock
        self.client_ip = origdst.unmap(client[0])
        self.client = connect.authority(self.client_ip, client[1])
        self.dst = "-"
        self.target = "-"
        self.status: int | None = None
        self.started = time.monotonic()
        self.relay: RelayBase | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Set the tunnel up; from then on the relay's callbacks carry it, no task remains."""
        hub, cfg, sock = self.hub, self.hub.config, self.sock
        try:
            local = sock.getsockname()
            try:
                dst = origdst.original_dst(sock, local[0])
            except origdst.OrigDstError:
                self.refuse("not-redirected")
                return
            self.dst = connect.authority(*dst)
            reason = origdst.is_self(dst, local[:2], hub.listen_ports, hub.upstream_endpoints)
            if reason:
                self.refuse(reason)
                return
            tune_socket(sock)
            host = dst[0]
            first = b""
            if cfg.sniffing and (not cfg.sniff_ports or dst[1] in cfg.sniff_ports):
                first, name = await sniff(sock, cfg.effective_sniff_timeout, cfg.sniff_max_bytes)
                if name:
                    host = name
            self.target = connect.authority(host, dst[1])
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
        """
        loop = asyncio.get_running_loop()
        cfg = self.hub.config
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(cfg.dial_timeout):
                sock = await self.dial(loop)
                request = connect.build_request(host, port)
                try:
                    sent = sock.send(request)  # a fresh socket takes a few hundred bytes at once
                except BlockingIOError:
                    sent = 0
                if sent < len(request):
                    await loop.sock_sendall(sock, request[sent:])
                buf = b""
                while True:
                    try:
                        chunk = sock.recv(READ_SIZE)
                    except BlockingIOError:
                        await ready(loop, sock.fileno(), write=False)
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
        except TimeoutError:
            if sock is not None:
                sock.close()
            raise connect.ConnectError(f"no answer within {cfg.dial_timeout:g}s") from None
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise connect.ConnectError(f"upstream connection failed: {exc}") from None
        except BaseException:  # ConnectError, or cancelled by shutdown: do not leak the socket
            if sock is not None:
                sock.close()
            raise
        self.status, length = parsed
        if not 200 <= self.status < 300:
            sock.close()
            raise connect.ConnectError("upstream refused the tunnel", self.status)
        return sock, buf[length:]

    async def dial(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        """Connect to the first upstream address that answers."""
        hub = self.hub
        if not hub.upstreams:
            raise connect.ConnectError("upstream proxy name did not resolve")
        errors = []
        for family, sockaddr in hub.upstreams:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # EMFILE: this tunnel fails, the process goes on
                raise connect.ConnectError(f"cannot open a socket: {exc.strerror}") from None
            sock.setblocking(False)
            try:
                # Not loop.sock_connect: uvloop resolves the (already numeric) address again
                # in its thread pool for every call.
                err = sock.connect_ex(sockaddr)
                if err == errno.EINPROGRESS:
                    await ready(loop, sock.fileno(), write=True)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            except OSError as exc:
                sock.close()
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            except BaseException:
                sock.close()
                raise
            tune_socket(sock)
            return sock
        raise connect.ConnectError("cannot reach upstream: " + "; ".join(errors))

    async def start_relay(self, upstream: socket.socket, first: bytes, leftover: bytes) -> None:
        """Deliver the bytes already read on each side, then hand both sockets to the relay."""
        loop = asyncio.get_running_loop()
        try:
            if first:
                await loop.sock_sendall(upstream, first)
            if leftover:
                await loop.sock_sendall(self.sock, leftover)
        except BaseException:
            reset_socket(upstream)
            upstream.close()
            raise
        relay_cls = SpliceRelay if self.hub.config.relay == "splice" else Relay
        relay = relay_cls(self.finished, loop.time())
        self.relay = relay
        await relay.start(loop, self.sock, upstream)
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
            hub.connections -= 1
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


async def ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    """Wait until ``fd`` is readable or writable (a connect finished, a reply arrived)."""
    fut = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


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
