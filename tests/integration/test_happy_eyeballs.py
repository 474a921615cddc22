"""Happy Eyeballs (RFC 8305) on the real path: the upstream's name resolves to an IPv6 address
that drops every SYN and an IPv4 address that works. IPv6 is tried first; IPv4 starts 250 ms
later and wins, so the tunnel opens at once instead of after the whole -dial-timeout (which is
what one unreachable address used to cost). The next tunnel tries the winner first.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from pathkit import PROXY_PORT, Client

from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

TABLE = "hp_eyeballs"


@pytest.fixture
def black_holed_ipv6(lab: lablib.Lab) -> Iterator[None]:
    """The upstream host drops what the router sends to the proxy port over IPv6 (a broken v6
    path); its own readiness checks, over loopback, still pass."""
    link = lab.device("upstream", "router")
    rules = (
        f"table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0;\n"
        f'    iifname "{link}" meta nfproto ipv6 tcp dport {PROXY_PORT} counter drop\n'
        "  }\n}\n"
    )
    lab.run("upstream", ["nft", "-f", "-"], input=rules, text=True, check=True)
    lab.hosts("router", {"proxy.lab": [lablib.UPSTREAM_V6, lablib.UPSTREAM_V4]})
    yield
    lab.hosts("router", {})
    lab.run("upstream", ["nft", "delete", "table", "inet", TABLE], check=False)


def dropped(lab: lablib.Lab) -> int:
    out = lab.run("upstream", ["nft", "-j", "list", "table", "inet", TABLE],
                  capture_output=True, text=True, check=True).stdout  # fmt: skip
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def test_a_dead_ipv6_address_costs_250ms_not_the_dial_timeout(
    lab: lablib.Lab, black_holed_ipv6: None, client: Client, start_origin, start_upstream,
    start_handyproxy,
):  # fmt: skip
    start_origin("http")
    upstream = start_upstream("builtin")
    forwarder = start_handyproxy(upstream_proxy=f"proxy.lab:{PROXY_PORT}", dial_timeout="20s")
    started = time.monotonic()
    result, out = client.curl(f"http://{lablib.ORIGIN_V4}/index.html", 4)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "origin index\n"
    assert took < 5.0, f"the tunnel took {took:.1f}s: the dead address ate the dial timeout"
    assert dropped(lab) >= 1, "IPv6 was not tried first"
    record = forwarder.access("status=200 ")
    assert f"upstream=proxy.lab:{PROXY_PORT} " in record
    assert re.search(rf"client={re.escape(lablib.ROUTER_UPSTREAM_V4)}", upstream.log.text())

    seen = dropped(lab)
    result, _ = client.curl(f"http://{lablib.ORIGIN_V4}/index.html", 4)
    assert result.returncode == 0, result.stderr
    forwarder.log.wait_for(r"tunnel end .*status=200 ", 5, count=2)
    assert dropped(lab) == seen, "the address that connected last was not tried first"
