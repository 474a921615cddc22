"""One connection's whole story, in order: original destination, loop guard, sniff, CONNECT,
relay, and one access record at the end.

Errors from the steps are narrow exceptions; they are caught here, turned into a reset of the
client, and logged once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

from handyproxy import connect, origdst
from handyproxy.config import Config
from handyproxy.log import access, logger
from handyproxy.relay import Relay, reset_socket, reset_transport
from handyproxy.sniff import http as sniff_http
from handyproxy.sniff import tls as sniff_tls

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


class _Handshake(asyncio.Protocol):
    """Collects the upstream's CONNECT reply and keeps whatever arrived after it."""

    __slots__ = ("buf", "done", "transport")

    def __init__(self, done: asyncio.Future[tuple[int, bytes]]) -> None:
        self.done = done
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            self.buf += data
            return
        self.buf += data
        try:
            parsed = connect.parse_reply(self.buf)
        except connect.ConnectReplyError as exc:
            self.done.set_exception(connect.ConnectError(str(exc)))
            return
        if parsed is not None:
            status, length = parsed
            assert self.transport is not None
            self.transport.pause_reading()  # later bytes wait until the client side exists
            self.done.set_result((status, bytes(self.buf[length:])))
            del self.buf[:]

    def eof_received(self) -> bool:
        return True  # an origin that closes at once still gets its bytes delivered

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            why = (
                f"upstream closed the connection: {exc}" if exc else "upstream closed before reply"
            )
            self.done.set_exception(connect.ConnectError(why))


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
        self.relay: Relay | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Set the tunnel up; from then on the relay's callbacks carry it, no task remains."""
        hub, cfg, sock = self.hub, self.hub.config, self.sock
        try:
            try:
                dst = origdst.original_dst(sock)
            except origdst.OrigDstError:
                self.refuse("not-redirected")
                return
            self.dst = connect.authority(*dst)
            reason = origdst.is_self(
                dst, sock.getsockname()[:2], hub.listen_ports, hub.upstream_endpoints
            )
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
            transport, leftover = await self.open_upstream(host, dst[1])
            await self.start_relay(transport, first, leftover)
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

    async def open_upstream(self, host: str, port: int) -> tuple[asyncio.Transport, bytes]:
        """Dial the upstream and ask for the tunnel, all within the dial timeout."""
        loop = asyncio.get_running_loop()
        cfg = self.hub.config
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(cfg.dial_timeout):
                done: asyncio.Future[tuple[int, bytes]] = loop.create_future()
                transport = await self.dial(loop, _Handshake(done))
                transport.write(connect.build_request(host, port))
                self.status, leftover = await done
        except TimeoutError:
            if transport is not None:
                transport.abort()
            raise connect.ConnectError(f"no answer within {cfg.dial_timeout:g}s") from None
        except connect.ConnectError:
            if transport is not None:
                transport.abort()
            raise
        assert transport is not None
        if not 200 <= self.status < 300:
            transport.abort()
            raise connect.ConnectError("upstream refused the tunnel", self.status)
        return transport, leftover

    async def dial(
        self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol
    ) -> asyncio.Transport:
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
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            except BaseException:
                sock.close()
                raise
            tune_socket(sock)
            transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
            return transport  # type: ignore[return-value]
        raise connect.ConnectError("cannot reach upstream: " + "; ".join(errors))

    async def start_relay(self, upstream: asyncio.Transport, first: bytes, leftover: bytes) -> None:
        """Join the two sockets; the upstream stays paused until its early bytes are delivered."""
        loop = asyncio.get_running_loop()
        relay = Relay(self.finished, loop.time())
        relay.upstream.attach(upstream)
        relay.upstream.reading_paused = True  # paused by the handshake
        upstream.set_protocol(relay.upstream)
        self.relay = relay
        if first:
            relay.client.received += len(first)
            upstream.write(first)
        try:
            await loop.connect_accepted_socket(lambda: relay.client, self.sock)
        except BaseException:
            reset_transport(upstream)
            raise
        if leftover:
            relay.upstream.received += len(leftover)
            relay.client.transport.write(leftover)
        if relay.upstream.closed:
            relay.fail(relay.client, relay.end or "upstream-reset")
        relay.upstream.resume_reading()

    def refuse(self, reason: str) -> None:
        reset_socket(self.sock)
        self.sock.close()
        self.log("refused", reason=reason)
        self.release()

    def fail(self, end: str, reason: str) -> None:
        reset_socket(self.sock)
        self.sock.close()
        self.log(end, reason=reason)
        self.release()

    def finished(self, relay: Relay) -> None:
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
