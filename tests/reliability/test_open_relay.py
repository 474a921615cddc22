"""Not an open relay: the forwarder tunnels only connections the firewall redirected to it,
never to itself or to its upstream, never to a port a client names, and caps what one client or
everyone together can hold open.
"""

from __future__ import annotations

import pytest
from faultkit import (
    CLIENT,
    ORIGIN,
    ORIGIN6,
    ROUTER,
    UPSTREAM,
    client_hello,
    connect_or_reset,
    echo_works,
    recv_until_end,
    settle_fds,
)

pytestmark = pytest.mark.integration


def assert_refused(lab, fwd, upstream, host, port, reason):
    sock = connect_or_reset(lab, "client", host, port)
    data, how = b"", "reset"  # the refusal can beat connect() or our first write
    if sock is not None:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
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


def test_direct_connection_to_listener_is_refused(lab, start_fake, start_forwarder):
    upstream = start_fake("upstream", mode="echo")
    fwd = start_forwarder()
    assert_refused(lab, fwd, upstream, ROUTER, fwd.port, "not-redirected")


def test_connection_to_forwarders_other_address_is_refused(lab, start_fake, start_forwarder):
    upstream = start_fake("upstream", mode="echo")
    fwd = start_forwarder()
    sock = connect_or_reset(lab, "upstream", "203.0.113.1", fwd.port)  # from the upstream's side
    data, how = recv_until_end(sock, timeout=5) if sock else (b"", "reset")
    if sock:
        sock.close()
    assert (how, data) == ("reset", b"")
    assert fwd.wait_record()["reason"] == "not-redirected"
    assert upstream.events("connect") == []


def test_connection_to_the_upstream_proxy_address_is_refused_as_a_loop(
    lab, start_fake, start_forwarder
):
    upstream = start_fake("upstream", mode="echo")
    fwd = start_forwarder()
    assert_refused(lab, fwd, upstream, UPSTREAM, 3128, "loop")


def test_output_redirect_catching_our_own_upstream_dial_does_not_loop(
    lab, start_fake, start_forwarder
):
    """An OUTPUT rule without the uid exception redirects our own dial back to us: refused."""
    upstream = start_fake("upstream", mode="echo")
    fwd = start_forwarder(redirect=False)
    lab.redirect(fwd.port, chain="output")
    sock = connect_or_reset(lab, "router", CLIENT, 80)  # any address the router can route to
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
        (80, b"GET / HTTP/1.1\r\nHost: origin.test:3128\r\n\r\n"),
        (443, client_hello("origin.test")),
    ],
    ids=["http-host-with-port", "tls-sni"],
)
def test_sniffed_name_cannot_change_the_destination_port(
    lab, start_fake, start_forwarder, port, first_bytes
):
    upstream = start_fake("upstream", mode="echo")
    fwd = start_forwarder("-sniff-timeout", "2s")
    sock = lab.connect("client", ORIGIN, port)
    assert echo_works(sock, first_bytes)
    sock.close()
    connect = upstream.wait_event("connect")
    assert connect["target"] == f"origin.test:{port}"
    assert connect["host"] == f"origin.test:{port}"
    assert fwd.wait_record()["target"] == f"origin.test:{port}"


@pytest.mark.parametrize(
    "host", ["203.0.113.2", "203.0.113.2:3128", "[2001:db8:113::2]:3128", "localhost:8443"]
)
def test_sniffed_address_or_local_name_is_not_used_as_the_target(
    lab, start_fake, start_forwarder, host
):
    """Host: naming the upstream by IP falls back to the original destination address."""
    upstream = start_fake("upstream", mode="echo")
    start_forwarder("-sniff-timeout", "2s")
    sock = lab.connect("client", ORIGIN, 80)
    assert echo_works(sock, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    sock.close()
    target = upstream.wait_event("connect")["target"]
    if host.startswith("localhost"):
        # A name is passed on as a name (the upstream resolves it, in its own view), but
        # the port is still the original one.
        assert target == "localhost:80"
    else:
        assert target == f"{ORIGIN}:80"


def test_sniff_ports_limits_sniffing_to_the_listed_ports(lab, start_fake, start_forwarder):
    upstream = start_fake("upstream", mode="echo")
    start_forwarder("-sniff-timeout", "2s", "-sniff-ports", "443")
    for port, first in (
        (80, b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n"),
        (443, client_hello("origin.test")),
        (8443, client_hello("origin.test")),
    ):
        sock = lab.connect("client", ORIGIN, port)
        assert echo_works(sock, first)
        sock.close()
    targets = sorted(e["target"] for e in upstream.events("connect"))
    assert targets == [f"{ORIGIN}:80", f"{ORIGIN}:8443", "origin.test:443"]


def test_per_client_cap_resets_the_extra_connection_only(lab, start_fake, start_forwarder):
    start_fake("upstream", mode="echo")
    fwd = start_forwarder("-max-client-connections", "3")
    baseline = settle_fds(fwd)
    held = [lab.connect("client", ORIGIN, 7000 + i) for i in range(3)]
    assert all(echo_works(s) for s in held)
    extra = connect_or_reset(lab, "client", ORIGIN, 7100)
    _, how = recv_until_end(extra, timeout=5) if extra else (b"", "reset")
    if extra:
        extra.close()
    assert how == "reset"
    assert fwd.wait_record(lambda r: r["end"] == "refused")["reason"] == "client-cap"
    v6 = lab.connect("client", ORIGIN6, 7200)  # another client address: its own budget
    assert echo_works(v6)
    assert all(echo_works(s, b"still") for s in held)  # the cap hurt nobody else
    held[0].close()
    fwd.wait_record(lambda r: r["end"] == "eof")
    again = lab.connect("client", ORIGIN, 7300)
    assert echo_works(again)
    for sock in [*held[1:], v6, again]:
        sock.close()
    assert fwd.wait_fds(baseline) == baseline


def test_connection_cap_resets_connections_over_it(lab, start_fake, start_forwarder):
    start_fake("upstream", mode="echo")
    fwd = start_forwarder("-max-connections", "4")
    held = [lab.connect("client", ORIGIN if i % 2 else ORIGIN6, 7000 + i) for i in range(4)]
    assert all(echo_works(s) for s in held)
    extra = connect_or_reset(lab, "client", ORIGIN6, 7100)
    _, how = recv_until_end(extra, timeout=5) if extra else (b"", "reset")
    if extra:
        extra.close()
    assert how == "reset"
    assert fwd.wait_record(lambda r: r["end"] == "refused")["reason"] == "connection-cap"
    held.pop().close()
    fwd.wait_record(lambda r: r["end"] == "eof")
    again = lab.connect("client", ORIGIN, 7300)
    assert echo_works(again)
    for sock in [*held, again]:
        sock.close()
