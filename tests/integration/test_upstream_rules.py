"""Per-destination rules on the real path, proven by each proxy's access log: one destination
goes direct (no proxy sees it), a sniffed name goes to a second upstream group, a port is
rejected, and everything else takes the default upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import origins
from kit.client import Client
from kit.origins import INDEX, ORIGIN_NAME, Body, Origin
from kit.records import fields

from handyproxy.lab.netns import ORIGIN_V4, ROUTER_UPSTREAM_V4, UPSTREAM_V4, Lab

pytestmark = pytest.mark.integration

PORT_A, PORT_B = 3140, 3141
DIRECT_PORT = 8080  # an HTTP server on the upstream host, which the router reaches directly


@pytest.fixture
def direct_server(lab: Lab, body: Body) -> Iterator[Origin]:
    server = origins.launch(lab, "http", body.root, ns="upstream", port=DIRECT_PORT)
    yield server
    lab.stop(server.proc)
    print(f"--- direct server log:\n{server.log.text()}")


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(
        f"""
sniff-timeout = "1s"

[[upstream-proxy]]
address = "{UPSTREAM_V4}:{PORT_A}"

[[upstream-proxy]]
address = "{UPSTREAM_V4}:{PORT_B}"
group = "second"

[[rule]]
dst = "{UPSTREAM_V4}/32"
port = {DIRECT_PORT}
action = "direct"

[[rule]]
name = ".test"
port = 80
action = "proxy"
group = "second"

[[rule]]
port = 25
action = "reject"
"""
    )
    return path


def test_rules_send_one_destination_direct_and_another_to_the_second_upstream(
    relay: str, tmp_path: Path, client: Client, direct_server: Origin, start_origin,
    start_upstream, start_handyproxy,
):  # fmt: skip
    start_origin("http")
    start_origin("https")
    squid_a = start_upstream("squid", port=PORT_A)
    squid_b = start_upstream("squid", port=PORT_B)
    forwarder = start_handyproxy(config=write_config(tmp_path), upstream_proxy=None, relay=relay)
    a, b = squid_a.address, squid_b.address

    # rule 1: straight to the destination, no proxy involved
    result, out = client.curl(f"http://{UPSTREAM_V4}:{DIRECT_PORT}/index.html", 4)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == INDEX
    record = fields(forwarder.access(f"dst={UPSTREAM_V4}:{DIRECT_PORT} "))
    assert (record["upstream"], record["rule"], record["status"]) == ("direct", "1", "-")
    direct_server.log.wait_for(rf"origin {re.escape(ROUTER_UPSTREAM_V4)} .*GET /index.html")

    # rule 2: the sniffed name on port 80 goes to the second group
    result, _ = client.curl(f"http://{ORIGIN_NAME}/index.html", 4)
    assert result.returncode == 0, result.stderr
    record = fields(forwarder.access(f"target={ORIGIN_NAME}:80 "))
    assert (record["upstream"], record["rule"]) == (b, "2")

    # no rule: the same name on 443, and the bare IP on 80 (no name), take the default
    result, _ = client.curl(f"https://{ORIGIN_NAME}/index.html", 4)
    assert result.returncode == 0, result.stderr
    assert f"upstream={a} " in forwarder.access(f"target={ORIGIN_NAME}:443 ")
    result, _ = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
    assert result.returncode == 0, result.stderr
    record = fields(forwarder.access(f"target={ORIGIN_V4}:80 "))
    assert record["upstream"] == a and "rule" not in record

    # rule 3: reset, the proxies never hear of it
    client.expect_refused(4, 25, "origin", b"EHLO x\r\n")
    record = fields(forwarder.access("end=refused "))
    assert (record["reason"], record["rule"]) == ("rule", "3")

    # what each proxy saw, from its own access log
    squid_a.log.wait_for(rf" CONNECT {ORIGIN_V4}:80 ", 10)
    squid_a.log.wait_for(rf" CONNECT {ORIGIN_NAME}:443 ", 10)
    squid_b.log.wait_for(rf" CONNECT {ORIGIN_NAME}:80 ", 10)
    assert len(squid_a.connects()) == 2
    assert len(squid_b.connects()) == 1
    for squid in (squid_a, squid_b):
        assert not squid.connects(f"{UPSTREAM_V4}:{DIRECT_PORT}")
        assert not squid.connects(f"{ORIGIN_V4}:25")
