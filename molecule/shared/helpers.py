"""Helpers shared by the Molecule scenarios' testinfra verifiers.

The verifiers talk to several containers of one scenario at once (the role's host, the proxy,
the origin, the client), find them by their inventory group, read the scenario's `lab` addresses
from the same inventory, and compare the role's nftables table rule by rule. Container names carry
a per-run suffix, so nothing here knows a name; only groups.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import testinfra
from testinfra.host import Host
from testinfra.utils.ansible_runner import AnsibleRunner

UNITS_GLOB = "handyproxy*"


def inventory_file() -> str:
    """The inventory molecule wrote for this scenario (set by molecule for the verifier)."""
    return os.environ["MOLECULE_INVENTORY_FILE"]


@cache
def runner() -> AnsibleRunner:
    return AnsibleRunner(inventory_file())


def hosts_in(group: str) -> list[str]:
    """Inventory names of the group's containers (for testinfra_hosts)."""
    return runner().get_hosts(group)


def host_in(group: str) -> Host:
    """The one container of a group, as a testinfra host."""
    names = hosts_in(group)
    assert len(names) == 1, f"group {group} should hold one host, holds {names}"
    return get_host(names[0])


@cache
def get_host(name: str) -> Host:
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory_file())


def host_vars(name: str) -> dict[str, Any]:
    """The inventory variables of a host (group_vars applied), e.g. `lab`, the instances."""
    return runner().get_variables(name)


def lab() -> dict[str, Any]:
    """The scenario's addresses, from the `lab` variable every host shares."""
    return host_vars(hosts_in("all")[0])["lab"]


def sh(host: Host, command: str, *args: object) -> str:
    """Run a command (arguments quoted), fail with its output when it exits non-zero."""
    line = command % tuple(shlex.quote(str(a)) for a in args) if args else command
    result = host.run(line)
    assert result.rc == 0, (
        f"{line!r} exited {result.rc}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def journal(host: Host, units: str = UNITS_GLOB, lines: int = 120) -> str:
    """The host's recent journal for the handyproxy units, for failure reports."""
    result = host.run(f"journalctl --no-pager -o short-precise -n {lines} -u {shlex.quote(units)}")
    return result.stdout + result.stderr


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.5) -> bool:
    """Poll until the predicate holds; True when it did before the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- nftables -------------------------------------------------------------------------------


def _value(node: Any) -> str:
    """Right-hand side of a match (address, prefix, set, range) as nft would print it."""
    if isinstance(node, dict):
        if "prefix" in node:
            return f"{node['prefix']['addr']}/{node['prefix']['len']}"
        if "set" in node:
            return "{" + ",".join(sorted(_value(item) for item in node["set"])) + "}"
        if "range" in node:
            low, high = node["range"]
            return f"{_value(low)}-{_value(high)}"
        return json.dumps(node, sort_keys=True)
    if isinstance(node, list):
        return "{" + ",".join(sorted(_value(item) for item in node)) + "}"
    return str(node)


def _selector(node: Any) -> str:
    """Left-hand side of a match: `meta skuid`, `ip daddr`, `tcp dport`, `fib daddr type`..."""
    if isinstance(node, dict):
        if "meta" in node:
            return f"meta {node['meta']['key']}"
        if "payload" in node:
            return f"{node['payload']['protocol']} {node['payload']['field']}"
        if "fib" in node:
            flags = node["fib"].get("flags", [])
            flags = [flags] if isinstance(flags, str) else flags
            return f"fib {' . '.join(flags)} {node['fib']['result']}"
    return json.dumps(node, sort_keys=True)


@dataclass(frozen=True)
class Rule:
    """One rule of the role's table, reduced to what the tests compare."""

    chain: str
    family: str  # ipv4, ipv6 or any
    matches: frozenset[str]  # e.g. "tcp dport == 80", "ip daddr != 198.51.100.0/24"
    verdict: str  # "return" or "redirect :PORT"
    comment: str

    def __str__(self) -> str:
        matches = " ".join(sorted(self.matches))
        return f"{self.chain}: [{self.family}] {matches} {self.verdict} comment={self.comment!r}"


