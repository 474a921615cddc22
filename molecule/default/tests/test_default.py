"""Scenario `default`: a Debian 12 and a Debian 13 host from one wheelhouse, two instances each,
OUTPUT capture, traffic through real tinyproxies.

The host's own `curl` to the origin must arrive through the right upstream: the origin sits on a
network only the proxy container reaches, so an answer at all proves the detour, and the origin
reports the proxy's address as its peer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import helpers
import pytest

testinfra_hosts = helpers.hosts_in("handyproxy")

LAB = helpers.lab()
INSTANCES = helpers.host_vars(testinfra_hosts[0])["handyproxy_instances"]
PORTS = {instance["name"]: instance["local_port"] for instance in INSTANCES}
METRICS = {i["name"]: i["metrics_address"] for i in INSTANCES if i.get("metrics_address")}


@pytest.fixture(scope="module")
def proxy():
    return helpers.host_in("proxy")


def test_the_fleet_has_a_host_of_every_suite_of_the_run():
    """One inventory, one converge: a host per Debian suite (scripts/molecule.sh's run)."""
    suites = sorted(os.environ.get("HANDYPROXY_SUITES", "bookworm trixie").split())
    releases = sorted(
        helpers.sh(helpers.get_host(name), ". /etc/os-release && echo $VERSION_CODENAME").strip()
        for name in testinfra_hosts
    )
    assert sorted(set(releases)) == suites
    assert len(releases) == 2


def test_the_wheelhouse_serves_every_python_and_architecture_and_holds_its_hashes():
    wheelhouse = Path(helpers.host_vars(testinfra_hosts[0])["handyproxy_wheelhouse_dir"])
    lines = (wheelhouse / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split()) for line in lines if line.strip())
    for name, digest in sums.items():
        assert hashlib.sha256((wheelhouse / name).read_bytes()).hexdigest() == digest, name
    uvloop = {
        (m.group(1), m.group(2))
        for name in sums
        if (m := re.match(r"uvloop-[^-]+-cp(\d+)-.*_(x86_64|aarch64)\.whl$", name))
    }
    assert {("311", "x86_64"), ("311", "aarch64"), ("313", "x86_64"), ("313", "aarch64")} <= uvloop


def test_each_host_runs_the_uvloop_wheel_of_its_own_python_and_architecture(host):
    python = host.check_output(
        "/usr/bin/python3 -c %s", "import sys; print('cp%d%d' % sys.version_info[:2])"
    )
    arch = host.check_output("uname -m")
    tags = host.check_output(
        "cat /opt/handyproxy/venv/lib/python3*/site-packages/uvloop-*.dist-info/WHEEL"
    )
    assert re.search(rf"^Tag: {python}-{python}-\S*_{arch}$", tags, re.MULTILINE), tags


@pytest.mark.parametrize("name", sorted(PORTS))
def test_instance_unit_is_enabled_and_active(host, name):
    service = host.service(f"handyproxy@{name}.service")
    assert service.is_enabled
    assert service.is_running


def test_rules_unit_is_enabled_and_has_loaded_the_table(host):
    service = host.service("handyproxy-nftables.service")
    assert service.is_enabled
    assert host.run("systemctl is-active handyproxy-nftables.service").stdout.strip() == "active"


@pytest.mark.parametrize("name", sorted(PORTS))
def test_instance_listens_on_its_port_as_the_service_user(host, name):
    port = PORTS[name]
    assert host.socket(f"tcp://{port}").is_listening
    pid = host.check_output("systemctl show -p MainPID --value handyproxy@%s.service", name)
    assert pid != "0"
    assert host.check_output("ps -o user= -p %s", pid) == "handyproxy"
    # `ss -p` cannot see another user's sockets without CAP_SYS_PTRACE; the owner uid can.
    uid = host.user("handyproxy").uid
    assert f"uid:{uid} " in host.check_output("ss -Hltne sport = :%s", str(port))


def test_no_other_port_is_listened_on_by_the_forwarder(host):
    uid = host.user("handyproxy").uid
    ports = {
        int(line.split()[3].rsplit(":", 1)[1])
        for line in host.check_output("ss -Hltne").splitlines()
        if f"uid:{uid} " in line
    }
    metrics_ports = {int(address.rsplit(":", 1)[1]) for address in METRICS.values()}
    assert ports == set(PORTS.values()) | metrics_ports


