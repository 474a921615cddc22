"""The upstreams of one worker: groups, the policy that orders them, and opening tunnels.

``UpstreamSet.open(host, port, group)`` is all a tunnel asks: it picks upstreams by policy among
the healthy ones of the group, dials (Happy Eyeballs), sends CONNECT and reads the reply, all
under one ``-dial-timeout``; an upstream that fails before it answers is charged for it and the
next healthy one is tried within what is left of the budget. An answer, whatever its status, is
the proxy's decision and is never retried elsewhere.

A set is built from a Config (``from_config``) and replaced whole on reload; tunnels opened
through the old one keep their sockets and need nothing from it. Background work (re-resolving
names, probing down upstreams) runs on timers owned by the set and stops with ``close()``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from handyproxy import connect
from handyproxy.address import authority, split_hostport, unmap
from handyproxy.connect import ConnectError
from handyproxy.log import logger
from handyproxy.upstream.dial import (
    Deadline,
    Expired,
    Failure,
    UpstreamPoll,
    connect_first,
    drop,
    exchange,
    resolve,
)
from handyproxy.upstream.health import Upstream
from handyproxy.upstream.spec import DEFAULT_GROUP

if TYPE_CHECKING:
    from handyproxy.config import Config

#: Names are resolved again this often, so a DNS change needs no restart.
RESOLVE_EVERY = 60.0
#: At start, how long resolving may hold up accepting; later attempts run in the background.
START_RESOLVE_TIMEOUT = 5.0
#: A probe (connect, and CONNECT to the probe target when one is set) must finish this fast.
PROBE_TIMEOUT = 10.0
#: "Every upstream is down" is logged at most this often per group, with a count.
ALL_DOWN_LOG_EVERY = 10.0


class Opened(NamedTuple):
    """A tunnel's upstream side, connected and past the CONNECT reply."""

    sock: socket.socket
    leftover: bytes  # origin bytes that came with the reply
    #: The socket's registration for the relay to take over: always a parked reader (the
    #: state the CONNECT exchange ends in), never a writer.
    poll: UpstreamPoll
    upstream: Upstream | None  # None for a direct connection
    status: int | None


class Group:
    """The upstreams a rule (or the default) sends tunnels to, and the policy's state."""

    __slots__ = ("down_logged", "down_resets", "healthy", "members", "name", "resets", "turn")

    def __init__(self, name: str, members: Sequence[Upstream]) -> None:
        self.name = name
        self.members = tuple(members)
        self.healthy = self.members
        self.turn = 0
        self.down_logged = -ALL_DOWN_LOG_EVERY
        self.down_resets = 0  # since the last "every upstream is down" line
        self.resets = 0  # tunnels reset because every member was down (a metric)

    def refresh(self) -> None:
        self.healthy = tuple(u for u in self.members if u.up)

    def pick(self, policy: str) -> Sequence[Upstream]:
        """The upstreams to try, in order; empty when every one is down.

        A group of one is always tried: with nowhere else to go, trying costs a client nothing
        it would not lose anyway, and one upstream behaves exactly as it did before health.
        """
        healthy = self.healthy
        n = len(healthy)
        if n <= 1:
            return healthy if n else self.members if len(self.members) == 1 else ()
        if policy == "failover":
            return healthy
        turn = self.turn % n
        self.turn = turn + 1
        rotated = healthy[turn:] + healthy[:turn]
        if policy == "least-connections":
            return sorted(rotated, key=_open_tunnels)  # stable: ties keep the rotation
        return rotated


def _open_tunnels(upstream: Upstream) -> int:
    return upstream.tunnels_open


