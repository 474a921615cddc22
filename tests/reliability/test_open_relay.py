"""Not an open relay: the forwarder tunnels only connections the firewall redirected to it,
never to itself or to its upstream, never to a port a client names, and caps what one client or
everyone together can hold open.
"""

from __future__ import annotations

import pytest
from kit.origins import ORIGIN_NAME
from kit.wire import connect_or_reset, echo_works, recv_until_end, tls_client_hello

from handyproxy.address import authority
from handyproxy.lab.netns import (
    CLIENT_V4,
    ORIGIN_V4,
    ORIGIN_V6,
    PROXY_PORT,
    ROUTER_CLIENT_V4,
    ROUTER_UPSTREAM_V4,
    UPSTREAM_V4,
    UPSTREAM_V6,
)

pytestmark = pytest.mark.integration


def assert_refused(lab, fwd, upstream, host, port, reason):
    sock = connect_or_reset(lab, "client", host, port)
    data, how = b"", "reset"  # the refusal can beat connect() or our first write
    if sock is not None:
        try:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\n\r\n".encode())
        except ConnectionResetError:
            pass
        else:
            data, how = recv_until_end(sock, timeout=5)
        sock.close()
    assert (how, data) == ("reset", b"")
    record = fwd.wait_record(lambda r: r.get("reason") == reason)
    assert record["end"] == "refused"
    assert record["status"] == "-"
    assert upstream.events("connect") == [], "a refused connection reached the upstream"


def test_direct_connection_to_listener_is_refused(lab, start_upstream, start_handyproxy):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy()
    assert_refused(lab, fwd, upstream, ROUTER_CLIENT_V4, fwd.port, "not-redirected")


def test_connection_to_forwarders_other_address_is_refused(lab, start_upstream, start_handyproxy):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy()
    sock = connect_or_reset(lab, "upstream", ROUTER_UPSTREAM_V4, fwd.port)  # the upstream side
    data, how = recv_until_end(sock, timeout=5) if sock else (b"", "reset")
    if sock:
        sock.close()
    assert (how, data) == ("reset", b"")
    assert fwd.wait_record()["reason"] == "not-redirected"
    assert upstream.events("connect") == []


def test_connection_to_the_upstream_proxy_address_is_refused_as_a_loop(
    lab, start_upstream, start_handyproxy
):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy()
    assert_refused(lab, fwd, upstream, UPSTREAM_V4, PROXY_PORT, "loop")


def test_output_redirect_catching_our_own_upstream_dial_does_not_loop(
    lab, start_upstream, start_handyproxy
):
    """An OUTPUT rule without the uid exception redirects our own dial back to us: refused."""
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy(redirect=False)
    lab.redirect(fwd.port, chain="output")
    sock = connect_or_reset(lab, "router", CLIENT_V4, 80)  # any address the router can route to
    _, how = recv_until_end(sock, timeout=10) if sock else (b"", "reset")
    if sock:
        sock.close()
    assert how == "reset"
    loop = fwd.wait_record(lambda r: r["end"] == "refused")
    assert loop["reason"] == "loop"
    assert fwd.wait_record(lambda r: r["end"] != "refused")["end"] == "connect-failed"
    assert len(fwd.records()) == 2, "the redirect fed on itself"
    assert upstream.events("connect") == []
    assert fwd.alive()


@pytest.mark.parametrize(
    ("port", "first_bytes"),
    [
        (80, f"GET / HTTP/1.1\r\nHost: {ORIGIN_NAME}:{PROXY_PORT}\r\n\r\n".encode()),
        (443, tls_client_hello(ORIGIN_NAME)),
    ],
    ids=["http-host-with-port", "tls-sni"],
)
def test_sniffed_name_cannot_change_the_destination_port(
    lab, start_upstream, start_handyproxy, port, first_bytes
):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-sniff-timeout", "2s")
    sock = lab.connect("client", ORIGIN_V4, port)
    assert echo_works(sock, first_bytes)
    sock.close()
    connect = upstream.wait_event("connect")
    assert connect["target"] == f"{ORIGIN_NAME}:{port}"
    assert connect["host"] == f"{ORIGIN_NAME}:{port}"
    assert fwd.wait_record()["target"] == f"{ORIGIN_NAME}:{port}"