def test_table_holds_exactly_the_expected_rules(host):
    table = helpers.nft_table(host)
    assert table is not None, "table inet handyproxy is missing"
    assert table.chains["output"]["hook"] == "output"
    assert table.chains["output"]["type"] == "nat"
    assert table.redirects() == helpers.expected_redirects(INSTANCES), "\n".join(
        map(str, table.rules)
    )
    uid = host.user("handyproxy").uid
    output_guards = {str(rule) for rule in table.in_chain("output") if rule.verdict == "return"}
    # Every upstream of every instance, the dead one too, whoever talks to it.
    upstreams = "{" + ",".join(sorted([LAB["dead4"], LAB["proxy_front4"]])) + "}"
    assert output_guards == {
        f"output: [any] meta skuid == {uid} return comment=''",
        "output: [any] fib daddr type == local return comment=''",
        f"output: [ipv4] ip daddr == {upstreams} return comment=''",
    }
    # The guards come before every redirect, or the forwarder's own connections would loop.
    verdicts = [rule.verdict for rule in table.in_chain("output")]
    assert verdicts[: len(output_guards)] == ["return"] * len(output_guards)
    # No capture rule asks for prerouting: that chain only skips local destinations.
    assert [rule.verdict for rule in table.in_chain("prerouting")] in ([], ["return"])


def test_role_touches_no_other_table(host):
    # Docker's own `ip nat` table (embedded DNS) is there too and must survive the role.
    assert ("ip", "nat") in helpers.nft_tables(host)
    assert ("inet", "handyproxy") in helpers.nft_tables(host)


@pytest.mark.parametrize("name", sorted(PORTS))
def test_instance_config_file_is_private_to_the_service(host, name):
    config = host.file(f"/etc/handyproxy/{name}.toml")
    assert config.user == "root"
    assert config.group == "handyproxy"
    assert config.mode & 0o007 == 0, oct(config.mode)
    assert f"local-port = {PORTS[name]}" in config.content_string
    instance = next(i for i in INSTANCES if i["name"] == name)
    upstreams = instance["upstream_proxy"]
    assert f"upstream-proxy = {json.dumps(upstreams)}" in config.content_string
    # The forwarder itself accepts the file the role wrote.
    checked = host.run(
        "env CREDENTIALS_DIRECTORY=/etc/handyproxy/credentials/%s"
        " /opt/handyproxy/venv/bin/handyproxy -check-config /etc/handyproxy/%s.toml",
        name,
        name,
    )
    assert checked.rc == 0, checked.stderr


def test_options_the_old_role_refused_reach_the_forwarder(host):
    """relay, several upstreams, the policy and rules: the forwarder's options, per instance."""
    web = host.file("/etc/handyproxy/web.toml").content_string
    assert 'relay = "copy"' in web
    assert 'upstream-policy = "failover"' in web
    assert 'rule = ["port=8080 reject"]' in web


def test_upstream_credentials_are_root_only_and_never_in_the_toml_or_journal(host):
    secret = "s3cret-beta"
    creds = host.file("/etc/handyproxy/credentials/tls/upstream-credentials")
    assert (creds.user, creds.group, creds.mode) == ("root", "root", 0o600)
    assert host.file("/etc/handyproxy/credentials").mode == 0o700
    assert creds.content_string == f"alice:{secret}\n"
    toml = host.file("/etc/handyproxy/tls.toml").content_string
    assert 'upstream-credentials-file = "upstream-credentials"' in toml
    assert secret not in toml
    dropin = host.file("/etc/systemd/system/handyproxy@tls.service.d/credentials.conf")
    assert (
        "LoadCredential=upstream-credentials:/etc/handyproxy/credentials/tls/upstream-credentials"
        in dropin.content_string
    )
    # The instance without credentials gets no drop-in.
    assert not host.file("/etc/systemd/system/handyproxy@web.service.d").exists
    journal = host.check_output("journalctl --no-pager -o cat")
    assert secret not in journal


def test_installed_files_have_safe_owners_and_modes(host):
    for path, mode in [
        ("/etc/systemd/system/handyproxy@.service", 0o644),
        ("/etc/systemd/system/handyproxy-nftables.service", 0o644),
        ("/etc/handyproxy/handyproxy.nft", 0o644),
    ]:
        f = host.file(path)
        assert f.is_file, path
        assert (f.user, f.mode) == ("root", mode), f"{path}: {f.user} {oct(f.mode)}"
    binary = host.file("/opt/handyproxy/venv/bin/handyproxy")
    assert binary.exists
    assert binary.user == "root"
    assert not host.file("/opt/handyproxy/venv").mode & 0o022
    version = host.check_output("/opt/handyproxy/venv/bin/handyproxy -version")
    assert version.startswith("handyproxy ")


def test_service_user_is_a_locked_system_account(host):
    user = host.user("handyproxy")
    assert user.exists
    assert user.uid < 1000
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")


def test_plain_http_from_the_host_fails_over_to_the_live_upstream(host, proxy):
    origin = LAB["origin4"]
    peer = host.check_output("curl -sS --max-time 15 http://%s/whoami", origin)
    # The origin saw the proxy's address on the back network, not the host's.
    assert peer.removeprefix("::ffff:") == LAB["proxy_back4"]
    log = proxy.check_output("cat /var/log/tinyproxy/alpha.log")
    assert f"CONNECT {origin}:80 " in log
    assert f"CONNECT {origin}:80 " not in proxy.run("cat /var/log/tinyproxy/beta.log").stdout


