"""Two real squids behind one forwarder: when the first dies mid-run, clients opening a tunnel
every 20 ms see no failure once it is marked down (at most the tunnels in flight at the kill),
traffic moves to the second, and comes back when the first does (failover). Round-robin spreads
tunnels evenly; with every upstream down clients are reset at once and the log says so once.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from kit.client import Client
from kit.forwarder import Forwarder
from kit.origins import INDEX, ORIGIN_NAME
from kit.ticker import Ticker

from handyproxy.address import authority
from handyproxy.lab.netns import CLIENT_V4, ORIGIN_V4, UPSTREAM_V4, Lab

pytestmark = pytest.mark.integration

PORT_A, PORT_B = 3140, 3141
A = authority(UPSTREAM_V4, PORT_A)
B = authority(UPSTREAM_V4, PORT_B)


def upstream_of(forwarder: Forwarder) -> dict[int, str]:
    """Client port -> upstream, from the access records of tunnels that completed."""
    found = {}
    for record in forwarder.records():
        host, _, port = record.get("client", "").rpartition(":")
        if record.get("end") == "eof" and host == CLIENT_V4 and "upstream" in record:
            found[int(port)] = record["upstream"]
    return found


def test_killing_the_first_upstream_mid_run_costs_at_most_the_tunnels_in_flight(
    lab: Lab, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    squid_a = start_upstream("squid", port=PORT_A)
    squid_b = start_upstream("squid", port=PORT_B)
    forwarder = start_handyproxy(
        upstream_proxy=f"{A},{B}", upstream_probe_interval="1s", dial_timeout="10s"
    )
    with Ticker(lab, ORIGIN_V4, name=ORIGIN_NAME, expect=INDEX) as ticker:
        started = time.time()
        ticker.wait_attempts(25, after=started)

        killed = time.time()
        squid_a.kill()
        forwarder.log.wait_for(rf"upstream down .*upstream={re.escape(A)} ", 10)
        marked_down = time.time()
        ticker.wait_attempts(50, after=marked_down)

        squid_a.start_again(lab)
        forwarder.log.wait_for(
            rf"upstream up .*upstream={re.escape(A)} .*reason=\"probe connected\"", 15
        )
        back_up = time.time()
        ticker.wait_attempts(50, after=back_up)
        attempts = ticker.stop()
    completed = len([a for a in attempts if not a.error])
    forwarder.log.wait_for(r"tunnel end .*end=eof", 10, count=completed)  # the last records

    in_flight = {a.i for a in attempts if a.t0 <= killed <= a.t1}
    failed = [a for a in attempts if a.error]
    print(f"{len(attempts)} attempts, {len(in_flight)} in flight at the kill, failed: {failed}")
    assert {a.i for a in failed} <= in_flight, "a tunnel that was not in flight failed"
    assert not [a for a in failed if a.t0 > killed]
    served = upstream_of(forwarder)
    before = [served[a.port] for a in attempts if a.t1 < killed and not a.error]
    down = [served[a.port] for a in attempts if marked_down < a.t0 and a.t1 < back_up - 0.5]
    after = [served[a.port] for a in attempts if a.t0 > back_up + 0.5]
    assert len(before) >= 20 and set(before) == {A}
    assert len(down) >= 40 and set(down) == {B}, "traffic did not move to the second upstream"
    assert len(after) >= 20 and set(after) == {A}, "traffic did not return to the first"
    # each proxy's own log agrees
    assert len(squid_b.connects(f"{ORIGIN_V4}:80 ")) >= len(down)
    assert len(forwarder.log.matching(r"upstream down")) == 1
    assert len(forwarder.log.matching(r"upstream up")) == 1


def test_round_robin_spreads_tunnels_evenly(
    client: Client, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    squid_a = start_upstream("squid", port=PORT_A)
    squid_b = start_upstream("squid", port=PORT_B)
    forwarder = start_handyproxy(upstream_proxy=f"{A},{B}", upstream_policy="round-robin")
    for _ in range(20):
        result, _ = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
        assert result.returncode == 0, result.stderr
    forwarder.log.wait_for(r"tunnel end ", 10, count=20)
    served = [record["upstream"] for record in forwarder.records()]
    assert (served.count(A), served.count(B)) == (10, 10)
    assert all(x != y for x, y in itertools.pairwise(served)), "not taking turns"
    squid_a.log.wait_for(r" CONNECT ", 10, count=10)
    squid_b.log.wait_for(r" CONNECT ", 10, count=10)


def test_with_every_upstream_down_clients_are_reset_at_once_and_logged_once(
    client: Client, start_upstream, start_handyproxy
):
    squid_a = start_upstream("squid", port=PORT_A)
    squid_b = start_upstream("squid", port=PORT_B)
    forwarder = start_handyproxy(
        upstream_proxy=f"{A},{B}", upstream_probe_interval="30s", dial_timeout="10s"
    )
    squid_a.kill()
    squid_b.kill()
    for _ in range(20):
        assert client.expect_reset(4, 80, b"GET / HTTP/1.1\r\n\r\n") < 2.0
    matches = forwarder.log.wait_for(r"tunnel end .*end=connect-failed", 5, count=20)
    records = [m.string for m in matches]
    assert sum('reason="every upstream is down"' in r for r in records) >= 19
    assert len(forwarder.log.matching(r"every upstream is down: resetting clients")) == 1
    assert len(forwarder.log.matching(r"upstream down")) == 2
