"""Scenario `lifecycle`: inventory changes, restarts and removal on one host, in order.

molecule has converged the inventory in molecule.yml (four instances).
The tests below run in file order and each builds on the state the previous one left: they drive
ansible-playbook against molecule's own inventory with the changed inventory (vars/changed.yml),
restart nftables.service and the container, and finally remove the role (vars/absent.yml).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helpers
import pytest
import yaml

testinfra_hosts = helpers.hosts_in("handyproxy")
# Every test takes the `host` fixture, even when it does not use it: pytest groups the tests of
# a parametrized fixture together, and a test without it would be moved after all the others.
HOST_NAME = testinfra_hosts[0]

SCENARIO = Path(__file__).resolve().parent.parent
PLAYBOOK = SCENARIO.parent / "shared" / "converge.yml"
BEFORE: list[dict[str, Any]] = helpers.host_vars(HOST_NAME)["handyproxy_instances"]
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
HELD = 100
WORK = "/var/tmp/load"  # not /tmp: a tmpfs there, where docker cp cannot write
# A tunnel every 10 ms through "switch" (captures this host's port 80), each curl in the
# background so a slow one does not slow the pace; one "HTTP-CODE CURL-EXIT" line each.
TICKER = (
    f"while [ ! -e {WORK}/stop ]; do"
    f" curl -s -o /dev/null --max-time 20 -w '%{{http_code}} %{{exitcode}}\\n'"
    f" http://{ORIGIN}/whoami >> {WORK}/tick & sleep 0.01; done; wait; touch {WORK}/ticked"
)

# Main PIDs and start times recorded before the change: a reload keeps both.
PIDS: dict[str, str] = {}
STARTED: dict[str, str] = {}


def playbook(*args: str) -> tuple[int, int, str]:
    """Run the scenario's converge playbook with extra arguments: (rc, changed count, output)."""
    command = [
        "ansible-playbook",
        "-i",
        os.environ["MOLECULE_INVENTORY_FILE"],
        str(PLAYBOOK),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    recap = re.search(rf"^{re.escape(HOST_NAME)}\s*:.*?changed=(\d+)", output, re.MULTILINE)
    assert recap, f"no recap for {HOST_NAME} in:\n{output[-4000:]}"
    return result.returncode, int(recap.group(1)), output


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
    """On the host, through "switch": 100 downloads of the origin's blob held open mid-body
    (tests/kit/downloads.py) and the ticker, started before the playbook runs; ``finish``
    lets the downloads run to their end and stops the ticker."""

    def __init__(self, host) -> None:
        self.host = host
        host.check_output(f"rm -rf {WORK} && mkdir -p {WORK}")
        subprocess.run(
            ["docker", "cp", str(DOWNLOADS), f"{HOST_NAME}:{WORK}/downloads.py"],
            check=True,
            timeout=60,
        )
        host.check_output(
            f"setsid python3 {WORK}/downloads.py --host {ORIGIN} --name {ORIGIN} --path /blob"
            f" --count {HELD} --go-file {WORK}/go > {WORK}/downloads.out 2>&1 < /dev/null &"
        )
        assert helpers.wait_until(lambda: '"ready"' in self.out(), timeout=60), self.out()
        host.check_output(f"setsid bash -c {shlex.quote(TICKER)} > /dev/null 2>&1 < /dev/null &")
        assert helpers.wait_until(lambda: len(self.ticks()) >= 20, timeout=30)

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


def assert_nothing_lost(downloads: list[dict[str, Any]], ticks: list[str]) -> None:
    origin = helpers.host_in("origin")
    sha = origin.check_output("sha256sum /srv/origin/blob.bin").split()[0]
    size = int(origin.check_output("stat -c %s /srv/origin/blob.bin"))
    assert len(downloads) == HELD
    broken = [d for d in downloads if (d["end"], d["size"], d["sha256"]) != ("eof", size, sha)]
    assert broken == [], broken[:5]  # 0 truncated
    failed = [t for t in ticks if t != "200 0"]
    assert failed == [], f"{len(failed)} of {len(ticks)} tunnels failed: {failed[:10]}"
    assert len(ticks) >= 50


def test_first_inventory_is_served(host):
    assert_serving(host, BEFORE)
    for instance in BEFORE:
        PIDS[instance["name"]] = main_pid(host, instance["name"])
        STARTED[instance["name"]] = start_stamp(host, instance["name"])


def test_check_mode_reports_the_change_and_changes_nothing(host):
    rc, changed, output = playbook("--check", "-e", f"@{SCENARIO / 'vars' / 'changed.yml'}")
    assert rc == 0, output[-4000:]
    assert changed > 0, "check mode saw nothing to change"
    assert_serving(host, BEFORE)
    assert {i["name"]: main_pid(host, i["name"]) for i in BEFORE} == PIDS


def test_changed_inventory_converges_under_load_refusing_and_truncating_nothing(host):
    load = Load(host)
    rc, changed, output = playbook("-e", f"@{SCENARIO / 'vars' / 'changed.yml'}")
    downloads, ticks = load.finish()
    assert rc == 0, output[-4000:]
    assert changed > 0
    assert_nothing_lost(downloads, ticks)
    records = host.check_output("journalctl --no-pager -o cat -u handyproxy@switch.service")
    assert f"upstream={BETA} " in records  # new tunnels took the new upstream
    assert f"upstream={ALPHA} " in records  # the held downloads kept theirs


def test_changed_inventory_converges_again_without_changes(host):
    rc, changed, output = playbook("-e", f"@{SCENARIO / 'vars' / 'changed.yml'}")
    assert rc == 0, output[-4000:]
    assert changed == 0, output[-6000:]


def test_nothing_of_the_old_inventory_is_left(host):
    assert_serving(host, AFTER)
    assert not host.file("/etc/handyproxy/drop.toml").exists
    assert host.run("systemctl is-active handyproxy@drop.service").stdout.strip() != "active"
    switch = host.file("/etc/handyproxy/switch.toml").content_string
    assert f'upstream-proxy = "{BETA}"' in switch
    move = host.file("/etc/handyproxy/move.toml").content_string
    assert "local-port = 18013" in move


def test_changed_instances_were_reloaded_not_restarted(host):
    """A new upstream is a reload in place; a new port goes through the upgrade path (the master
    re-executes itself and binds the new port before letting go of the old one). Neither is a
    restart: the main process and its start time stay."""
    for name in ("keep", "switch", "move"):
        assert main_pid(host, name) == PIDS[name], name
        assert start_stamp(host, name) == STARTED[name], name
    journal = "journalctl --no-pager -o cat -u handyproxy@%s.service"
    assert "reload done" in host.check_output(journal, "switch")
    assert "upgrade done" in host.check_output(journal, "move")
    assert "reload done" not in host.check_output(journal, "keep")


def test_a_wheel_upgrade_under_load_refuses_truncates_and_restarts_nothing(host, tmp_path):
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
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run(
        ["bash", str(src / "scripts" / "build-wheelhouse.sh")],
        env={**os.environ, "WHEELHOUSE_DIR": str(wheelhouse)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    pids = {i["name"]: main_pid(host, i["name"]) for i in AFTER}
    load = Load(host)
    rc, changed, output = playbook(
        "-e",
        f"@{SCENARIO / 'vars' / 'changed.yml'}",
        "-e",
        f"handyproxy_wheelhouse_dir={wheelhouse}",
    )
    downloads, ticks = load.finish()
    assert rc == 0, output[-4000:]
    assert changed > 0
    assert_nothing_lost(downloads, ticks)
    for instance in AFTER:
        name = instance["name"]
        assert main_pid(host, name) == pids[name], name
        assert start_stamp(host, name) == STARTED[name], name
        status = host.check_output(
            "/opt/handyproxy/venv/bin/handyproxy -status -control-socket %s",
            f"/run/handyproxy/{name}/control",
        )
        assert status.startswith(f"handyproxy: ok handyproxy {bumped}:"), status


def test_rules_come_back_after_nftables_restart(host):
    host.check_output("systemctl restart nftables.service")
    # nftables.service flushes the whole ruleset; handyproxy-nftables.service reloads ours.
    assert helpers.wait_until(lambda: helpers.nft_table(host) is not None, timeout=20)
    assert_serving(host, AFTER)


@pytest.fixture()
def restarted(host):
    subprocess.run(["docker", "restart", "-t", "30", HOST_NAME], check=True, timeout=120)

    def booted() -> bool:
        # Right after the restart systemd may not answer on its bus yet: poll.
        state = host.run("systemctl is-system-running").stdout.strip()
        return state in ("running", "degraded")

    assert helpers.wait_until(booted, timeout=90), host.run("systemctl --failed").stdout
    return host


def test_rules_and_services_come_back_after_a_container_restart(restarted):
    host = restarted
    assert helpers.wait_until(lambda: helpers.nft_table(host) is not None, timeout=30)
    assert helpers.wait_until(lambda: len(listening_ports(host)) == len(AFTER), timeout=30)
    assert_serving(host, AFTER)


def test_absent_removes_everything_and_leaves_other_rules_alone(host):
    host.check_output("nft %s", BYSTANDER)
    before = host.check_output("nft list table inet bystander")
    rc, changed, output = playbook("-e", f"@{SCENARIO / 'vars' / 'absent.yml'}")
    assert rc == 0, output[-4000:]
    assert changed > 0
    assert helpers.nft_table(host) is None, "table inet handyproxy is still there"
    assert host.check_output("nft list table inet bystander") == before
    # Both exit 1 when nothing matches, which is the point.
    assert host.run("systemctl list-unit-files --no-legend 'handyproxy*'").stdout.strip() == ""
    assert host.run("systemctl list-units --all --no-legend 'handyproxy*'").stdout.strip() == ""
    for path in (
        "/etc/handyproxy",
        "/opt/handyproxy",
        "/etc/systemd/system/handyproxy@.service",
        "/etc/systemd/system/handyproxy-nftables.service",
    ):
        assert not host.file(path).exists, path
    # The image's own journald drop-in (scripts/build-image.sh) is not the role's.
    leftovers = host.check_output(
        "find /etc /run/systemd/system /usr/local /var/lib/systemd -name '*handyproxy*'"
        " ! -name handyproxy-molecule.conf"
    )
    assert leftovers == ""
    assert not host.user("handyproxy").exists
    assert not host.group("handyproxy").exists
    assert host.check_output("ss -Hltn | grep -c ':1800[0-9]\\|:18013' || true") == "0"
