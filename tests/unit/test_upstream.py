"""The upstream set without namespaces: policies, health, retries, probes and Happy Eyeballs
against scripted CONNECT proxies on loopback ports (real sockets, real event loop).

A "black hole" is a listener whose accept queue is full: the kernel drops further SYNs, so a
connect to it hangs, as to a proxy host that vanished from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from kit.waiting import until

from handyproxy import config, readiness
from handyproxy.connect import ConnectError, basic_authorization
from handyproxy.log import logger
from handyproxy.upstream import Upstream, UpstreamSet, UpstreamSpec
from handyproxy.upstream import dial as updial
from handyproxy.upstream.spec import Credentials

OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


#: Every proxy a test started, closed by run() when the test ends.
STARTED: list[FakeProxy] = []


class FakeProxy:
    """A CONNECT proxy on 127.0.0.1: records each request, answers ``reply``, holds the tunnel."""

    def __init__(self, reply: bytes = OK, port: int = 0) -> None:
        STARTED.append(self)
        self.reply = reply
        self.port = port
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FakeProxy:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests.append(request)
        if self.reply:
            writer.write(self.reply)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # hold the tunnel until the forwarder closes it
        writer.close()

    async def stop(self) -> None:
        """Refuse new connections from now on (the port is closed)."""
        if self.server is None:
            return
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()
        self.server = None

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def spec(self, **kwargs: object) -> UpstreamSpec:
        return UpstreamSpec("127.0.0.1", self.port, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port where connects hang (full accept queue)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fill.append(s)
    try:
        yield port
    finally:
        for s in fill:
            s.close()
        listener.close()


def closed_port() -> int:
    """A loopback port where nothing listens (connects are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, text: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage().startswith(text)]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def run(coro: Callable[[], object]) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(coro(), 20)  # type: ignore[arg-type]
        finally:
            while STARTED:
                await STARTED.pop().stop()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def upstream_set(specs: list[UpstreamSpec], **options: object) -> AsyncIterator[UpstreamSet]:
    ups = UpstreamSet([Upstream(s) for s in specs], **options)  # type: ignore[arg-type]
    await ups.start(asyncio.get_running_loop())
    try:
        yield ups
    finally:
        ups.close()


async def tunnel(ups: UpstreamSet, group: str = "default", keep: list | None = None) -> str:
    """Open one tunnel; the name of the upstream that served it (closed unless ``keep``)."""
    opened = await ups.open("origin.test", 443, group)
    assert opened.upstream is not None
    if keep is not None:
        keep.append(opened)
    else:
        close(opened)
    return opened.upstream.name


def close(opened: object) -> None:
    opened.poll.close()  # type: ignore[attr-defined]
    opened.sock.close()  # type: ignore[attr-defined]
    if opened.upstream is not None:  # type: ignore[attr-defined]
        opened.upstream.tunnels_open -= 1  # type: ignore[attr-defined]  # as Tunnel.release


def by_name(ups: UpstreamSet, name: str) -> Upstream:
    return next(u for u in ups.upstreams if u.name == name)


# Policies


def test_failover_uses_the_first_healthy_upstream_in_order() -> None:
    async def main() -> None:
        a, b = await FakeProxy().start(), await FakeProxy().start()
        async with upstream_set([a.spec(), b.spec()]) as ups:
            assert [await tunnel(ups) for _ in range(5)] == [a.name] * 5
            assert (len(a.requests), len(b.requests)) == (5, 0)

    run(main)


def test_round_robin_spreads_evenly_over_the_healthy_ones() -> None:
    async def main() -> None:
        proxies = [await FakeProxy().start() for _ in range(3)]
        async with upstream_set([p.spec() for p in proxies], policy="round-robin") as ups:
            served = [await tunnel(ups) for _ in range(30)]
        assert [served.count(p.name) for p in proxies] == [10, 10, 10]
        assert served[:3] == [p.name for p in proxies]

    run(main)


def test_least_connections_sends_to_the_one_with_fewest_open_tunnels() -> None:
    async def main() -> None:
        a, b = await FakeProxy().start(), await FakeProxy().start()
        held: list = []
        async with upstream_set([a.spec(), b.spec()], policy="least-connections") as ups:
            first = [await tunnel(ups, keep=held) for _ in range(4)]
            assert sorted(first) == sorted([a.name, b.name] * 2)  # ties rotate
            close(next(o for o in held if o.upstream.name == b.name))
            assert await tunnel(ups, keep=held) == b.name  # b has 1 open, a has 2
            for opened in held:
                if opened.sock.fileno() >= 0:
                    close(opened)
            assert by_name(ups, a.name).tunnels_open == 0

    run(main)


