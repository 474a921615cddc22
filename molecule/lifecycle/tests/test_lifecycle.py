"""Scenario `lifecycle`: inventory changes, restarts and removal on a fleet of two, in order.

molecule has converged the inventory in molecule.yml (four instances) on a Debian 12 and a Debian
13 host. The tests below run in file order and each builds on the state the previous one left:
they drive ansible-playbook against molecule's own inventory with the changed inventory
(vars/changed.yml), restart nftables.service and the containers, and finally remove the role
(vars/absent.yml). Every playbook run changes both hosts together, as one batch, and every check
holds on each host.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helpers
import pytest
import yaml
from testinfra.host import Host

# Not testinfra_hosts: the tests take the whole fleet (the `fleet` fixture), so that each step
# runs once, against both hosts, in file order.
FLEET: list[str] = helpers.hosts_in("handyproxy")

SCENARIO = Path(__file__).resolve().parent.parent
PLAYBOOK = SCENARIO.parent / "shared" / "converge.yml"
BEFORE: list[dict[str, Any]] = helpers.host_vars(FLEET[0])["handyproxy_instances"]
AFTER: list[dict[str, Any]] = yaml.safe_load((SCENARIO / "vars" / "changed.yml").read_text())[
    "handyproxy_instances"
]
BYSTANDER = (
    "table inet bystander { chain input { type filter hook input priority 0; policy accept; }; }"
)

LAB = helpers.lab()
REPO = SCENARIO.parent.parent
DOWNLOADS = REPO / "tests" / "kit" / "downloads.py"
ORIGIN = LAB["origin4"]
ALPHA = f"{LAB['proxy_front4']}:3128"
BETA = f"{LAB['proxy_front4']}:8888"
# Downloads held open per host: the two hosts share one tinyproxy.
HELD = 50
WORK = "/var/tmp/load"  # not /tmp: a tmpfs there, where docker cp cannot write
# A tunnel every 20 ms per host through "switch" (captures the host's port 80), each curl in the
# background so a slow one does not slow the pace; one "HTTP-CODE CURL-EXIT" line each.
TICKER = (
    f"while [ ! -e {WORK}/stop ]; do"
    f" curl -s -o /dev/null --max-time 20 -w '%{{http_code}} %{{exitcode}}\\n'"
    f" http://{ORIGIN}/whoami >> {WORK}/tick & sleep 0.02; done; wait; touch {WORK}/ticked"
)
CHANGED = f"@{SCENARIO / 'vars' / 'changed.yml'}"

# Main PIDs and start times recorded before the change, by (host, instance): a reload keeps both.
PIDS: dict[tuple[str, str], str] = {}
STARTED: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def fleet() -> dict[str, Host]:
    """The role's hosts by inventory name, one per supported Debian suite."""
    return {name: helpers.get_host(name) for name in FLEET}