def parse_rule(chain: str, rule: dict[str, Any]) -> Rule:
    family = "any"
    matches: set[str] = set()
    verdict = ""
    for expr in rule.get("expr", []):
        if "match" in expr:
            match = expr["match"]
            left, right = _selector(match["left"]), _value(match["right"])
            if left == "meta nfproto":
                family = right
                continue
            if left.startswith("ip6 ") and family == "any":
                family = "ipv6"
            elif left.startswith("ip ") and family == "any":
                family = "ipv4"
            matches.add(f"{left} {match.get('op', '==')} {right}")
        elif "redirect" in expr:
            port = (expr["redirect"] or {}).get("port")
            verdict = f"redirect :{port}"
        elif "return" in expr:
            verdict = "return"
        elif "counter" in expr:
            continue
        else:
            verdict = json.dumps(expr, sort_keys=True)
    return Rule(chain, family, frozenset(matches), verdict, rule.get("comment", ""))


@dataclass(frozen=True)
class Table:
    chains: dict[str, dict[str, Any]]  # name -> {hook, type, prio, policy}
    rules: tuple[Rule, ...]

    def in_chain(self, chain: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.chain == chain]

    def redirects(self) -> set[Rule]:
        return {rule for rule in self.rules if rule.verdict.startswith("redirect")}


def nft_table(host: Host, family: str = "inet", name: str = "handyproxy") -> Table | None:
    """The table as `nft -j` lists it, or None when it does not exist."""
    result = host.run(f"nft -j list table {family} {name}")
    if result.rc != 0:
        return None
    items = json.loads(result.stdout)["nftables"]
    chains = {item["chain"]["name"]: item["chain"] for item in items if "chain" in item}
    rules = tuple(
        parse_rule(item["rule"]["chain"], item["rule"]) for item in items if "rule" in item
    )
    return Table(chains, rules)


def nft_tables(host: Host) -> set[tuple[str, str]]:
    """(family, name) of every table on the host."""
    items = json.loads(sh(host, "nft -j list tables"))["nftables"]
    return {(item["table"]["family"], item["table"]["name"]) for item in items if "table" in item}


def expected_redirects(instances: Iterable[dict[str, Any]]) -> set[Rule]:
    """The redirect rules the role should write for an inventory's instances.

    Written from the variable contract, independently of the collection's filters: one rule per
    capture rule and family, matching its interfaces, sources, excluded destinations and ports.
    """
    expected: set[Rule] = set()
    for instance in instances:
        for capture in instance.get("capture", []):
            family = capture.get("family", "both")
            families = ["ipv4", "ipv6"] if family == "both" else [family]
            for fam in families:
                ip = "ip" if fam == "ipv4" else "ip6"
                matches: set[str] = set()
                ports = capture.get("ports") or [80, 443]
                matches.add(f"tcp dport == {_value(ports) if len(ports) > 1 else ports[0]}")
                interfaces = capture.get("interfaces") or []
                if interfaces:
                    value = _value(interfaces) if len(interfaces) > 1 else interfaces[0]
                    matches.add(f"meta iifname == {value}")
                sources = [s for s in capture.get("sources") or [] if (":" in s) == (fam == "ipv6")]
                if capture.get("sources") and not sources:
                    continue  # no source of this family: nothing to capture
                if sources:
                    matches.add(f"{ip} saddr == {_plain(sources)}")
                exclude = [s for s in capture.get("exclude") or [] if (":" in s) == (fam == "ipv6")]
                if exclude:
                    matches.add(f"{ip} daddr != {_plain(exclude)}")
                expected.add(
                    Rule(
                        capture["chain"],
                        fam,
                        frozenset(matches),
                        f"redirect :{instance['local_port']}",
                        instance["name"],
                    )
                )
    return expected


def _plain(networks: list[str]) -> str:
    """CIDRs as nft -j reports them: a single one bare, several as a set."""
    return networks[0] if len(networks) == 1 else "{" + ",".join(sorted(networks)) + "}"