# Health and retries


def test_a_dead_upstream_is_marked_down_once_and_the_tunnel_moves_on(records: Records) -> None:
    async def main() -> None:
        a, b = await FakeProxy().start(), await FakeProxy().start()
        async with upstream_set([a.spec(), b.spec()], probe_interval=60.0) as ups:
            assert await tunnel(ups) == a.name
            await a.stop()
            # The first tunnel after the death pays one refused connect, then b serves it.
            assert await tunnel(ups) == b.name
            up_a = by_name(ups, a.name)
            assert not up_a.up
            assert up_a.failures["refused"] == 1
            assert ups.retries == 1
            # Marked down: nobody dials a again, so no further failure and no further retry.
            assert [await tunnel(ups) for _ in range(5)] == [b.name] * 5
            assert (up_a.failures["refused"], ups.retries) == (1, 1)
        down = records.messages("upstream down")
        assert len(down) == 1
        assert down[0].fields["upstream"] == a.name  # type: ignore[attr-defined]
        assert "Connection refused" in down[0].fields["reason"]  # type: ignore[attr-defined]

    run(main)


def test_a_probe_brings_a_down_upstream_back_and_failover_returns_to_it(
    records: Records,
) -> None:
    async def main() -> None:
        a, b = await FakeProxy().start(), await FakeProxy().start()
        async with upstream_set([a.spec(), b.spec()], probe_interval=0.2) as ups:
            await a.stop()
            assert await tunnel(ups) == b.name
            up_a = by_name(ups, a.name)
            await asyncio.sleep(0.6)  # a few probes, all refused: still down, wait grew
            assert not up_a.up and up_a.probes >= 1 and up_a.probe_failures == up_a.probes
            assert up_a.probe_delay == 0.2  # capped by the probe interval
            a2 = await FakeProxy(port=a.port).start()
            await until(lambda: up_a.up)
            assert await tunnel(ups) == a.name
            assert a2.requests  # the tunnel, not the probe (a TCP probe sends nothing)
        (up,) = records.messages("upstream up")
        assert up.fields["reason"] == "probe connected"  # type: ignore[attr-defined]
        assert len(records.messages("upstream down")) == 1

    run(main)


def test_a_probe_target_must_answer_2xx_before_the_upstream_counts_as_up() -> None:
    async def main() -> None:
        a = await FakeProxy(reply=b"HTTP/1.1 502 Bad Gateway\r\n\r\n").start()
        b = await FakeProxy().start()
        creds = Credentials("alice", "pw", "test")
        specs = [a.spec(credentials=creds), b.spec()]
        async with upstream_set(specs, probe_interval=0.1, probe_target=("probe.test", 443)) as ups:
            up_a = by_name(ups, a.name)
            up_a.set_state(False, "test")
            await until(lambda: up_a.probes >= 2)
            assert not up_a.up
            assert up_a.down_reason == "probe CONNECT answered 502"
            probe = a.requests[0]
            assert probe.startswith(b"CONNECT probe.test:443 HTTP/1.1\r\n")
            assert b"Proxy-Authorization: " + basic_authorization("alice", "pw") in probe
            a.reply = OK
            await until(lambda: up_a.up)

    run(main)


def test_every_upstream_down_resets_at_once_and_logs_one_line(records: Records) -> None:
    async def main() -> None:
        specs = [UpstreamSpec("127.0.0.1", closed_port()) for _ in range(2)]
        async with upstream_set(specs, probe_interval=60.0) as ups:
            with pytest.raises(ConnectError) as first:
                await tunnel(ups)
            assert first.value.reason.count("Connection refused") == 2  # both were tried
            assert not any(u.up for u in ups.upstreams)
            started = time.monotonic()
            for _ in range(20):
                with pytest.raises(ConnectError) as info:
                    await tunnel(ups)
                assert info.value.reason == "every upstream is down"
            assert time.monotonic() - started < 0.5  # nothing was dialled
            assert sum(u.failures["refused"] for u in ups.upstreams) == 2
            assert ups.groups["default"].resets == 20
        assert len(records.messages("every upstream is down")) == 1
        assert len(records.messages("upstream down")) == 2

    run(main)


def test_the_only_upstream_of_a_group_is_tried_even_when_down(records: Records) -> None:
    """With one upstream the behaviour is exactly as before health checks existed."""

    async def main() -> None:
        a = await FakeProxy().start()
        async with upstream_set([a.spec()], probe_interval=60.0) as ups:
            await a.stop()
            with pytest.raises(ConnectError, match="Connection refused"):
                await tunnel(ups)
            up_a = by_name(ups, a.name)
            assert not up_a.up
            await FakeProxy(port=a.port).start()
            assert await tunnel(ups) == a.name  # tried at once, no probe needed
            assert up_a.up
        (up,) = records.messages("upstream up")
        assert up.fields["reason"] == "a tunnel got an answer"  # type: ignore[attr-defined]
        assert not records.messages("every upstream")

    run(main)