class UpstreamSet:
    """Every upstream of one worker, grouped, with the settings that say how to use them."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        policy: str = "failover",
        dial_timeout: float = 180.0,
        connect_timeout: float = 3.0,
        max_fails: int = 1,
        probe_interval: float = 5.0,
        probe_target: tuple[str, int] | None = None,
        allow_upstream_ports: bool = False,
    ) -> None:
        self.upstreams = tuple(upstreams)
        names: dict[str, list[Upstream]] = {}
        for up in self.upstreams:
            names.setdefault(up.group, []).append(up)
        self.groups = {name: Group(name, members) for name, members in names.items()}
        self.policy = policy
        self.dial_timeout = dial_timeout
        self.connect_timeout = connect_timeout
        self.max_fails = max_fails
        self.probe_interval = probe_interval
        self.probe_target = probe_target
        #: Every port an upstream listens on: another address of its host on that port would
        #: reach the proxy itself, so the loop guard refuses them (unless allowed).
        self.ports = frozenset(up.spec.port for up in self.upstreams)
        self.guarded_ports = frozenset() if allow_upstream_ports else self.ports
        self.endpoints: frozenset[tuple[str, int]] = frozenset()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.closed = False
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled: set[tuple[str, Upstream]] = set()  # one chain per job and upstream
        # Figures for metrics (per upstream ones live on each Upstream).
        self.retries = 0  # attempts moved on to the next upstream
        self.direct_tunnels = 0  # tunnels opened straight to the destination by a rule
        self.refresh_endpoints()

    @classmethod
    def from_config(cls, cfg: Config, previous: UpstreamSet | None = None) -> UpstreamSet:
        """The set a Config describes; upstreams unchanged since ``previous`` keep their state
        (addresses, health, counters), so a reload neither forgets nor re-learns them."""
        known = {up.spec: up for up in previous.upstreams} if previous else {}
        probe = split_hostport(cfg.upstream_probe_target) if cfg.upstream_probe_target else None
        return cls(
            [known.get(spec) or Upstream(spec) for spec in cfg.upstreams],
            policy=cfg.upstream_policy,
            dial_timeout=cfg.dial_timeout,
            connect_timeout=cfg.upstream_connect_timeout,
            max_fails=cfg.upstream_max_fails,
            probe_interval=cfg.upstream_probe_interval,
            probe_target=probe,
            allow_upstream_ports=cfg.allow_upstream_ports,
        )

    # Lifecycle

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the upstreams over, resolve the names that have no address yet (bounded), and
        start the background work."""
        self.loop = loop
        for up in self.upstreams:
            up.on_change = self.changed
        fresh = [up for up in self.upstreams if not up.numeric and not up.addrs]
        why: dict[Upstream, str | None] = {}

        async def first(up: Upstream) -> None:
            why[up] = await self.resolve(up)

        if fresh:
            await asyncio.wait(
                [loop.create_task(first(up)) for up in fresh], timeout=START_RESOLVE_TIMEOUT
            )
        for group in self.groups.values():
            group.refresh()
        for up in self.upstreams:
            if up.up and not up.addrs:  # changed() logs it and schedules the probe
                unusable = "the address is not usable here" if up.numeric else "no address yet"
                up.set_state(False, why.get(up) or unusable)
            elif not up.up:
                self.later(up.probe_delay, self.probe, up)
            elif not up.numeric:
                self.later(RESOLVE_EVERY, self.refresh_names, up)

    def close(self) -> None:
        """Stop the background work; tunnels already open are not touched."""
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        self._timers.clear()
        self._scheduled.clear()

    def later(self, delay: float, job: Callable[[Upstream], Awaitable[None]], up: Upstream) -> None:
        """Run ``job(up)`` as a background task after ``delay`` seconds, unless closed by then
        or already scheduled (a flapping upstream must not grow a second chain of probes)."""
        key = (job.__name__, up)
        if self.closed or key in self._scheduled:
            return
        self._scheduled.add(key)

        def spawn() -> None:
            self._timers.discard(timer)
            self._scheduled.discard(key)
            if self.closed:
                return
            task = self.loop.create_task(job(up))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        timer = self.loop.call_later(delay, spawn)
        self._timers.add(timer)

    # Health

    def changed(self, up: Upstream, reason: str) -> None:
        """An upstream went down or came back: log it once, re-sort its group, probe if down."""
        for group in self.groups.values():
            if up in group.members:
                group.refresh()
        fields = {"upstream": up.name, "group": up.group, "reason": reason}
        if up.up:
            if up.down_since:
                fields["down_for"] = f"{time.monotonic() - up.down_since:.1f}s"
            logger.info("upstream up", extra={"fields": fields})
            if not up.numeric:
                self.later(RESOLVE_EVERY, self.refresh_names, up)
        else:
            up.down_since = time.monotonic()
            logger.warning("upstream down", extra={"fields": fields})
            self.later(min(up.probe_delay, self.probe_interval), self.probe, up)

    async def resolve(self, up: Upstream) -> str | None:
        """Look the name up; keep the old addresses when the resolver fails (returns why)."""
        try:
            addrs = await resolve(self.loop, up.spec.host, up.spec.port)
        except Failure as exc:
            return exc.text
        if set(addrs) != set(up.addrs):
            up.addrs = addrs
            self.refresh_endpoints()
        return None

    async def refresh_names(self, up: Upstream) -> None:
        if up.up:
            await self.resolve(up)
            self.later(RESOLVE_EVERY, self.refresh_names, up)

    def refresh_endpoints(self) -> None:
        self.endpoints = frozenset(
            (unmap(sockaddr[0]), sockaddr[1]) for up in self.upstreams for _, sockaddr in up.addrs
        )

    async def probe(self, up: Upstream) -> None:
        """While down: connect (and CONNECT to the probe target when set); up on success,
        else try again after twice the wait, up to the probe interval."""
        if up.up:
            return
        up.probes += 1
        reason = await self.try_probe(up)
        if up.up:  # a tunnel brought it back meanwhile
            return
        if reason is None:
            up.set_state(True, self.probe_success())
            return
        up.probe_failures += 1
        up.down_reason = reason
        up.probe_delay = min(up.probe_delay * 2, self.probe_interval)
        self.later(up.probe_delay, self.probe, up)

    def probe_success(self) -> str:
        if self.probe_target is None:
            return "probe connected"
        return f"probe CONNECT {authority(*self.probe_target)} answered 2xx"

    async def try_probe(self, up: Upstream) -> str | None:
        """None when the probe succeeded, else why it failed."""
        deadline = Deadline(self.loop, min(self.dial_timeout, PROBE_TIMEOUT))
        sock = poll = None
        try:
            if not up.numeric:
                unresolved = await self.resolve(up)
                if unresolved and not up.addrs:
                    return unresolved
            sock, poll, _ = await connect_first(self.loop, up.addrs, deadline)
            if self.probe_target is not None:
                request = connect.build_request(*self.probe_target, up.authorization)
                status, _, _ = await exchange(sock, poll, request, deadline)
                if not 200 <= status < 300:
                    return f"probe CONNECT answered {status}"
        except Failure as exc:
            return exc.text
        except Expired:
            return f"probe: no answer within {min(self.dial_timeout, PROBE_TIMEOUT):g}s"
        except ConnectError as exc:
            return exc.reason
        finally:
            deadline.cancel()
            drop(sock, poll)
        return None

    # Opening tunnels

    async def open(self, host: str, port: int, group: str = DEFAULT_GROUP) -> Opened:
        """A tunnel to ``host:port`` through an upstream of ``group``; raises ConnectError.

        The request names ``host`` as given (a sniffed name or the original IP).
        """
        grp = self.groups.get(group)
        if grp is None:  # rules from another Config than this set (a reload in between)
            raise ConnectError(f"no upstream group {group!r}")
        candidates = grp.pick(self.policy)
        if not candidates:
            raise self.all_down(grp)
        loop = self.loop
        deadline = Deadline(loop, self.dial_timeout)
        errors: list[str] = []
        up = candidates[0]
        try:
            last = len(candidates) - 1
            for i, up in enumerate(candidates):
                if i:
                    if not up.up:  # marked down by another tunnel meanwhile
                        continue
                    self.retries += 1
                if i < last:  # another upstream can take over: do not wait on this one
                    deadline.limit(self.connect_timeout)
                sock = poll = None
                try:
                    sock, poll, index = await connect_first(loop, up.addrs, deadline)
                    deadline.unlimit()
                    if index:
                        up.prefer(index)
                    request = connect.build_request(host, port, up.authorization)
                    status, buf, end = await exchange(sock, poll, request, deadline)
                except Failure as exc:
                    drop(sock, poll)
                    deadline.unlimit()
                    up.failed(exc.kind, exc.text, self.max_fails)
                    errors.append(f"{up.name}: {exc.text}")
                    if deadline.expired:
                        break
                    continue
                except Expired as exc:
                    drop(sock, poll)
                    deadline.unlimit()
                    if exc.limit:
                        text = f"no connection within {self.connect_timeout:g}s"
                    else:
                        text = f"no answer within {self.dial_timeout:g}s"
                    up.failed("timeout", text, self.max_fails)
                    errors.append(f"{up.name}: {text}")
                    if exc.limit:
                        continue
                    break
                except BaseException:
                    drop(sock, poll)
                    raise
                up.answered()
                if 200 <= status < 300:
                    up.tunnels += 1
                    up.tunnels_open += 1
                    return Opened(sock, buf[end:], poll, up, status)
                drop(sock, poll)
                up.refusals += 1
                raise ConnectError(refusal(status, buf[:end], up), status, up.name)
        finally:
            deadline.cancel()
        raise ConnectError("; ".join(errors) or "no upstream left to try", None, up.name)

    async def direct(self, ip: str, port: int) -> Opened:
        """A connection straight to the original destination (a ``direct`` rule)."""
        deadline = Deadline(self.loop, self.dial_timeout)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            sock, poll, _ = await connect_first(self.loop, ((family, (ip, port)),), deadline)
        except Failure as exc:
            raise ConnectError(f"direct connection failed: {exc.text}") from None
        except Expired:
            text = f"direct connection: no answer within {self.dial_timeout:g}s"
            raise ConnectError(text) from None
        finally:
            deadline.cancel()
        poll.want(write=False)  # park a reader, as after a CONNECT reply
        self.direct_tunnels += 1
        return Opened(sock, b"", poll, None, None)

    def all_down(self, group: Group) -> ConnectError:
        """Every upstream of the group is down: the client is reset; log once per interval."""
        group.resets += 1
        group.down_resets += 1
        now = time.monotonic()
        where = "" if group.name == DEFAULT_GROUP else f" of group {group.name}"
        if now - group.down_logged >= ALL_DOWN_LOG_EVERY:
            logger.warning(
                f"every upstream{where} is down: resetting clients",
                extra={
                    "fields": {
                        "group": group.name,
                        "reset": group.down_resets,
                        "upstreams": ",".join(u.name for u in group.members),
                    }
                },
            )
            group.down_logged = now
            group.down_resets = 0
        return ConnectError(f"every upstream{where} is down")


def refusal(status: int, header: bytes, up: Upstream) -> str:
    """The access record's reason for a non-2xx answer; for 407, the schemes it asked for."""
    if status != 407:
        return "upstream refused the tunnel"
    schemes = ",".join(connect.auth_schemes(header)) or "none named"
    sent = "credentials refused" if up.authorization else "no credentials configured"
    return f"upstream wants proxy authentication (scheme {schemes}); {sent}"