def test_https_by_name_goes_through_the_authenticating_upstream_as_a_sniffed_name(host, proxy):
    origin = LAB["origin4"]
    peer = host.check_output(
        "curl -sS --max-time 15 -k --resolve origin.test:443:%s https://origin.test/whoami",
        origin,
    )
    assert peer.removeprefix("::ffff:") == LAB["proxy_back4"]
    log = proxy.check_output("cat /var/log/tinyproxy/beta.log")
    # The forwarder read the TLS client hello and asked for the name, not the address.
    assert "CONNECT origin.test:443 " in log


def test_https_over_ipv6_is_captured_too(host, proxy):
    origin6 = LAB["origin6"]
    peer = host.check_output("curl -sS -6 --max-time 15 -k %s", f"https://[{origin6}]/whoami")
    assert peer == LAB["proxy_back6"]
    log = proxy.check_output("cat /var/log/tinyproxy/beta.log")
    assert f"CONNECT [{origin6}]:443 " in log


def test_forwarder_logs_one_access_record_per_tunnel(host):
    def tls_records() -> list[dict]:
        journal = host.check_output("journalctl --no-pager -o cat -u handyproxy@tls.service")
        return [json.loads(line) for line in journal.splitlines() if '"tunnel end"' in line]

    # Two HTTPS fetches above (IPv4 by name, IPv6); journald takes the lines asynchronously.
    assert helpers.wait_until(lambda: len(tls_records()) >= 2, timeout=10), tls_records()
    records = tls_records()
    assert all(record["status"] == 200 and record["end"] == "eof" for record in records), records
    assert {record["target"] for record in records} == {
        "origin.test:443",
        f"[{LAB['origin6']}]:443",
    }
    # The record names the upstream that carried the tunnel (web's live one: alpha).
    wanted = (
        f"dst={LAB['origin4']}:80 target={LAB['origin4']}:80 "
        f"upstream={LAB['proxy_front4']}:3128 status=200"
    )

    def web_logged() -> bool:
        return wanted in host.check_output("journalctl --no-pager -o cat -u handyproxy@web.service")

    assert helpers.wait_until(web_logged, timeout=10)


def test_the_host_cannot_reach_the_origin_without_the_forwarder(host):
    # Port 8080 is captured by no instance: the connection goes straight out and must fail,
    # which is what makes the successful fetches above proof of the detour.
    result = host.run("curl -sS --max-time 5 http://%s:8080/", LAB["origin4"])
    assert result.rc != 0


def test_unit_exposure_score_is_at_most_two(host):
    """The hardening is measured, not assumed: systemd's own rating of the instance unit."""
    out = host.check_output("systemd-analyze security --no-pager handyproxy@web.service")
    last = [line for line in out.splitlines() if "Overall exposure level" in line][-1]
    score = float(last.split(":", 1)[1].split()[0])
    print(f"systemd-analyze security: {last.strip()}")
    assert score <= 2.0, last


def test_systemctl_restart_during_downloads_loses_nothing(host):
    """Downloads running through a `systemctl restart` finish intact (the old process drains)
    or are reset; none ends with a clean close after partial data (curl exit 18)."""
    origin = helpers.host_in("origin")
    want = origin.check_output("sha256sum /srv/origin/blob.bin").split()[0]
    url = f"http://{LAB['origin4']}/blob"
    host.check_output("rm -rf /tmp/dl && mkdir /tmp/dl")
    curl = f"curl -sS --max-time 60 --limit-rate 100k {url}"
    starts = " ".join(f"({curl} -o /tmp/dl/{i}; echo $? > /tmp/dl/{i}.rc) &" for i in range(8))
    # Restart once every download has its first bytes (polled for up to 10 s).
    started = (
        'for n in $(seq 200); do [ $(find /tmp/dl -name "[0-9]" -size +0 | wc -l) -ge 8 ]'
        " && break; sleep 0.05; done"
    )
    host.check_output(
        f"bash -c '{starts} {started}; systemctl restart handyproxy@web.service; wait'"
    )
    for i in range(8):
        rc = int(host.check_output(f"cat /tmp/dl/{i}.rc"))
        assert rc in (0, 56), f"download {i}: curl exit {rc}"
        if rc == 0:
            assert host.check_output(f"sha256sum /tmp/dl/{i}").split()[0] == want, i
    assert host.service("handyproxy@web.service").is_running
    after = host.run(f"curl -sS --max-time 15 -o /tmp/dl/after {url}")
    assert after.rc == 0, after.stderr
    assert host.check_output("sha256sum /tmp/dl/after").split()[0] == want


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_endpoint_answers_with_the_instance_figures(host, name):
    text = host.check_output("curl -sS --max-time 5 http://%s/metrics", METRICS[name])
    assert 'handyproxy_build_info{version="' in text
    assert 'handyproxy_tunnels_total{end="eof"}' in text
    # The unit hides /proc/stat (ProcSubset=pid); the process figures come from /proc/PID.
    assert "process_open_fds " in text
    assert "handyproxy_workers 1.0" in text
