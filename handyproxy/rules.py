"""Per-destination rules: which connections go through which upstream group, straight to their
destination, or nowhere.

Rules are ordered; the first whose every condition holds decides, and no match means ``proxy``
through the default group. A rule can only narrow what the loop guard allows: the guard runs
first, and a refused connection never reaches the rules.

One rule, as a flag (``-rule``, repeatable) or a TOML string::

    dst=10.0.0.0/8,fd00::/8 port=22,8000-8099 name=intranet.example,.corp.example direct

or as a TOML table (``[[rule]]``) with the keys ``dst``, ``port``, ``name`` (a string or a list
each), ``action`` (``proxy``, ``direct``, ``reject``) and ``group`` (with ``proxy``). A name that
starts with a dot matches that domain and every name under it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from handyproxy.address import valid_hostname
from handyproxy.upstream.spec import DEFAULT_GROUP, valid_group

if TYPE_CHECKING:
    from handyproxy.config import Config

ACTIONS = ("proxy", "direct", "reject")
MATCH_KEYS = ("dst", "port", "name")
TABLE_KEYS = (*MATCH_KEYS, "action", "group")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """Conditions (all must hold; within one, any value) and what to do on a match."""

    networks: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    names: tuple[str, ...] = ()  # exact, or ".suffix"
    action: str = "proxy"
    group: str = DEFAULT_GROUP

    def __str__(self) -> str:
        """The flag spelling, which parses back to an equal rule."""
        parts = []
        if self.networks:
            parts.append("dst=" + ",".join(str(n) for n in self.networks))
        if self.ports:
            parts.append("port=" + ",".join(_port_text(r) for r in self.ports))
        if self.names:
            parts.append("name=" + ",".join(self.names))
        group = f":{self.group}" if self.action == "proxy" and self.group != DEFAULT_GROUP else ""
        return " ".join([*parts, self.action + group])

    def matches_port(self, port: int) -> bool:
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def matches_name(self, name: str | None) -> bool:
        if not self.names:
            return True
        if name is None:
            return False
        for pattern in self.names:
            if pattern[0] == ".":
                if name.endswith(pattern) or name == pattern[1:]:
                    return True
            elif name == pattern:
                return True
        return False


def _port_text(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def parse_rules(value: Any) -> tuple[Rule, ...]:
    """A rule list from flags (strings) or TOML (strings or tables); ValueError says which rule."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    return tuple(parse_rule(item, n) for n, item in enumerate(items, 1))


def parse_rule(value: Any, number: int = 1) -> Rule:
    if isinstance(value, Rule):
        return value
    where = f"rule {number}"
    if isinstance(value, str):
        fields, action = _split_text(value, where)
    elif isinstance(value, Mapping):
        fields, action = _split_table(value, where)
    else:
        raise ValueError(f"{where}: expected a string or a table, got {value!r}")
    verb, colon, group = action.partition(":")
    if verb not in ACTIONS:
        raise ValueError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    if colon and verb != "proxy":
        raise ValueError(f"{where}: only proxy takes a group ({action!r})")
    if colon and not valid_group(group):
        raise ValueError(f"{where}: group {group!r} is not a name (letters, digits, - and _)")
    return Rule(
        networks=tuple(_network(v, where) for v in fields.get("dst", ())),
        ports=tuple(_ports(v, where) for v in fields.get("port", ())),
        names=tuple(_name(v, where) for v in fields.get("name", ())),
        action=verb,
        group=group or DEFAULT_GROUP,
    )


def _split_text(text: str, where: str) -> tuple[dict[str, list[Any]], str]:
    fields: dict[str, list[Any]] = {}
    actions = []
    for token in text.split():
        key, eq, values = token.partition("=")
        if not eq:
            actions.append(token)
            continue
        if key not in MATCH_KEYS:
            raise ValueError(f"{where}: unknown condition {key!r} (known: {', '.join(MATCH_KEYS)})")
        if key in fields:
            raise ValueError(f"{where}: {key}= given twice; list the values with commas")
        fields[key] = [v for v in values.split(",") if v]
        if not fields[key]:
            raise ValueError(f"{where}: {key}= has no value")
    if len(actions) != 1:
        raise ValueError(
            f"{where}: {text!r} needs exactly one action (proxy, proxy:GROUP, direct, reject)"
        )
    return fields, actions[0]


def _split_table(table: Mapping[str, Any], where: str) -> tuple[dict[str, list[Any]], str]:
    fields: dict[str, list[Any]] = {}
    action = None
    group = None
    for key, value in table.items():
        name = str(key).replace("_", "-")
        if name not in TABLE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(TABLE_KEYS)})")
        if name in ("action", "group"):
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {value!r}")
            action, group = (value, group) if name == "action" else (action, value)
            continue
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError(f"{where}: {key} has no value")
        fields[name] = values
    if action is None:
        raise ValueError(f"{where}: action is missing ({', '.join(ACTIONS)})")
    if group is not None:
        if action != "proxy":
            raise ValueError(f"{where}: group is only for action proxy")
        action = f"proxy:{group}"
    return fields, action


def _network(value: Any, where: str) -> Network:
    if not isinstance(value, str):
        raise ValueError(f"{where}: dst {value!r} is not an address or CIDR")
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        raise ValueError(f"{where}: dst {exc}") from None


def _ports(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and value.isascii():
        first, dash, last = value.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{where}: port {value!r} is not a port or a range like 8000-8099")
        low, high = int(first), int(last) if dash else int(first)
    else:
        raise ValueError(f"{where}: port {value!r} is not a port or a range like 8000-8099")
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{where}: port {value!r} is not within 1-65535 (low to high)")
    return low, high


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: name {value!r} is not a host name")
    text = value.strip().lower().rstrip(".")
    bare = text[1:] if text.startswith(".") else text
    if not valid_hostname(bare):
        raise ValueError(
            f"{where}: name {value!r} is not a host name (exact, or .domain for it and "
            "every name under it; IP addresses go in dst=)"
        )
    return text


#: ``before_sniffing`` cannot tell yet: the first rule that may match needs the sniffed name.
UNDECIDED: Final = object()


class RuleSet:
    """The configured rules, asked once per tunnel (twice when a name condition needs sniffing).

    Answers are ``(number, rule)`` with the 1-based position, for the access record, or None
    when no rule matches.
    """

    __slots__ = ("rules", "uses_names")

    def __init__(self, rules: tuple[Rule, ...] = ()) -> None:
        self.rules = rules
        self.uses_names = any(rule.names for rule in rules)

    @classmethod
    def from_config(cls, cfg: Config) -> RuleSet:
        return cls(cfg.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def before_sniffing(self, ip: str, port: int) -> tuple[int, Rule] | object | None:
        """The decision if it does not depend on the name, else UNDECIDED."""
        return self._first(ip, port, None, sniffed=False)

    def decide(self, ip: str, port: int, name: str | None) -> tuple[int, Rule] | None:
        found = self._first(ip, port, name, sniffed=True)
        assert found is not UNDECIDED
        return found  # type: ignore[return-value]

    def _first(
        self, ip: str, port: int, name: str | None, sniffed: bool
    ) -> tuple[int, Rule] | object | None:
        address = None
        for number, rule in enumerate(self.rules, 1):
            if not rule.matches_port(port):
                continue
            if rule.networks:
                if address is None:
                    address = ipaddress.ip_address(ip)
                if not any(address in network for network in rule.networks):
                    continue
            if rule.names:
                if not sniffed:
                    return UNDECIDED
                if not rule.matches_name(name):
                    continue
            return number, rule
        return None
