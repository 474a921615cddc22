"""Scenario `router`, the tenants: one cNTLM per credential owner, managed by the role.

Behind each router, two tenants (further addresses of its client) each have an instance whose
`cntlm` block names their NTLM credentials. The role installs cntlm from the .deb it pushed (the
routers have no mirror) without Debian's own service, runs handyproxy-cntlm@tenant-a and
@tenant-b on their loopback ports in front of a squid that accepts NTLM only, and the squid log
names the user each tenant's tunnels came with, from that router. Both families are tried from
each tenant address. Every test runs once per router.
"""

from __future__ import annotations

import helpers
import pytest

testinfra_hosts = helpers.hosts_in("handyproxy")

LAB = helpers.lab()
# The tenants' names, ports and credentials are the same on every router; their addresses
# (`site`) are not.
INSTANCES = helpers.host_vars(testinfra_hosts[0])["handyproxy_instances"]
TENANTS = {i["name"]: i for i in INSTANCES if "cntlm" in i}
SQUID_LOG = "/var/log/squid/access.log"
ORIGIN_NAME = LAB["ntlm_proxy"]["origin_name"]
CURL = "env -i /usr/bin/curl -sS --max-time 20 -k --fail"


def test_stock_cntlm_service_is_masked_and_nothing_took_its_port(host):
    assert host.package("cntlm").is_installed
    assert host.check_output("systemctl is-enabled cntlm.service || true") == "masked"
    assert not host.service("cntlm.service").is_running
    assert not host.socket("tcp://127.0.0.1:3128").is_listening
    # The role's policy-rc.d was only there during the install.
    assert not host.file("/usr/sbin/policy-rc.d").exists


@pytest.mark.parametrize("name", sorted(TENANTS))
def test_each_owner_runs_its_own_hardened_cntlm_on_its_loopback_port(host, name):
    port = TENANTS[name]["cntlm"]["port"]
    unit = f"handyproxy-cntlm@{name}.service"
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running
    assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
    show = "systemctl show -p User -p NoNewPrivileges -p ProtectSystem -p CapabilityBoundingSet"
    props = host.check_output(f"{show} {unit}").splitlines()
    assert "User=handyproxy-cntlm" in props
    assert "NoNewPrivileges=yes" in props
    assert "ProtectSystem=strict" in props
    assert "CapabilityBoundingSet=" in props
    pid = host.check_output(f"systemctl show -p MainPID --value {unit}")
    assert host.check_output(f"ps -o user:32= -p {pid}") == "handyproxy-cntlm"


@pytest.mark.parametrize("name", sorted(TENANTS))
def test_owner_file_is_root_only_and_holds_the_hash_not_the_password(host, name):
    block = TENANTS[name]["cntlm"]
    conf = host.file(f"/etc/handyproxy/cntlm/{name}.conf")
    assert (conf.user, conf.group, conf.mode) == ("root", "root", 0o600)
    text = conf.content_string
    assert block["password"] not in text
    lines = [line.split(None, 1) for line in text.splitlines() if line and line[0] != "#"]
    settings = {key: value for key, value in lines}
    assert settings["Username"] == block["user"]
    assert settings["Auth"] == "NT"
    assert settings["Listen"] == f"127.0.0.1:{block['port']}"
    assert settings["Proxy"] == block["parents"][0]
    assert "Password" not in settings
    # The hash cntlm itself computes for that password, and only the one Auth NT uses.
    hashes = helpers.sh(
        host,
        "printf %%s %s | /usr/sbin/cntlm -c /dev/null -H -u %s -d %s",
        block["password"],
        block["user"],
        block["domain"],
    )
    nt_hash = next(line.split()[1] for line in hashes.splitlines() if line.startswith("PassNT "))
    assert settings["PassNT"] == nt_hash
    assert not {"PassLM", "PassNTLMv2"} & set(settings)