def playbook(*args: str) -> tuple[int, dict[str, int], str]:
    """Run the scenario's converge playbook on the whole fleet in one batch, with extra
    arguments: (rc, changed count by host, output)."""
    command = [
        "ansible-playbook",
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        str(PLAYBOOK),
        "-e",
        "handyproxy_rollout_serial=100%",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    changed = {}
    for name in FLEET:
        recap = re.search(rf"^{re.escape(name)}\s*:.*?changed=(\d+)", output, re.MULTILINE)
        assert recap, f"no recap for {name} in:\n{output[-4000:]}"
        changed[name] = int(recap.group(1))
    return result.returncode, changed, output


def pids(fleet: dict[str, Host], instances: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Main PIDs by (host, instance)."""
    return {
        (h, i["name"]): main_pid(host, i["name"]) for h, host in fleet.items() for i in instances
    }


def main_pid(host, name: str) -> str:
    return host.check_output("systemctl show -p MainPID --value handyproxy@%s.service", name)


def start_stamp(host, name: str) -> str:
    return host.check_output(
        "systemctl show -p ExecMainStartTimestampMonotonic --value handyproxy@%s.service", name
    )


def listening_ports(host) -> set[int]:
    uid = host.user("handyproxy").uid
    return {
        int(line.split()[3].rsplit(":", 1)[1])
        for line in host.check_output("ss -Hltne").splitlines()
        if f"uid:{uid} " in line
    }


def assert_serving(host, instances: list[dict[str, Any]]) -> None:
    """Exactly these instances run, listen, have their config, and the table matches them."""
    names = sorted(i["name"] for i in instances)
    running = host.check_output(
        "systemctl list-units --no-legend --plain --state=running 'handyproxy@*.service'"
    )
    assert sorted(re.findall(r"handyproxy@([\w-]+)\.service", running)) == names
    enabled = host.check_output("ls /etc/systemd/system/multi-user.target.wants/")
    assert sorted(re.findall(r"handyproxy@([\w-]+)\.service", enabled)) == names
    configs = host.check_output("ls /etc/handyproxy")
    assert sorted(re.findall(r"^([\w-]+)\.toml$", configs, re.MULTILINE)) == names
    assert listening_ports(host) == {i["local_port"] for i in instances}
    table = helpers.nft_table(host)
    assert table is not None, "table inet handyproxy is missing"
    assert table.redirects() == helpers.expected_redirects(instances), "\n".join(
        map(str, table.rules)
    )


class Load:
    """On one host, through "switch": downloads of the origin's blob held open mid-body
    (tests/kit/downloads.py) and the ticker, started before the playbook runs; ``finish``
    lets the downloads run to their end and stops the ticker."""

    def __init__(self, name: str, host: Host) -> None:
        self.host = host
        host.check_output(f"rm -rf {WORK} && mkdir -p {WORK}")
        subprocess.run(
            ["docker", "cp", str(DOWNLOADS), f"{name}:{WORK}/downloads.py"],
            check=True,
            timeout=60,
        )
        host.check_output(
            f"setsid python3 {WORK}/downloads.py --host {ORIGIN} --name {ORIGIN} --path /blob"
            f" --count {HELD} --go-file {WORK}/go > {WORK}/downloads.out 2>&1 < /dev/null &"
        )

    def running(self) -> None:
        """Once the downloads are held open, start the ticker and wait for its first tunnels."""
        assert helpers.wait_until(lambda: '"ready"' in self.out(), timeout=60), self.out()
        self.host.check_output(
            f"setsid bash -c {shlex.quote(TICKER)} > /dev/null 2>&1 < /dev/null &"
        )
        assert helpers.wait_until(lambda: len(self.ticks()) >= 10, timeout=30)

    def out(self) -> str:
        return self.host.run(f"cat {WORK}/downloads.out").stdout

    def ticks(self) -> list[str]:
        return self.host.run(f"cat {WORK}/tick").stdout.splitlines()

    def finish(self) -> tuple[list[dict[str, Any]], list[str]]:
        self.host.check_output(f"touch {WORK}/stop {WORK}/go")
        assert helpers.wait_until(lambda: '"done"' in self.out(), timeout=180), self.out()
        ticked = lambda: self.host.file(f"{WORK}/ticked").exists  # noqa: E731
        assert helpers.wait_until(ticked, timeout=60)
        lines = [json.loads(line) for line in self.out().splitlines() if line.startswith('{"i"')]
        return lines, self.ticks()


Outcome = tuple[list[dict[str, Any]], list[str]]


def loaded(fleet: dict[str, Host]) -> dict[str, Load]:
    """The load started on every host of the fleet (all hosts' downloads opening together)."""
    loads = {name: Load(name, host) for name, host in fleet.items()}
    for load in loads.values():
        load.running()
    return loads


def finished(loads: dict[str, Load]) -> dict[str, Outcome]:
    """Each host's downloads and ticks, once all have run to their end."""
    return {name: load.finish() for name, load in loads.items()}


def assert_nothing_lost(outcomes: dict[str, Outcome]) -> None:
    """Every held download of every host whole, every ticker tunnel answered."""
    origin = helpers.host_in("origin")
    sha = origin.check_output("sha256sum /srv/origin/blob.bin").split()[0]
    size = int(origin.check_output("stat -c %s /srv/origin/blob.bin"))
    for name, (downloads, ticks) in outcomes.items():
        assert len(downloads) == HELD, name
        broken = [d for d in downloads if (d["end"], d["size"], d["sha256"]) != ("eof", size, sha)]
        assert broken == [], (name, broken[:5])  # 0 truncated
        failed = [t for t in ticks if t != "200 0"]
        assert failed == [], f"{name}: {len(failed)} of {len(ticks)} tunnels failed: {failed[:10]}"
        assert len(ticks) >= 25, name


def assert_unchanged(fleet: dict[str, Host]) -> None:
    """The first inventory still served, by the very processes recorded at the start."""
    for host in fleet.values():
        assert_serving(host, BEFORE)
    assert pids(fleet, BEFORE) == PIDS


def test_first_inventory_is_served(fleet):
    for name, host in fleet.items():
        assert_serving(host, BEFORE)
        for instance in BEFORE:
            STARTED[name, instance["name"]] = start_stamp(host, instance["name"])
        creds = host.file("/etc/handyproxy/credentials/drop/upstream-credentials")
        assert (creds.user, creds.mode) == ("root", 0o600), name
    PIDS.update(pids(fleet, BEFORE))


def wheelhouse_copy(tmp_path: Path, keep: Callable[[str], bool], corrupt: set[str]) -> Path:
    """A copy of the scenario's wheelhouse with only the wheels `keep` accepts, and the hashes
    of the wheels named in `corrupt` changed in SHA256SUMS."""
    source = wheelhouse()
    target = tmp_path / "wheelhouse"
    target.mkdir()
    lines = []
    for line in (source / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        if not keep(name):
            continue
        shutil.copy(source / name, target / name)
        if name in corrupt:
            digest = "0" * 64
        lines.append(f"{digest}  {name}")
    (target / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return target


def wheelhouse() -> Path:
    return Path(helpers.host_vars(FLEET[0])["handyproxy_wheelhouse_dir"])


def host_python(host: Host) -> str:
    return host.check_output(
        "/usr/bin/python3 -c %s", "import sys; print('%d.%d' % sys.version_info[:2])"
    )


def cp_tag(host: Host) -> str:
    return "cp" + host_python(host).replace(".", "")


def uvloop_wheel(host: Host) -> str:
    """The uvloop wheel of the wheelhouse that fits the host's Python and architecture."""
    cp, arch = cp_tag(host), host.check_output("uname -m")
    (name,) = [
        name
        for name in (wheelhouse() / "SHA256SUMS").read_text().split()
        if name.startswith("uvloop-") and f"-{cp}-" in name and name.endswith(f"_{arch}.whl")
    ]
    return name


@pytest.mark.parametrize("case", ["skip_user", "platform", "no_wheel", "bad_hash"])
def test_preflight_refuses_before_anything_changes(fleet, tmp_path, case):
    """Each refusal names each host and what is wrong there, and the fleet is left exactly as
    it was."""
    want: dict[str, str] = {}  # host: the message it must get, as a regular expression
    if case == "skip_user":
        extra: dict[str, Any] = {"handyproxy_output_skip_users": ["cntlm", "nosuchuser"]}
        for name in fleet:
            want[name] = f"host {name}: handyproxy_output_skip_users: no user cntlm, nosuchuser"
    elif case == "platform":
        # The hosts' real releases, refused by a role that pretends to support another one.
        extra = {"_handyproxy_supported_platforms": {"Debian": ["11"]}}
        for name, host in fleet.items():
            release = host.check_output(". /etc/os-release && echo $VERSION_CODENAME")
            want[name] = (
                f"host {re.escape(name)}: Debian \\S+ \\({release}\\)"
                " with service manager systemd is not supported"
            )
    elif case == "no_wheel":
        cps = {cp_tag(host) for host in fleet.values()}
        copy = wheelhouse_copy(tmp_path, lambda f: not any(f"-{cp}-" in f for cp in cps), set())
        extra = {"handyproxy_wheelhouse_dir": str(copy)}
        for name, host in fleet.items():
            want[name] = re.escape(
                f"host {name}: no wheel in {copy} fits its Python {host_python(host)}"
                f" (/usr/bin/python3) on {host.check_output('uname -m')} for uvloop"
            )
    else:
        corrupt = {name: uvloop_wheel(host) for name, host in fleet.items()}
        copy = wheelhouse_copy(tmp_path, lambda f: True, set(corrupt.values()))
        extra = {"handyproxy_wheelhouse_dir": str(copy)}
        for name, wheel in corrupt.items():
            want[name] = re.escape(
                f"host {name}: {copy}: {wheel} missing or not matching SHA256SUMS"
            )
    rc, changed, output = playbook("-e", json.dumps(extra))
    assert rc != 0, output[-4000:]
    flat = " ".join(output.split())
    for name, message in want.items():
        assert re.search(message, flat), (name, message, output[-4000:])
    assert changed == dict.fromkeys(FLEET, 0)
    assert_unchanged(fleet)


def test_check_mode_reports_the_change_and_changes_nothing(fleet):
    rc, changed, output = playbook("--check", "-e", CHANGED)
    assert rc == 0, output[-4000:]
    assert all(changed.values()), f"check mode saw nothing to change: {changed}"
    assert_unchanged(fleet)


def test_changed_inventory_converges_under_load_refusing_and_truncating_nothing(fleet):
    loads = loaded(fleet)
    rc, changed, output = playbook("-e", CHANGED)
    outcomes = finished(loads)
    assert rc == 0, output[-4000:]
    assert all(changed.values()), changed
    assert_nothing_lost(outcomes)
    for name, host in fleet.items():
        records = host.check_output("journalctl --no-pager -o cat -u handyproxy@switch.service")
        assert f"upstream={BETA} " in records, name  # new tunnels took the new upstream
        assert f"upstream={ALPHA} " in records, name  # the held downloads kept theirs
    assert "s3cret" not in output


def test_changed_inventory_converges_again_without_changes(fleet):
    rc, changed, output = playbook("-e", CHANGED)
    assert rc == 0, output[-4000:]
    assert changed == dict.fromkeys(FLEET, 0), output[-6000:]


def test_nothing_of_the_old_inventory_is_left(fleet):
    for name, host in fleet.items():
        assert_serving(host, AFTER)
        assert not host.file("/etc/handyproxy/drop.toml").exists, name
        assert host.run("systemctl is-active handyproxy@drop.service").stdout.strip() != "active"
        switch = host.file("/etc/handyproxy/switch.toml").content_string
        assert f'upstream-proxy = "{BETA}"' in switch, name
        move = host.file("/etc/handyproxy/move.toml").content_string
        assert "local-port = 18013" in move, name
        # drop's credentials and drop-in went with it.
        assert not host.file("/etc/handyproxy/credentials/drop").exists, name
        assert not host.file("/etc/systemd/system/handyproxy@drop.service.d").exists, name


def test_changed_instances_were_reloaded_not_restarted(fleet):
    """A new upstream is a reload in place; a new port goes through the upgrade path (the master
    re-executes itself and binds the new port before letting go of the old one). Neither is a
    restart: the main process and its start time stay."""
    journal = "journalctl --no-pager -o cat -u handyproxy@%s.service"
    for host_name, host in fleet.items():
        for name in ("keep", "switch", "move"):
            assert main_pid(host, name) == PIDS[host_name, name], (host_name, name)
            assert start_stamp(host, name) == STARTED[host_name, name], (host_name, name)
        assert "reload done" in host.check_output(journal, "switch"), host_name
        assert "upgrade done" in host.check_output(journal, "move"), host_name
        assert "reload done" not in host.check_output(journal, "keep"), host_name


def test_a_wheel_upgrade_under_load_refuses_truncates_and_restarts_nothing(fleet, tmp_path):
    """A rebuilt wheel with a bumped version: the role reloads, each master re-executes itself
    on the new code (same PID, same start time), the held downloads finish on the old workers."""
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "handyproxy/__init__.py").read_text())
    assert version
    bumped = f"{version.group(1)}.post1"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("handyproxy", "scripts"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(REPO / name, src / name)
    init = src / "handyproxy" / "__init__.py"
    init.write_text(init.read_text().replace(version.group(1), bumped))
    upgrade = tmp_path / "wheelhouse"
    subprocess.run(
        ["bash", str(src / "scripts" / "build-wheelhouse.sh")],
        # The fleet's Pythons and architectures only: no other wheel is needed here.
        env={
            **os.environ,
            "WHEELHOUSE_DIR": str(upgrade),
            "TARGET_PYTHON_VERSIONS": " ".join(sorted({host_python(h) for h in fleet.values()})),
            "TARGET_ARCHES": " ".join(sorted({h.check_output("uname -m") for h in fleet.values()})),
        },
        check=True,
        capture_output=True,
        timeout=300,
    )
    before = pids(fleet, AFTER)
    loads = loaded(fleet)
    rc, changed, output = playbook("-e", CHANGED, "-e", f"handyproxy_wheelhouse_dir={upgrade}")
    outcomes = finished(loads)
    assert rc == 0, output[-4000:]
    assert all(changed.values()), changed
    assert_nothing_lost(outcomes)
    assert pids(fleet, AFTER) == before
    for host_name, host in fleet.items():
        for instance in AFTER:
            name = instance["name"]
            assert start_stamp(host, name) == STARTED[host_name, name], (host_name, name)
            status = host.check_output(
                "/opt/handyproxy/venv/bin/handyproxy -status -control-socket %s",
                f"/run/handyproxy/{name}/control",
            )
            assert status.startswith(f"handyproxy: ok handyproxy {bumped}:"), (host_name, status)


def role_chains(host: Host, tool: str) -> dict[str, list[str]]:
    """The role's own iptables chains (HANDYPROXY_*) and their rules; Docker's are ignored."""
    chains: dict[str, list[str]] = {}
    for line in host.check_output("%s -w -t nat -S", tool).splitlines():
        words = line.split()
        if words[0] == "-N" and words[1].startswith("HANDYPROXY_"):
            chains.setdefault(words[1], [])
        elif words[0] == "-A" and words[1].startswith("HANDYPROXY_"):
            chains.setdefault(words[1], []).append(line)
    return chains


def jumps_to_role_chains(host: Host, tool: str) -> list[str]:
    return [
        line
        for line in host.check_output("%s -w -t nat -S", tool).splitlines()
        if line.startswith(("-A PREROUTING ", "-A OUTPUT ")) and "-j HANDYPROXY_" in line
    ]


def test_switch_to_iptables_replaces_the_table_with_the_roles_chains(fleet):
    rc, changed, output = playbook("-e", CHANGED, "-e", "handyproxy_firewall_backend=iptables")
    assert rc == 0, output[-4000:]
    assert all(changed.values()), changed
    for name, host in fleet.items():
        assert helpers.nft_table(host) is None, f"{name}: the nftables table outlived the switch"
        chains = role_chains(host, "iptables")
        assert set(chains) == {"HANDYPROXY_PREROUTING", "HANDYPROXY_OUTPUT"}, name
        redirects = [r for rules in chains.values() for r in rules if "REDIRECT" in r]
        ports = sorted(int(r.split("--to-ports ")[1]) for r in redirects)
        assert ports == sorted(
            i["local_port"] for i in AFTER for c in i["capture"] if c["family"] in ("ipv4", "both")
        ), name
        assert sorted(jumps_to_role_chains(host, "iptables")) == [
            "-A OUTPUT -j HANDYPROXY_OUTPUT",
            "-A PREROUTING -j HANDYPROXY_PREROUTING",
        ], name
        # keep captures both families: its IPv6 rule, the only one, is in ip6tables.
        v6 = role_chains(host, "ip6tables")
        (redirect,) = [r for rules in v6.values() for r in rules if "REDIRECT" in r]
        assert "--comment keep" in redirect and "--to-ports 18001" in redirect, name


def test_switch_back_to_nftables_leaves_no_role_chain(fleet):
    rc, changed, output = playbook("-e", CHANGED)
    assert rc == 0, output[-4000:]
    assert all(changed.values()), changed
    for name, host in fleet.items():
        for tool in ("iptables", "ip6tables"):
            assert role_chains(host, tool) == {}, (name, tool)
            assert jumps_to_role_chains(host, tool) == [], (name, tool)
        assert not host.file("/etc/systemd/system/handyproxy-iptables.service").exists, name
        assert_serving(host, AFTER)


def test_rules_come_back_after_nftables_restart(fleet):
    for host in fleet.values():
        host.check_output("systemctl restart nftables.service")
    for host in fleet.values():
        # nftables.service flushes the whole ruleset; handyproxy-nftables.service reloads ours.
        assert helpers.wait_until(lambda h=host: helpers.nft_table(h) is not None, timeout=20)
        assert_serving(host, AFTER)


@pytest.fixture()
def restarted(fleet: dict[str, Host]) -> dict[str, Host]:
    subprocess.run(["docker", "restart", "-t", "30", *fleet], check=True, timeout=180)

    def booted(host: Host) -> bool:
        # Right after the restart systemd may not answer on its bus yet: poll.
        state = host.run("systemctl is-system-running").stdout.strip()
        return state in ("running", "degraded")

    for name, host in fleet.items():
        assert helpers.wait_until(lambda h=host: booted(h), timeout=90), (
            name,
            host.run("systemctl --failed").stdout,
        )
    return fleet


def test_rules_and_services_come_back_after_a_container_restart(restarted):
    for host in restarted.values():
        assert helpers.wait_until(lambda h=host: helpers.nft_table(h) is not None, timeout=30)
        listening = lambda h=host: len(listening_ports(h)) == len(AFTER)  # noqa: E731
        assert helpers.wait_until(listening, timeout=30)
        assert_serving(host, AFTER)


def test_absent_removes_everything_and_leaves_other_rules_alone(fleet):
    before = {}
    for name, host in fleet.items():
        host.check_output("nft %s", BYSTANDER)
        before[name] = host.check_output("nft list table inet bystander")
    rc, changed, output = playbook("-e", f"@{SCENARIO / 'vars' / 'absent.yml'}")
    assert rc == 0, output[-4000:]
    assert all(changed.values()), changed
    # Not even "loop variable 'item' is already in use".
    assert "[WARNING]" not in output, output[-6000:]
    for name, host in fleet.items():
        assert helpers.nft_table(host) is None, f"{name}: table inet handyproxy is still there"
        assert host.check_output("nft list table inet bystander") == before[name], name
        # Both exit 1 when nothing matches, which is the point.
        units = "systemctl list-unit-files --no-legend 'handyproxy*'"
        assert host.run(units).stdout.strip() == "", name
        loaded_units = "systemctl list-units --all --no-legend 'handyproxy*'"
        assert host.run(loaded_units).stdout.strip() == "", name
        for path in (
            "/etc/handyproxy",
            "/opt/handyproxy",
            "/etc/systemd/system/handyproxy@.service",
            "/etc/systemd/system/handyproxy-nftables.service",
        ):
            assert not host.file(path).exists, (name, path)
        # The image's own journald drop-in (scripts/build-image.sh) is not the role's.
        leftovers = host.check_output(
            "find /etc /run/systemd/system /usr/local /var/lib/systemd -name '*handyproxy*'"
            " ! -name handyproxy-molecule.conf"
        )
        assert leftovers == "", name
        assert not host.user("handyproxy").exists, name
        assert not host.group("handyproxy").exists, name
        listening = "ss -Hltn | grep -c ':1800[0-9]\\|:18013' || true"
        assert host.check_output(listening) == "0", name
