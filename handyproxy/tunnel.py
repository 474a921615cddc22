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
        "dst",
        "hub",
        "relay",
        "rule",
        "sock",
        "started",
        "status",
        "target",
        "task",
        "upoll",
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
        self.upoll: UpstreamPoll | None = None
        self.upstream: Upstream | None = None

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
            first, name = await sniff(self.sock, timeout, cfg.sniff_max_bytes)
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
        self.upoll = opened.poll
        await self.start_relay(opened.sock, first, opened.leftover)

    def take(self, decided: object) -> Rule:
        """Note which rule decided (for the access record) and return it."""
        self.rule, rule = decided  # type: ignore[misc]
        return rule

    def drop_upstream(self, sock: socket.socket | None) -> None:
        """Unregister, then close (in that order: libuv must never poll a closed descriptor)."""
        if self.upoll is not None:
            self.upoll.close()
            self.upoll = None
        if sock is not None:
            sock.close()

    async def start_relay(self, upstream: socket.socket, first: bytes, leftover: bytes) -> None:
        """Deliver the bytes already read on each side, then hand both sockets to the relay."""
        loop = self.hub.loop
        relay_cls = self.hub.relay_cls
        # Armed while bytes may flow, like the client side (inherited from the listener): if
        # this process dies now, the origin's side sees a reset too, not a clean end.
        reset_socket(upstream)
        if first or leftover or not relay_cls.adopts_reader:
            # A transport must find the socket unregistered, and while we wait to write
            # below, a parked reader would fire on every loop turn.
            self.drop_upstream(None)
        if first or leftover:
            sent_first = False
            try:
                if first:
                    await loop.sock_sendall(upstream, first)
                sent_first = True
                if leftover:
                    await loop.sock_sendall(self.sock, leftover)
            except OSError as exc:
                upstream.close()
                raise PeerFailed("upstream" if sent_first is False else "client", exc) from None
            except BaseException:
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
        except OSError as exc:
            raise PeerFailed("client", exc) from None
        if not chunk:
            break
        buf += chunk
        result = sniff_tls.server_name(buf) if buf[0] == 0x16 else sniff_http.host_name(buf)
        if isinstance(result, str):
            return buf, result
        if result is None:
            break
    return buf, None
