"""One connection's whole story, in order: original destination, loop guard, sniff, rules,
upstream, relay, and one access record at the end.

Errors from the steps are narrow exceptions; they are caught here and turned into a reset of
the client, and the one access record says how the tunnel ended. Only an unexpected exception
(a bug) is logged twice: its traceback first, then that record with ``end=error``. How an
upstream is chosen and dialled is ``handyproxy.upstream``'s business: a tunnel asks it for a
connected socket and knows nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from handyproxy import metrics, origdst
from handyproxy.address import authority, unmap
from handyproxy.config import Config
from handyproxy.connect import ConnectError
from handyproxy.log import access, logger
from handyproxy.relay.base import RelayBase
from handyproxy.rules import UNDECIDED, Rule, RuleSet
from handyproxy.sniff import Sniffer
from handyproxy.sniff import http as sniff_http
from handyproxy.sniff import tls as sniff_tls
from handyproxy.sockets import PEER_RESETS, reset_socket
from handyproxy.upstream import DEFAULT_GROUP, Upstream, UpstreamSet
from handyproxy.upstream.dial import UpstreamPoll

#: How long to wait for a client's first bytes on an upstream's port (allowed by
#: -allow-upstream-ports) when sniffing is off: they decide whether it is a nested proxy request.
PEEK_TIMEOUT = 1.0


class PeerFailed(Exception):
    """A peer's socket failed during set-up; ``side`` is "client" or "upstream"."""

    def __init__(self, side: str, exc: OSError) -> None:
        super().__init__(f"{side}: {exc}")
        self.end = f"{side}-reset" if exc.errno in PEER_RESETS else "error"
        self.reason = exc.strerror or type(exc).__name__


@dataclass(eq=False)
class Hub:
    """State shared by all tunnels of one process, owned by the server."""

    config: Config
    listen_ports: set[int]
    # Set by the server; passed around because asyncio.get_running_loop() costs a getpid().
    loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
    upstreams: UpstreamSet = None  # type: ignore[assignment]
    rules: RuleSet = field(default_factory=RuleSet)
    relay_cls: type[RelayBase] = None  # type: ignore[assignment]
    tunnels: set[Tunnel] = field(default_factory=set)
    #: This worker's row of the instance-wide counts (handyproxy.supervisor.table.Row).
    row: Any = None
    total: int = 0
    draining: bool = False