@pytest.mark.parametrize("status", [403, 407, 502])
def test_a_non_2xx_answer_is_the_proxys_decision_and_is_not_retried(status: int) -> None:
    async def main() -> None:
        a = await FakeProxy(reply=b"HTTP/1.1 %d No\r\n\r\n" % status).start()
        b = await FakeProxy().start()
        async with upstream_set([a.spec(), b.spec()]) as ups:
            with pytest.raises(ConnectError) as info:
                await tunnel(ups)
            assert info.value.status == status
            assert info.value.upstream == a.name
            assert b.requests == []
            up_a = by_name(ups, a.name)
            assert up_a.up and up_a.refusals == 1 and sum(up_a.failures.values()) == 0

    run(main)


def test_max_fails_counts_consecutive_failures() -> None:
    async def main() -> None:
        b = await FakeProxy().start()
        dead = UpstreamSpec("127.0.0.1", closed_port())
        async with upstream_set([dead, b.spec()], max_fails=3, probe_interval=60.0) as ups:
            up_dead = by_name(ups, dead.name)
            for n in range(1, 4):
                assert up_dead.up
                assert await tunnel(ups) == b.name
                assert up_dead.fails == (n if n < 3 else 0)
            assert not up_dead.up

    run(main)


def test_a_black_holed_upstream_costs_the_connect_timeout_then_the_next_serves() -> None:
    async def main() -> None:
        b = await FakeProxy().start()
        with black_hole() as port:
            hole = UpstreamSpec("127.0.0.1", port)
            async with upstream_set(
                [hole, b.spec()], connect_timeout=0.3, dial_timeout=10.0, probe_interval=60.0
            ) as ups:
                started = time.monotonic()
                assert await tunnel(ups) == b.name
                took = time.monotonic() - started
                assert 0.25 < took < 2.0
                assert by_name(ups, hole.name).failures["timeout"] == 1
                started = time.monotonic()
                assert await tunnel(ups) == b.name  # marked down: no wait any more
                assert time.monotonic() - started < 0.25

    run(main)


def test_retries_share_one_dial_timeout() -> None:
    async def main() -> None:
        silent = await FakeProxy(reply=b"").start()  # accepts, never answers
        with black_hole() as port:
            hole = UpstreamSpec("127.0.0.1", port)
            async with upstream_set(
                [hole, silent.spec()], connect_timeout=0.3, dial_timeout=0.8, probe_interval=60.0
            ) as ups:
                started = time.monotonic()
                with pytest.raises(ConnectError, match=r"no answer within 0\.8s"):
                    await tunnel(ups)
                assert 0.7 < time.monotonic() - started < 2.0

    run(main)


def test_credentials_go_in_the_request_and_a_407_names_the_scheme() -> None:
    async def main() -> None:
        challenge = (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="corp"\r\n'
            b"Proxy-Authenticate: NTLM\r\n\r\n"
        )
        a = await FakeProxy(reply=challenge).start()
        creds = Credentials("alice", "wrong", "test")
        async with upstream_set([a.spec(credentials=creds)]) as ups:
            with pytest.raises(ConnectError) as info:
                await tunnel(ups)
        assert b"\r\nProxy-Authorization: Basic YWxpY2U6d3Jvbmc=\r\n" in a.requests[0]
        assert info.value.status == 407
        assert info.value.reason == (
            "upstream wants proxy authentication (scheme Basic,NTLM); credentials refused"
        )
        assert "wrong" not in info.value.reason

    run(main)


# Reload


def test_from_config_keeps_the_state_of_upstreams_that_did_not_change() -> None:
    async def main() -> None:
        a, b, c = [await FakeProxy().start() for _ in range(3)]
        cfg = config.build(
            {"upstream-proxy": f"{a.name},{b.name}", "upstream-probe-interval": 60.0}
        )
        old = UpstreamSet.from_config(cfg)
        await old.start(asyncio.get_running_loop())
        assert await tunnel(old) == a.name
        await a.stop()
        assert await tunnel(old) == b.name
        old_a = by_name(old, a.name)
        cfg2 = config.build(
            {"upstream-proxy": f"{a.name},{c.name}", "upstream-policy": "round-robin"}
        )
        new = UpstreamSet.from_config(cfg2, previous=old)
        await new.start(asyncio.get_running_loop())
        old.close()
        try:
            assert by_name(new, a.name) is old_a  # same object: counters and health carry on
            assert not old_a.up and old_a.tunnels == 1
            assert by_name(new, c.name) is not by_name(old, b.name)
            assert new.policy == "round-robin"
            assert [await tunnel(new) for _ in range(3)] == [c.name] * 3  # a is still down
            await FakeProxy(port=a.port).start()
            old_a.set_state(True, "test")  # a state change reaches the new set's groups
            assert {await tunnel(new) for _ in range(2)} == {a.name, c.name}
        finally:
            new.close()

    run(main)