@pytest.mark.parametrize("name", sorted(TENANTS))
def test_instance_upstream_is_its_owners_cntlm(host, name):
    toml = host.file(f"/etc/handyproxy/{name}.toml").content_string
    assert f'upstream-proxy = "127.0.0.1:{TENANTS[name]["cntlm"]["port"]}"' in toml


def test_output_rules_skip_the_cntlm_user(host):
    uid = host.check_output("id -u handyproxy-cntlm")
    table = helpers.nft_table(host)
    assert table is not None
    output = helpers.sh(host, "nft list chain inet handyproxy output")
    assert f"meta skuid {uid} return" in output


def _tunnels(proxy, site) -> list[str]:
    """The squid access log's tunnel records from this router (its 407 challenges left out)."""
    log = proxy.run(f"cat {SQUID_LOG}").stdout
    came = f" {site['router_mid4']} TCP_TUNNEL/200 "
    return [line for line in log.splitlines() if came in line]


@pytest.mark.parametrize("name", sorted(TENANTS))
def test_tenant_traffic_of_both_families_reaches_squid_under_its_own_user(
    host, site, client, proxy, blob_sha256, name
):
    source4, source6 = site["tenants"][name]
    before = len(_tunnels(proxy, site))
    fetches = [
        (source4, f"http://{LAB['origin4']}/blob", ""),
        (source4, f"https://{LAB['origin4']}/blob", ""),
        # IPv6 by name: the client connects to the origin's IPv6 address, the forwarder sniffs
        # the name and cNTLM asks squid for it.
        (source6, f"http://{ORIGIN_NAME}/blob", f"{ORIGIN_NAME}:80:[{LAB['origin6']}]"),
        (source6, f"https://{ORIGIN_NAME}/blob", f"{ORIGIN_NAME}:443:[{LAB['origin6']}]"),
    ]
    for source, url, resolve in fetches:
        extra = f"--resolve {resolve}" if resolve else ""
        helpers.sh(client, f"{CURL} --interface %s {extra} -o /tmp/blob %s", source, url)
        digest = client.check_output("sha256sum /tmp/blob").split()[0]
        assert digest == blob_sha256, f"{url} from {source}: body differs from the origin's"

    user = f"{TENANTS[name]['cntlm']['domain']}\\\\{TENANTS[name]['cntlm']['user']}"
    targets = [
        f"CONNECT {LAB['origin4']}:80 {user} ",
        f"CONNECT {LAB['origin4']}:443 {user} ",
        f"CONNECT {ORIGIN_NAME}:80 {user} ",
        f"CONNECT {ORIGIN_NAME}:443 {user} ",
    ]

    def logged() -> bool:
        new = _tunnels(proxy, site)[before:]
        return len(new) >= len(targets) and all(any(t in line for line in new) for t in targets)

    assert helpers.wait_until(logged, timeout=10), "\n".join(_tunnels(proxy, site)[before:])
    # Every tunnel from this router since then carries this tenant's name and nobody else's.
    assert all(f" {user} " in line for line in _tunnels(proxy, site)[before:])
    # squid reached the named origin over IPv6.
    assert any(f"HIER_DIRECT/{LAB['origin6']} " in line for line in _tunnels(proxy, site)[before:])


def test_ipv6_literal_through_cntlm_is_refused_and_never_reaches_squid(host, site, client, proxy):
    # cNTLM 0.92.3 splits `CONNECT [v6]:port` at its first colon and closes without a reply
    # (the role README says so); the forwarder resets the client and squid never sees it.
    source6 = site["tenants"]["tenant-a"][1]
    before = proxy.run(f"cat {SQUID_LOG}").stdout.count("\n")
    result = client.run(
        f"{CURL} --interface %s http://[%s]/blob -o /dev/null", source6, LAB["origin6"]
    )
    assert result.rc != 0
    after = proxy.run(f"cat {SQUID_LOG}").stdout.splitlines()[before:]
    assert not any(LAB["origin6"] in line for line in after), after