@pytest.mark.parametrize(
    "host",
    [
        UPSTREAM_V4,
        authority(UPSTREAM_V4, PROXY_PORT),
        authority(UPSTREAM_V6, PROXY_PORT),
        "localhost:8443",
    ],
)
def test_sniffed_address_or_local_name_is_not_used_as_the_target(
    lab, start_upstream, start_handyproxy, host
):
    """Host: naming the upstream by IP falls back to the original destination address."""
    upstream = start_upstream("builtin", mode="echo")
    start_handyproxy("-sniff-timeout", "2s")
    sock = lab.connect("client", ORIGIN_V4, 80)
    assert echo_works(sock, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    sock.close()
    target = upstream.wait_event("connect")["target"]
    if host.startswith("localhost"):
        # A name is passed on as a name (the upstream resolves it, in its own view), but
        # the port is still the original one.
        assert target == "localhost:80"
    else:
        assert target == f"{ORIGIN_V4}:80"


def test_sniff_ports_limits_sniffing_to_the_listed_ports(lab, start_upstream, start_handyproxy):
    upstream = start_upstream("builtin", mode="echo")
    start_handyproxy("-sniff-timeout", "2s", "-sniff-ports", "443")
    for port, first in (
        (80, f"GET / HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\n\r\n".encode()),
        (443, tls_client_hello(ORIGIN_NAME)),
        (8443, tls_client_hello(ORIGIN_NAME)),
    ):
        sock = lab.connect("client", ORIGIN_V4, port)
        assert echo_works(sock, first)
        sock.close()
    upstream.wait_events("connect", 3)
    targets = sorted(e["target"] for e in upstream.events("connect"))
    assert targets == [f"{ORIGIN_V4}:80", f"{ORIGIN_V4}:8443", f"{ORIGIN_NAME}:443"]


def test_per_client_cap_resets_the_extra_connection_only(lab, start_upstream, start_handyproxy):
    start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-max-client-connections", "3")
    baseline = fwd.fd_count()
    held = [lab.connect("client", ORIGIN_V4, 7000 + i) for i in range(3)]
    assert all(echo_works(s) for s in held)
    extra = connect_or_reset(lab, "client", ORIGIN_V4, 7100)
    _, how = recv_until_end(extra, timeout=5) if extra else (b"", "reset")
    if extra:
        extra.close()
    assert how == "reset"
    assert fwd.wait_record(lambda r: r["end"] == "refused")["reason"] == "client-cap"
    v6 = lab.connect("client", ORIGIN_V6, 7200)  # another client address: its own budget
    assert echo_works(v6)
    assert all(echo_works(s, b"still") for s in held)  # the cap hurt nobody else
    held[0].close()
    fwd.wait_record(lambda r: r["end"] == "eof")
    again = lab.connect("client", ORIGIN_V4, 7300)
    assert echo_works(again)
    for sock in [*held[1:], v6, again]:
        sock.close()
    assert fwd.wait_fds(baseline) == baseline


def test_connection_cap_resets_connections_over_it(lab, start_upstream, start_handyproxy):
    start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-max-connections", "4")
    held = [lab.connect("client", ORIGIN_V4 if i % 2 else ORIGIN_V6, 7000 + i) for i in range(4)]
    assert all(echo_works(s) for s in held)
    extra = connect_or_reset(lab, "client", ORIGIN_V6, 7100)
    _, how = recv_until_end(extra, timeout=5) if extra else (b"", "reset")
    if extra:
        extra.close()
    assert how == "reset"
    assert fwd.wait_record(lambda r: r["end"] == "refused")["reason"] == "connection-cap"
    held.pop().close()
    fwd.wait_record(lambda r: r["end"] == "eof")
    again = lab.connect("client", ORIGIN_V4, 7300)
    assert echo_works(again)
    for sock in [*held, again]:
        sock.close()
