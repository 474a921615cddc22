"""Happy Eyeballs (RFC 8305) on the real path: the upstream's name resolves to an IPv6 address
that drops every SYN and an IPv4 address that works. IPv6 is tried first; IPv4 starts 250 ms
later and wins, so the tunnel opens at once instead of after the whole -dial-timeout (which is
what one unreachable address used to cost). The next tunnel tries the winner first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from kit.client import Client
from kit.origins import INDEX

from handyproxy.lab.netns import (
    ORIGIN_V4,
    PROXY_PORT,
    ROUTER_UPSTREAM_V4,
    UPSTREAM_V4,
    UPSTREAM_V6,
    Lab,
)

pytestmark = pytest.mark.integration

TABLE = "hp_eyeballs"


@pytest.fixture
def black_holed_ipv6(lab: Lab) -> Iterator[None]:
    """The upstream host drops what the router sends to the proxy port over IPv6 (a broken v6
    path); its own readiness checks, over loopback, still pass. Both changes are undone after
    the test, so the shared lab stays as it was."""
    link = lab.device("upstream", "router")
    rules = (
        f"table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0;\n"
        f'    iifname "{link}" meta nfproto ipv6 tcp dport {PROXY_PORT} counter drop\n'
        "  }\n}\n"
    )
    lab.run("upstream", ["nft", "-f", "-"], input=rules, text=True, check=True)
    lab.hosts("router", {"proxy.lab": [UPSTREAM_V6, UPSTREAM_V4]})
    yield
    lab.hosts("router", {})
    lab.run("upstream", ["nft", "delete", "table", "inet", TABLE], check=False)


def dropped(lab: Lab) -> int:
    out = lab.run("upstream", ["nft", "-j", "list", "table", "inet", TABLE],
                  capture_output=True, text=True, check=True).stdout  # fmt: skip
    for item in json.loads(out)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise AssertionError(f"no counter in {out}")


def test_a_dead_ipv6_address_costs_250ms_not_the_dial_timeout(
    lab: Lab, black_holed_ipv6: None, client: Client, start_origin, start_upstream,
    start_handyproxy,
):  # fmt: skip
    start_origin("http")
    upstream = start_upstream("builtin")
    forwarder = start_handyproxy(upstream_proxy=f"proxy.lab:{PROXY_PORT}", dial_timeout="20s")
    started = time.monotonic()
    result, out = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert out.read_text() == INDEX
    assert took < 5.0, f"the tunnel took {took:.1f}s: the dead address ate the dial timeout"
    assert dropped(lab) >= 1, "IPv6 was not tried first"
    record = forwarder.access("status=200 ")
    assert f"upstream=proxy.lab:{PROXY_PORT} " in record
    # over IPv4: the proxy saw the router's IPv4 address
    assert upstream.wait_event("connect")["client"].rpartition(":")[0] == ROUTER_UPSTREAM_V4

    seen = dropped(lab)
    result, _ = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
    assert result.returncode == 0, result.stderr
    forwarder.log.wait_for(r"tunnel end .*status=200 ", 5, count=2)
    assert dropped(lab) == seen, "the address that connected last was not tried first"
