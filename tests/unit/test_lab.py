"""The lab's pure parts and its built-in CONNECT proxy, without root: names, the nftables text,
and the proxy speaking to servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from kit.records import fields

from handyproxy.lab import connect_proxy as cp
from handyproxy.lab import netns as lablib

# Names and addresses


def test_lab_names_are_unique_per_instance_and_fit_interface_limits():
    a, b = lablib.Lab(), lablib.Lab()

    assert a.prefix != b.prefix
    assert a.ns("client") == f"{a.prefix}-client"
    assert a.ns("already-a-name") == "already-a-name"
    devices = [a.device(x, y) for x in lablib.ROLES for y in lablib.ROLES if x != y]
    assert len(set(devices)) == len(devices)
    assert all(len(dev) <= 15 for dev in devices)


@pytest.mark.parametrize("prefix", ["UPPER", "with-dash", "x" * 13])
def test_lab_rejects_a_prefix_that_would_break_device_names(prefix):
    with pytest.raises(ValueError, match="prefix"):
        lablib.Lab(prefix)


def test_lab_addresses_stay_inside_the_documentation_ranges():
    import ipaddress

    allowed = [ipaddress.ip_network(n) for n in
               ("198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15", "2001:db8::/32")]  # fmt: skip
    for version in (4, 6):
        for address in lablib.ADDRESSES[version].values():
            ip = ipaddress.ip_address(address)
            assert ip.version == version
            assert any(ip in net for net in allowed), address


# The REDIRECT rule


def test_prerouting_rule_skips_local_destinations_before_redirecting():
    text = lablib.redirect_ruleset(8443)

    assert "type nat hook prerouting priority dstnat;" in text
    lines = [line.strip() for line in text.splitlines()]
    assert lines.index("fib daddr type local return") < lines.index(
        "meta l4proto tcp redirect to :8443"
    )


def test_output_rule_exempts_the_forwarders_uid_first():
    text = lablib.redirect_ruleset(9000, chain="output", family="ipv6", skip_uid=999)

    lines = [
        line.strip()
        for line in text.splitlines()
        if line.startswith("        ") and not line.strip().startswith("type ")
    ]
    assert lines == [
        "meta skuid 999 return",
        "fib daddr type local return",
        "meta nfproto ipv6 meta l4proto tcp redirect to :9000",
    ]
    assert "type nat hook output priority -100;" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"chain": "input"}, "chain"), ({"family": "inet"}, "family"), ({"port": 0}, "port")],
)
def test_redirect_rule_rejects_bad_arguments(kwargs, message):
    args = {"port": 8443, **kwargs}
    with pytest.raises(ValueError, match=message):
        lablib.redirect_ruleset(**args)


def test_cleanup_stale_ignores_namespaces_it_did_not_create(tmp_path, monkeypatch):
    monkeypatch.setattr(lablib, "OWNER_DIR", tmp_path / "missing")
    assert lablib.cleanup_stale() == []


# The built-in CONNECT proxy: its --listen addresses (targets are split by handyproxy.address)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":3128", (None, 3128)),
        ("203.0.113.2:3128", ("203.0.113.2", 3128)),
        ("[2001:db8:113::2]:8443", ("2001:db8:113::2", 8443)),
    ],
)
def test_listen_addresses_parse_with_brackets_for_ipv6_and_a_bare_port_for_all(text, expected):
    assert cp.listen_address(text) == expected


@pytest.mark.parametrize("text", ["203.0.113.2", "2001:db8::1:80", "[::1]", "[::1]x", "h:99999"])
def test_listen_addresses_without_a_clear_port_are_rejected(text):
    with pytest.raises(ValueError):
        cp.listen_address(text)


def test_allow_list_matches_host_or_host_and_port_globs():
    assert cp.allowed("anything", 1, [])
    assert cp.allowed("Origin.Test", 80, ["origin.test"])
    assert cp.allowed("a.example", 443, ["*.example:443"])
    assert not cp.allowed("a.example", 80, ["*.example:443"])
    assert not cp.allowed("198.18.0.2", 80, ["origin.test"])


# The built-in CONNECT proxy: talking to it on 127.0.0.1


async def _start(handler: Callable[..., Awaitable[None]]) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def running(options: cp.Options) -> AsyncIterator[int]:
    proxy = cp.ConnectProxy(options)
    server, port = await _start(proxy.handle)
    try:
        yield port
    finally:
        server.close()
        await proxy.close()
        await server.wait_closed()


async def _echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


async def _banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 hello\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def _exchange(port: int, request: bytes, then: bytes | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if then is not None:
        writer.write(then)
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


def test_connect_proxy_tunnels_and_passes_the_half_close_on():
    async def scenario() -> bytes:
        origin, origin_port = await _start(_echo_after_eof)
        async with running(cp.Options()) as port:
            request = f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n\r\n".encode()
            data = await _exchange(port, request, then=b"ping")
        origin.close()
        await origin.wait_closed()
        return data

    assert asyncio.run(scenario()) == b"HTTP/1.1 200 Connection established\r\n\r\necho:ping"


def test_connect_proxy_greedy_sends_origin_banner_with_the_200_in_one_read():
    async def scenario() -> bytes:
        origin, origin_port = await _start(_banner)
        async with running(cp.Options(greedy=True)) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\n\r\n".encode())
            first = await asyncio.wait_for(reader.read(65536), 5)
            writer.close()
            await writer.wait_closed()
        origin.close()
        await origin.wait_closed()
        return first

    assert asyncio.run(scenario()) == b"HTTP/1.1 200 Connection established\r\n\r\n220 hello\r\n"


@pytest.mark.parametrize(
    ("options", "request_line", "status"),
    [
        (cp.Options(), b"GET http://x/ HTTP/1.1", b"405"),
        (cp.Options(allow=("origin.test",)), b"CONNECT 127.0.0.1:1 HTTP/1.1", b"403"),
        (cp.Options(), b"CONNECT 127.0.0.1:1 HTTP/1.1", b"502"),
        (cp.Options(reply_status=407), b"CONNECT origin.test:443 HTTP/1.1", b"407"),
        (cp.Options(), b"CONNECT no-port HTTP/1.1", b"400"),
    ],
    ids=["other-method", "not-allowed", "dial-fails", "forced-status", "bad-target"],
)
def test_connect_proxy_answers_errors_with_a_status_and_closes(options, request_line, status):
    async def scenario() -> bytes:
        async with running(options) as port:
            return await _exchange(port, request_line + b"\r\nHost: x\r\n\r\n")

    reply = asyncio.run(scenario())
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert reply.endswith(b"\r\n\r\n")


def test_connect_proxy_echo_mode_logs_the_connect_and_how_the_tunnel_ended(caplog):
    async def scenario() -> bytes:
        async with running(cp.Options(mode="echo")) as port:
            request = b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n"
            return await _exchange(port, request, then=b"ping")

    with caplog.at_level(logging.INFO, logger=cp.log.name):
        reply = asyncio.run(scenario())

    assert reply == b"HTTP/1.1 200 Connection established\r\n\r\nping"
    connect, end = (r.getMessage() for r in caplog.records)
    assert connect.startswith("CONNECT origin.test:443 ")
    assert {k: fields(connect)[k] for k in ("id", "host", "status")} == {
        "id": "1", "host": "origin.test:443", "status": "200"
    }  # fmt: skip
    assert fields(connect)["client"].startswith("127.0.0.1:")
    assert end.startswith("tunnel end ")
    assert {k: fields(end)[k] for k in ("id", "target", "up", "down", "end")} == {
        "id": "1", "target": "origin.test:443", "up": "4", "down": "4", "end": "eof"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("options", "sent", "got"),
    [
        (cp.Options(mode="reset-after-200"), b"", b""),
        (cp.Options(mode="echo", fault="reset", after=6), b"abc", b"abc"),
    ],
    ids=["reset-after-200", "fault-reset-after-n-bytes"],
)
def test_connect_proxy_faults_end_the_tunnel_with_a_reset(options, sent, got):
    async def scenario() -> tuple[bytes, bool]:
        async with running(options) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"CONNECT origin.test:443 HTTP/1.1\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            data = b""
            if sent:
                writer.write(sent)
                data = await asyncio.wait_for(reader.readexactly(len(sent)), 5)
                writer.write(sent)  # these cross the fault's threshold
            try:
                rest = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                reset = True
            else:
                reset, data = False, data + rest
            writer.close()
            return data, reset

    assert asyncio.run(scenario()) == (got, True)


def test_demo_names_what_is_missing_and_exits_nonzero(monkeypatch, capsys):
    from handyproxy.lab import demo

    monkeypatch.setattr(demo, "missing_requirements", lambda: ["root (for namespaces)"])

    assert demo.main([]) == 1
    assert "handyproxy demo: needs root (for namespaces)" in capsys.readouterr().err