class Tunnel:
    """Bookkeeping for one client connection, from accept to the access record."""

    __slots__ = (
        "bucket",
        "client_ip",
        "client_port",
        "cpoll",
        "dst",
        "hub",
        "relay",
        "rule",
        "sock",
        "started",
        "status",
        "target",
        "task",
        "upstream",
        "via",
    )

    def __init__(self, hub: Hub, sock: socket.socket, client: tuple) -> None:
        self.hub = hub
        self.sock = sock
        self.client_ip = unmap(client[0])  # v4 clients of a dual-stack socket count as v4
        self.client_port: int = client[1]
        self.bucket = 0  # the client's bucket in the shared counts, set once admitted
        self.dst = "-"
        self.target = "-"
        self.via = "-"  # the upstream's name, "direct", or "-" before one was chosen
        self.rule = 0  # the rule that decided (1-based), 0 for none
        self.status: int | None = None
        self.started = time.monotonic()
        self.relay: RelayBase | None = None
        self.task: asyncio.Task[None] | None = None
        self.upstream: Upstream | None = None
        # The client socket's reader left registered by sniffing, for the relay to take over.
        self.cpoll: UpstreamPoll | None = None

    @property
    def client(self) -> str:
        """The client's address as logged: ``ip:port``, IPv6 bracketed."""
        return authority(self.client_ip, self.client_port)

    async def run(self) -> None:
        """Set the tunnel up; from then on the relay's callbacks carry it, no task remains."""
        try:
            dst = self.guard()
            if dst is not None:
                await self.connect(dst)
        except ConnectError as exc:
            self.status = exc.status
            if exc.upstream:
                self.via = exc.upstream
            self.fail("connect-failed", exc.reason)
        except PeerFailed as exc:
            # An ordinary event on the wire (a client that gives up while being sniffed, an
            # upstream that resets during the replay): the access record says so, no traceback.
            self.fail(exc.end, exc.reason)
        except asyncio.CancelledError:
            self.fail("shutdown", "cancelled during setup")
            raise
        except Exception as exc:
            logger.exception("tunnel setup failed", extra={"fields": {"client": self.client}})
            self.fail("error", f"{type(exc).__name__}: {exc}")
        finally:
            self.task = None

    def guard(self) -> tuple[str, int] | None:
        """The original destination; None once a connection the loop guard forbids is refused."""
        hub, sock = self.hub, self.sock
        try:
            dst = origdst.original_dst(sock, self.client_ip)
        except origdst.OrigDstError:
            self.refuse("not-redirected")
            return None
        self.dst = authority(*dst)
        local = sock.getsockname()[:2] if dst[1] in hub.listen_ports else None
        ups = hub.upstreams
        reason = origdst.is_self(dst, local, hub.listen_ports, ups.endpoints, ups.guarded_ports)
        if reason:
            self.refuse(reason)
            return None
        return dst

    async def connect(self, dst: tuple[str, int]) -> None:
        """Sniff if asked, let the rules decide, open the upstream side, start the relay."""
        hub, cfg = self.hub, self.hub.config
        upstreams, rules = hub.upstreams, hub.rules
        decided = rules.before_sniffing(*dst) if rules else None
        rule = None if decided is None or decided is UNDECIDED else self.take(decided)
        if rule is not None and rule.action == "reject":
            self.refuse("rule")
            return
        # TCP_NODELAY and keepalive come from the listener (accept copies them).
        first, name = b"", None
        sniffing = cfg.sniffing and (not cfg.sniff_ports or dst[1] in cfg.sniff_ports)
        peek = dst[1] in upstreams.ports  # an upstream port let through: look for nesting
        if peek or (sniffing and (rule is None or rule.action != "direct")):
            timeout = cfg.effective_sniff_timeout if cfg.sniffing else PEEK_TIMEOUT
            sniffed = _Sniff(hub.loop, self.sock, cfg.sniff_max_bytes)
            first, name = await sniffed.run(timeout, park=True)
            self.cpoll = sniffed.poll
            if peek and origdst.is_proxy_request(first):
                self.refuse("proxy-request")
                return
            if sniffing:
                metrics.record.sniffed(first, name)
            else:
                name = None
        if decided is UNDECIDED:
            decided = rules.decide(dst[0], dst[1], name)
            rule = None if decided is None else self.take(decided)
            if rule is not None and rule.action == "reject":
                self.refuse("rule")
                return
        if rule is not None and rule.action == "direct":
            self.via = "direct"
            self.target = self.dst
            opened = await upstreams.direct(*dst)
        else:
            host = name or dst[0]
            self.target = authority(host, dst[1])
            asked = hub.loop.time()
            opened = await upstreams.open(host, dst[1], rule.group if rule else DEFAULT_GROUP)
            metrics.record.connected(hub.loop.time() - asked)
            self.upstream = up = opened.upstream
            self.via = up.name if up is not None else "-"
            self.status = opened.status
        await self.start_relay(opened.sock, opened.poll, first, opened.leftover)

    def take(self, decided: object) -> Rule:
        """Note which rule decided (for the access record) and return it."""
        self.rule, rule = decided  # type: ignore[misc]
        return rule

    async def start_relay(
        self, upstream: socket.socket, poll: UpstreamPoll | None, first: bytes, leftover: bytes
    ) -> None:
        """Deliver the bytes already read on each side, then hand both sockets to the relay.

        A fresh socket takes a first flight (a ClientHello, a request) at once: sent directly,
        both sockets keep their registrations for the relay. Only what does not go at once is
        waited for, after the registrations are dropped (a parked reader would fire on every
        loop turn while we wait).
        """
        loop = self.hub.loop
        cpoll, self.cpoll = self.cpoll, None
        # Armed while bytes may flow, like the client side (inherited from the listener): if
        # this process dies now, the origin's side sees a reset too, not a clean end.
        reset_socket(upstream)
        side = "upstream"
        try:
            first_left = _send_now(upstream, first)
            side = "client"
            leftover_left = _send_now(self.sock, leftover)
            if first_left or leftover_left:
                for reg in (poll, cpoll):
                    if reg is not None:
                        reg.hand_over(None)
                poll = cpoll = None
                side = "upstream"
                if first_left:
                    await loop.sock_sendall(upstream, first_left)
                side = "client"
                if leftover_left:
                    await loop.sock_sendall(self.sock, leftover_left)
        except BaseException as exc:
            for reg in (poll, cpoll):
                if reg is not None:
                    reg.hand_over(None)
            upstream.close()
            if isinstance(exc, OSError):
                raise PeerFailed(side, exc) from None
            raise
        relay = self.hub.relay_cls(self.finished, loop.time())
        self.relay = relay
        await relay.start(loop, self.sock, upstream, poll, cpoll)
        relay.seed(len(first), len(leftover))

    def refuse(self, reason: str) -> None:
        self.fail("refused", reason)

    def fail(self, end: str, reason: str) -> None:
        if self.cpoll is not None:  # unregister before the close
            self.cpoll.hand_over(None)
            self.cpoll = None
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
            if self.upstream is not None:
                self.upstream.tunnels_open -= 1
            hub.row.add(self.bucket, -1)

    def log(self, end: str, reason: str | None = None) -> None:
        metrics.record.ended(self, end, reason)
        if not access.isEnabledFor(logging.INFO):
            return
        relay = self.relay
        fields = {
            "client": self.client,
            "dst": self.dst,
            "target": self.target,
            "upstream": self.via,
            "status": self.status if self.status is not None else "-",
            "up": relay.bytes_up if relay else 0,
            "down": relay.bytes_down if relay else 0,
            "duration": f"{time.monotonic() - self.started:.3f}s",
            "end": end,
        }
        if self.rule:
            fields["rule"] = self.rule
        if reason:
            fields["reason"] = reason
        access.info("tunnel end", extra={"fields": fields})


