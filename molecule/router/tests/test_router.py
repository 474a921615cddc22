"""Scenario `router`: clients behind routers that run the role with PREROUTING capture.

Every test runs once per router (a Debian 12 and a Debian 13 one), with that router's client.
A client has no proxy settings at all; its default route is its router. The origin is on a
network only the upstream proxy reaches, so every byte a client gets from it came through its
router's forwarder and the proxy. Bodies are compared byte for byte by their SHA-256.
"""

from __future__ import annotations

import helpers
import pytest

testinfra_hosts = helpers.hosts_in("handyproxy")
# Every test takes the `host` fixture (the router) even when it only uses the client: pytest
# groups the tests of a parametrized fixture together and would move the others to the end,
# after the tests that read the log of their traffic.

LAB = helpers.lab()
# The tenants' instances (test_cntlm.py) come first; these tests are about instance `lan`, the
# same on every router.
INSTANCES = helpers.host_vars(testinfra_hosts[0])["handyproxy_instances"]
LAN = next(i for i in INSTANCES if i["name"] == "lan")
PORT = LAN["local_port"]
# The client runs curl with an empty environment: no *_proxy variable can be involved.
CURL = "env -i /usr/bin/curl -sS --max-time 20"


def test_instance_is_enabled_active_and_listening(host):
    service = host.service("handyproxy@lan.service")
    assert service.is_enabled
    assert service.is_running
    assert host.socket(f"tcp://{PORT}").is_listening


def test_table_redirects_exactly_the_client_network_in_prerouting(host, instances):
    table = helpers.nft_table(host)
    assert table is not None
    assert table.chains["prerouting"]["hook"] == "prerouting"
    assert table.redirects() == helpers.expected_redirects(instances), "\n".join(
        map(str, table.rules)
    )
    prerouting = table.in_chain("prerouting")
    # Connections to the router itself are left alone, before any redirect; then the rules in
    # inventory order, each instance's IPv4 and IPv6 rule, so a tenant's address matches first.
    assert str(prerouting[0]) == "prerouting: [any] fib daddr type == local return comment=''"
    assert [rule.verdict for rule in prerouting[1:]] == [
        f"redirect :{instance['local_port']}" for instance in instances for _family in (4, 6)
    ]
    assert not table.redirects() & set(table.in_chain("output"))


def test_client_has_no_proxy_and_routes_through_its_router(host, site, client):
    assert client.check_output("ip -4 route show default").startswith(
        f"default via {site['router_lan4']} "
    )
    assert client.check_output("ip -6 route show default").startswith(
        f"default via {site['router_lan6']} "
    )
    assert "proxy" not in client.check_output("env").lower()


@pytest.mark.parametrize(
    ("family", "url"),
    [
        ("ipv4", "http://{origin4}/blob"),
        ("ipv4", "https://{origin4}/blob"),
        ("ipv6", "http://[{origin6}]/blob"),
        ("ipv6", "https://[{origin6}]/blob"),
    ],
)
def test_client_gets_the_origin_blob_byte_identical(host, client, blob_sha256, family, url):
    url = url.format(**LAB)
    client.check_output(f"{CURL} -k --fail -o /tmp/blob %s", url)
    digest = client.check_output("sha256sum /tmp/blob").split()[0]
    assert digest == blob_sha256, f"{url} ({family}) body differs from the origin's"


def test_origin_saw_the_proxy_not_the_client(host, client):
    peer = client.check_output(f"{CURL} http://%s/whoami", LAB["origin4"])
    assert peer.removeprefix("::ffff:") == LAB["proxy_back4"]
    peer6 = client.check_output(f"{CURL} -k %s", f"https://[{LAB['origin6']}]/whoami")
    assert peer6 == LAB["proxy_back6"]


def test_proxy_log_shows_the_client_tunnels(host, proxy):
    log = proxy.check_output("cat /var/log/tinyproxy/corp.log")
    for target in (
        f"{LAB['origin4']}:80",
        f"{LAB['origin4']}:443",
        f"[{LAB['origin6']}]:80",
        f"[{LAB['origin6']}]:443",
    ):
        assert f"CONNECT {target} " in log, target


def test_forwarder_logged_the_client_and_its_original_destination(host, site):
    upstream = f"{LAB['proxy_mid4']}:3128"
    wanted = [
        # Each record names the upstream that carried the tunnel.
        f"dst={LAB['origin4']}:443 target={LAB['origin4']}:443 upstream={upstream} status=200",
        f"dst=[{LAB['origin6']}]:80 target=[{LAB['origin6']}]:80 upstream={upstream} status=200",
        f"client={site['client4']}:",
        f"client=[{site['client6']}]:",
    ]

    def logged() -> bool:
        # journald receives the forwarder's stderr asynchronously: allow it a moment.
        log = host.check_output("journalctl --no-pager -o cat -u handyproxy@lan.service")
        return all(line in log for line in wanted)

    assert helpers.wait_until(logged, timeout=10), helpers.journal(host)


def test_direct_connection_to_the_forwarder_port_is_refused(host, site, client):
    result = client.run(f"{CURL} http://%s:%s/", site["router_lan4"], str(PORT))
    # Reset (56) or closed without a reply (52): never an answer from anywhere.
    assert result.rc in (7, 52, 56), (result.rc, result.stdout, result.stderr)
    assert result.stdout == ""

    def logged() -> bool:
        log = host.check_output("journalctl --no-pager -o cat -u handyproxy@lan.service")
        return "end=refused" in log and f"dst={site['router_lan4']}:{PORT}" in log

    assert helpers.wait_until(logged, timeout=10), helpers.journal(host)


def test_uncaptured_port_does_not_get_through_the_router(host, client):
    # Port 8080 is not captured and the router does not forward: no way to the origin.
    result = client.run(f"{CURL} --max-time 5 http://%s:8080/", LAB["origin4"])
    assert result.rc != 0


def test_origin_is_unreachable_from_the_router_itself(host):
    # Only the proxy reaches the origin; the router's own traffic is not captured here.
    result = host.run("curl -sS --max-time 5 http://%s/", LAB["origin4"])
    assert result.rc != 0


def test_forwarder_came_from_the_package_index_with_checked_hashes(host, site, proxy):
    """The `index` install method: pip on the router fetched handyproxy and uvloop from the
    PEP 503 index the proxy container serves (its access log shows the downloads, each line
    starting with the address it came from), and no wheelhouse was pushed."""
    assert not host.file("/opt/handyproxy/wheelhouse").exists
    assert not host.file("/opt/handyproxy/requirements.txt").exists
    log = "\n".join(
        line
        for line in proxy.check_output(
            "journalctl --no-pager -o cat -u package-index.service"
        ).splitlines()
        if line.startswith(f"{site['router_mid4']} ")
    )
    assert "GET /simple/handyproxy/ " in log
    assert "GET /simple/uvloop/ " in log
    python = host.check_output(
        "/opt/handyproxy/venv/bin/python -c %s",
        "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')",
    )
    # The uvloop wheel for the router's own Python, out of the index's eight.
    fetched = [line for line in log.splitlines() if "GET /files/uvloop-" in line]
    assert fetched and all(f"-{python}-{python}-" in line for line in fetched), fetched
    freeze = host.check_output("/opt/handyproxy/venv/bin/pip freeze --all")
    assert "handyproxy==" in freeze and "uvloop==" in freeze