# Happy Eyeballs (RFC 8305)


def test_addresses_alternate_families_starting_with_ipv6() -> None:
    v4 = [(socket.AF_INET, (f"192.0.2.{i}", 1)) for i in (1, 2, 3)]
    v6 = [(socket.AF_INET6, (f"2001:db8::{i}", 1, 0, 0)) for i in (1, 2)]
    ordered = updial.order_addresses([*v4, *v6, v4[0]])
    assert [a[1][0] for a in ordered] == [
        "2001:db8::1",
        "192.0.2.1",
        "2001:db8::2",
        "192.0.2.2",
        "192.0.2.3",
    ]


async def race(ports: list[int]) -> tuple[int, float]:
    """Connect to the first of these loopback ports that answers: (winner's index, seconds)."""
    loop = asyncio.get_running_loop()
    addrs = [(socket.AF_INET, ("127.0.0.1", port)) for port in ports]
    deadline = updial.Deadline(loop, 10.0)
    started = time.monotonic()
    sock, poll, index = await updial.connect_first(loop, addrs, deadline)
    took = time.monotonic() - started
    deadline.cancel()
    updial.drop(sock, poll)
    return index, took


def test_a_hanging_first_address_gets_a_second_attempt_after_250ms() -> None:
    async def main() -> None:
        good = await FakeProxy().start()
        with black_hole() as port:
            index, took = await race([port, good.port])
        assert index == 1
        assert 0.2 <= took < 1.0, took

    run(main)


def test_a_refused_first_address_starts_the_next_at_once() -> None:
    async def main() -> None:
        good = await FakeProxy().start()
        index, took = await race([closed_port(), good.port])
        assert index == 1
        assert took < 0.2, took

    run(main)


def test_every_address_failing_names_each_one() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ports = [closed_port(), closed_port()]
        addrs = [(socket.AF_INET, ("127.0.0.1", p)) for p in ports]
        deadline = updial.Deadline(loop, 10.0)
        with pytest.raises(updial.Failure) as info:
            await updial.connect_first(loop, addrs, deadline)
        deadline.cancel()
        assert info.value.kind == "refused"
        assert info.value.text.count("Connection refused") == 2

    run(main)


def test_the_address_that_connected_is_tried_first_next_time() -> None:
    async def main() -> None:
        good = await FakeProxy().start()
        async with upstream_set([good.spec()]) as ups:
            up = ups.upstreams[0]
            hole_v4 = (socket.AF_INET, ("127.0.0.1", closed_port()))
            up.addrs = (hole_v4, *up.addrs)
            await tunnel(ups)
            assert up.addrs[0][1][1] == good.port
            assert len(up.addrs) == 2

    run(main)


def test_a_cancelled_dial_leaves_no_socket_open() -> None:
    """Shutdown cancels set-up tasks: every attempt of a race must be closed."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with black_hole() as port:
            addrs = [(socket.AF_INET, ("127.0.0.1", port))] * 3
            deadline = updial.Deadline(loop, 10.0)
            readiness.of(loop)  # the epoll every dial registers with, made on first use
            before = len(list_fds())
            task = loop.create_task(updial.connect_first(loop, addrs, deadline))
            # All three attempts start within 2 x CONNECTION_ATTEMPT_DELAY.
            await until(lambda: len(list_fds()) >= before + 3, "three attempts")
            assert len(list_fds()) == before + 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline.cancel()
            assert len(list_fds()) == before

    run(main)


def list_fds() -> list[str]:
    import os

    return os.listdir("/proc/self/fd")


def test_a_group_the_set_does_not_have_fails_the_tunnel_not_the_process() -> None:
    """During a reload a tunnel may carry rules of the old Config to the new set."""

    async def main() -> None:
        a = await FakeProxy().start()
        async with upstream_set([a.spec()]) as ups:
            with pytest.raises(ConnectError, match="no upstream group 'gone'"):
                await tunnel(ups, group="gone")
            assert a.requests == []

    run(main)