async def sniff(sock: socket.socket, timeout: float, max_bytes: int) -> tuple[bytes, str | None]:
    """Read the client's first bytes until a name is found, they cannot hold one, or time is up.

    Every byte read is returned so the caller can replay it into the tunnel in order. One
    reader registration and one timer serve the whole wait, however many segments arrive, and
    the sniffer parses each byte once (``handyproxy.sniff.Sniffer``).
    """
    return await _Sniff(asyncio.get_running_loop(), sock, max_bytes).run(timeout)


def _send_now(sock: socket.socket, data: bytes) -> bytes:
    """Send what the socket takes without waiting; returns what is left (OSError on a reset)."""
    if not data:
        return b""
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    return data[sent:]


def _unpark(poll: UpstreamPoll) -> None:
    """The client sent more before the relay took over: drop the parked reader, which would
    otherwise fire on every loop turn; the relay registers afresh."""
    poll.close()


class _Sniff:
    """The state of one sniff: the bytes so far, the parser they chose, and the wait's end."""

    __slots__ = ("buf", "fd", "fut", "loop", "max_bytes", "name", "poll", "sniffer", "sock")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, max_bytes: int
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.max_bytes = max_bytes
        self.buf = bytearray()
        self.sniffer: Sniffer | None = None
        self.name: str | None = None
        self.fut: asyncio.Future[None] | None = None
        self.poll: UpstreamPoll | None = None  # the reader left registered by run(park=True)

    async def run(self, timeout: float, park: bool = False) -> tuple[bytes, str | None]:
        """Sniff; with ``park`` a reader it had to register stays registered (in ``poll``) for
        the relay to take over, else it is dropped."""
        if timeout > 0 and not self.read():
            loop = self.loop
            self.fut = fut = loop.create_future()
            poll = UpstreamPoll(loop, self.fd)
            poll.watcher = self.on_wake
            poll.want(write=False)
            timer = loop.call_later(timeout, self.done)
            try:
                await fut
            except BaseException:
                poll.close()
                raise
            finally:
                timer.cancel()
            if park:
                poll.watcher = _unpark
                self.poll = poll
            else:
                poll.close()
        return bytes(self.buf), self.name

    def on_wake(self, _poll: UpstreamPoll) -> None:
        self.on_readable()

    def on_readable(self) -> None:
        try:
            finished = self.read()
        except PeerFailed as exc:
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(exc)
            return
        if finished:
            self.done()

    def done(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def read(self) -> bool:
        """Take what has arrived; True once sniffing is over (a verdict, EOF, or max bytes)."""
        buf = self.buf
        while len(buf) < self.max_bytes:
            try:
                chunk = self.sock.recv(self.max_bytes - len(buf))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:  # a client that gives up while being sniffed
                raise PeerFailed("client", exc) from None
            if not chunk:
                return True
            buf += chunk
            sniffer = self.sniffer
            if sniffer is None:
                tls = chunk[0] == sniff_tls.RECORD_HANDSHAKE
                self.sniffer = sniffer = (
                    sniff_tls.ClientHelloSniffer() if tls else sniff_http.HostSniffer()
                )
            result = sniffer.feed(chunk)
            if isinstance(result, str):
                self.name = result
                return True
            if result is None:
                return True
        return True
