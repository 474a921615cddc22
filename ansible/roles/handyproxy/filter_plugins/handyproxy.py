"""Filters of the handyproxy role: inventory checks and capture-rule expansion.

Why Python and not Jinja: the preflight has to parse CIDRs, IP literals, `host:port` upstreams and
Go durations, and report every mistake with the host, the instance and the field at once. Only
ansible.builtin, ansible.posix and community.general may be used, and none of them parses
addresses without the `netaddr` library, which the controller may lack. The standard library's
`ipaddress` does it, so the checks and the expansion of capture rules into per-family netfilter
rules live here, where they read top to bottom and the templates stay plain.

Everything here runs on the controller and is pure: data in, data out, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

# The forwarder options an instance (or handyproxy_instance_defaults) may set, with the TOML key
# they are rendered as (docs/interfaces.md) and their kind.
OPTION_KINDS: dict[str, str] = {
    "listen_address": "ip_or_empty",
    "dial_timeout": "duration",
    "sniff_timeout": "duration",
    "sniff_max_bytes": "int_positive",
    "sniff_ports": "port_list",
    "idle_timeout": "duration",
    "half_close_timeout": "duration",
    "max_connections": "int_non_negative",
    "max_client_connections": "int_non_negative",
    "drain_timeout": "duration",
    "log_format": "log_format",
    "log_level": "log_level",
    "workers": "int_positive",
    "metrics_address": "hostport_or_empty",
}
INSTANCE_KEYS = {"name", "local_port", "upstream_proxy", "capture", *OPTION_KINDS}
CAPTURE_KEYS = {"chain", "family", "interfaces", "sources", "ports", "exclude"}
CHAINS = ("prerouting", "output")
FAMILIES = ("ipv4", "ipv6", "both")
DEFAULT_CAPTURE_PORTS = [80, 443]
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
# Interface names as the kernel allows them (max 15 bytes); a trailing `*` is a wildcard.
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}\*?$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_RE = re.compile(r"^[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")
DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
# systemd must wait longer than the longest drain before it kills an instance; below this floor
# the unit file does not change with every small drain_timeout edit.
TIMEOUT_STOP_FLOOR = 90
TIMEOUT_STOP_MARGIN = 30


def _is_int(value: Any) -> bool:
    """True for real integers; YAML booleans are ints in Python but never a valid port or count."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_duration(value: Any, bare_seconds: bool = False) -> float | None:
    """Seconds for a Go duration ("1m30s", "500ms", "0"), or None when it is not one.

    A bare number is only a duration when it is 0, or for sniff_timeout (bare_seconds), which
    the original took as whole seconds ("-1" turns sniffing off); the forwarder does the same.
    """
    if _is_int(value) or (isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip())):
        seconds = int(value)
        return float(seconds) if bare_seconds or seconds == 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not DURATION_RE.fullmatch(text):
        return None
    sign = -1.0 if text.startswith("-") else 1.0
    total = sum(float(num) * DURATION_UNITS[unit] for num, unit in DURATION_PART_RE.findall(text))
    return sign * total


def split_upstream(value: Any) -> tuple[str, int | None] | None:
    """(host, port) of `host:port` or `[v6]:port`; port None when missing; None when malformed."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", value)
        if not match:
            return None
        try:
            ipaddress.IPv6Address(match.group(1))
        except ValueError:
            return None
        return match.group(1), int(match.group(2)) if match.group(2) else None
    if value.count(":") > 1:
        return None  # a bare IPv6 literal: ambiguous without brackets
    host, sep, port = value.partition(":")
    if not host or (port and not port.isdigit()) or (sep and not port):
        return None
    return host, int(port) if port else None


def upstream_ip(value: Any) -> str:
    """The upstream's address when it is an IP literal, else "" (a name cannot be matched)."""
    parts = split_upstream(value)
    if not parts:
        return ""
    try:
        return str(ipaddress.ip_address(parts[0]))
    except ValueError:
        return ""


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A strict network (no host bits) from a CIDR or a bare address, or None."""
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        return None


def merge_instances(instances: Any, defaults: Any) -> list[dict[str, Any]]:
    """Each instance over handyproxy_instance_defaults, capture rules with their defaults filled.

    Tolerates a malformed inventory (the preflight reports it) so that variables built from this
    filter can be evaluated before the preflight has run.
    """
    given = defaults if isinstance(defaults, dict) else {}
    base = {k: v for k, v in given.items() if k in OPTION_KINDS}
    merged: list[dict[str, Any]] = []
    for instance in instances if isinstance(instances, list) else []:
        if not isinstance(instance, dict):
            continue
        item = {**base, **instance}
        rules = []
        for rule in item.get("capture") or []:
            if not isinstance(rule, dict):
                continue
            rules.append(
                {
                    "chain": rule.get("chain"),
                    "family": rule.get("family", "both"),
                    "interfaces": list(rule.get("interfaces") or []),
                    "sources": list(rule.get("sources") or []),
                    "ports": list(rule.get("ports") or DEFAULT_CAPTURE_PORTS),
                    "exclude": list(rule.get("exclude") or []),
                }
            )
        item["capture"] = rules
        merged.append(item)
    return merged


def _check_option(key: str, value: Any) -> str | None:
    """The reason an option value is wrong, or None."""
    kind = OPTION_KINDS[key]
    if kind == "duration":
        if parse_duration(value, bare_seconds=key == "sniff_timeout") is None:
            return f"{value!r} is not a Go duration such as 500ms, 3m or 1m30s"
    elif kind == "int_positive":
        if not _is_int(value) or value < 1:
            return f"{value!r} must be an integer >= 1"
    elif kind == "int_non_negative":
        if not _is_int(value) or value < 0:
            return f"{value!r} must be an integer >= 0"
    elif kind == "port_list":
        if not isinstance(value, list) or not all(_is_int(p) and 1 <= p <= 65535 for p in value):
            return f"{value!r} must be a list of ports 1-65535"
    elif kind == "ip_or_empty":
        if value != "":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                return f"{value!r} must be an IP literal or empty (all addresses)"
    elif kind == "hostport_or_empty":
        parts = split_upstream(value) if value != "" else ("", 1)
        if parts is None or parts[1] is None or not 1 <= parts[1] <= 65535:
            return f"{value!r} must be host:port or [v6]:port (port 1-65535), or empty (off)"
    elif kind == "log_format":
        if value not in LOG_FORMATS:
            return f"{value!r} must be one of {', '.join(LOG_FORMATS)}"
    elif kind == "log_level" and value not in LOG_LEVELS:
        return f"{value!r} must be one of {', '.join(LOG_LEVELS)}"
    return None


def _check_cidrs(field: str, values: Any, family: Any) -> list[str]:
    """Reasons why a list of CIDRs is wrong for a rule of the given family."""
    if not isinstance(values, list):
        return [f"{field}: must be a list of CIDRs, got {values!r}"]
    errors = []
    for value in values:
        net = _network(value)
        if net is None:
            try:
                loose = ipaddress.ip_network(str(value), strict=False)
                hint = f" (host bits set; did you mean {loose}?)"
            except ValueError:
                hint = ""
            errors.append(f"{field}: {value!r} is not a CIDR or address{hint}")
        elif family in ("ipv4", "ipv6") and f"ipv{net.version}" != family:
            errors.append(f"{field}: {value} is IPv{net.version} but the rule's family is {family}")
    return errors


def _check_capture(rule: Any, position: int) -> list[str]:
    """Reasons why one capture rule is wrong, each prefixed with its field path."""
    where = f"capture[{position}]"
    if not isinstance(rule, dict):
        return [f"{where}: must be a mapping with at least a chain"]
    errors = [f"{where}.{key}: unknown field" for key in sorted(set(rule) - CAPTURE_KEYS)]
    chain = rule.get("chain")
    if chain not in CHAINS:
        errors.append(f"{where}.chain: {chain!r} must be one of {', '.join(CHAINS)}")
    family = rule.get("family", "both")
    if family not in FAMILIES:
        errors.append(f"{where}.family: {family!r} must be one of {', '.join(FAMILIES)}")
    interfaces = rule.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(
        isinstance(i, str) and INTERFACE_RE.fullmatch(i) for i in interfaces
    ):
        errors.append(f"{where}.interfaces: {interfaces!r} must be a list of interface names")
    elif interfaces and chain == "output":
        errors.append(
            f"{where}.interfaces: the output chain sees the host's own traffic, which has no"
            " incoming interface; remove interfaces or use chain prerouting"
        )
    ports = rule.get("ports", DEFAULT_CAPTURE_PORTS)
    if (
        not isinstance(ports, list)
        or not ports
        or not all(_is_int(p) and 1 <= p <= 65535 for p in ports)
    ):
        errors.append(f"{where}.ports: {ports!r} must be a non-empty list of ports 1-65535")
    errors += _check_cidrs(f"{where}.sources", rule.get("sources", []), family)
    errors += _check_cidrs(f"{where}.exclude", rule.get("exclude", []), family)
    return errors


def _check_instance(instance: Any, position: int) -> tuple[str, list[str]]:
    """(label, reasons) for one instance; the label names it for the messages."""
    if not isinstance(instance, dict):
        return f"handyproxy_instances[{position}]", ["must be a mapping with name, local_port, ..."]
    name = instance.get("name")
    label = (
        f"instance {name!r}"
        if isinstance(name, str) and name
        else f"handyproxy_instances[{position}]"
    )
    errors = [f"{key}: unknown field" for key in sorted(set(instance) - INSTANCE_KEYS)]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors.append(f"name: {name!r} is required and must match [a-z0-9_-]+")
    port = instance.get("local_port")
    if not _is_int(port) or not 1024 <= port <= 65535:
        errors.append(
            f"local_port: {port!r} is required and must be an integer 1024-65535 (the service has"
            " no capability to bind a privileged port)"
        )
    upstream = instance.get("upstream_proxy")
    parts = split_upstream(upstream)
    if upstream is None:
        errors.append("upstream_proxy: is required (host:port or [v6]:port)")
    elif parts is None:
        errors.append(f"upstream_proxy: {upstream!r} is not host:port or [v6]:port")
    else:
        host, up_port = parts
        if up_port is None:
            errors.append(
                f"upstream_proxy: {upstream!r} has no port; write it out (e.g. {upstream}:3128)"
            )
        elif not 1 <= up_port <= 65535:
            errors.append(f"upstream_proxy: port {up_port} is out of range 1-65535")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not HOSTNAME_RE.fullmatch(host):
                errors.append(f"upstream_proxy: {host!r} is neither an IP literal nor a host name")
    for key in OPTION_KINDS:
        if key in instance:
            reason = _check_option(key, instance[key])
            if reason:
                errors.append(f"{key}: {reason}")
    capture = instance.get("capture", [])
    if not isinstance(capture, list):
        errors.append(f"capture: must be a list of rules, got {capture!r}")
    else:
        for index, rule in enumerate(capture):
            errors += _check_capture(rule, index)
    return label, errors


def preflight_errors(instances: Any, defaults: Any, host: str) -> list[str]:
    """Every inventory mistake of a host, one line each naming the host, the instance and the field.

    An empty list means the inventory is sound. Checked: the shapes and values of
    handyproxy_instance_defaults (forwarder options only) and of each instance, unique names and
    local ports, known chains and families, upstreams with a port, port ranges and sane CIDRs.
    """
    errors: list[str] = []
    if not isinstance(defaults, dict):
        errors.append(f"host {host}: handyproxy_instance_defaults: must be a mapping")
        defaults = {}
    for key, value in defaults.items():
        if key not in OPTION_KINDS:
            errors.append(
                f"host {host}: handyproxy_instance_defaults.{key}: not a forwarder option"
                f" (allowed: {', '.join(OPTION_KINDS)})"
            )
        else:
            reason = _check_option(key, value)
            if reason:
                errors.append(f"host {host}: handyproxy_instance_defaults.{key}: {reason}")
    if not isinstance(instances, list):
        return [*errors, f"host {host}: handyproxy_instances: must be a list"]
    names: dict[Any, int] = {}
    ports: dict[Any, str] = {}
    for position, instance in enumerate(instances):
        # The defaults were checked above; an instance is checked for what it sets itself.
        label, reasons = _check_instance(instance, position)
        errors += [f"host {host}: {label}: {reason}" for reason in reasons]
        if not isinstance(instance, dict):
            continue
        name, port = instance.get("name"), instance.get("local_port")
        if isinstance(name, str):
            if name in names:
                errors.append(
                    f"host {host}: {label}: name: duplicate of handyproxy_instances[{names[name]}]"
                )
            names.setdefault(name, position)
        if _is_int(port):
            if port in ports:
                errors.append(
                    f"host {host}: {label}: local_port: {port} is already used by {ports[port]}"
                )
            ports.setdefault(port, f"handyproxy_instances[{position}] ({name!r})")
    # Metrics ports, after every local port is known: one may not take another's port.
    merged = merge_instances(instances, defaults)
    taken: dict[int, str] = {}
    for position, instance in enumerate(merged):
        parts = split_upstream(instance.get("metrics_address") or "")
        if not parts or parts[1] is None:
            continue
        name = instance.get("name")
        label = f"instance {name!r}" if isinstance(name, str) and name else f"[{position}]"
        port = parts[1]
        other = ports.get(port) or taken.get(port)
        if other:
            what = "local_port" if port in ports else "metrics_address"
            errors.append(
                f"host {host}: {label}: metrics_address: port {port} is already the {what} of"
                f" {other}"
            )
        taken.setdefault(port, f"handyproxy_instances[{position}] ({name!r})")
    return errors


def capture_rules(instances: Any) -> list[dict[str, Any]]:
    """The merged instances' capture rules as one netfilter rule per chain and IP family.

    A rule for `both` families with only IPv4 sources becomes an IPv4 rule only; exclusions are
    split by family, since an `ip daddr` match can never see an IPv6 packet.
    """
    expanded = []
    for instance in instances:
        for index, rule in enumerate(instance.get("capture", [])):
            families = ["ipv4", "ipv6"] if rule["family"] == "both" else [rule["family"]]
            nets = {key: [_network(c) for c in rule[key]] for key in ("sources", "exclude")}
            for family in families:
                version = 4 if family == "ipv4" else 6
                sources = [str(n) for n in nets["sources"] if n and n.version == version]
                if rule["sources"] and not sources:
                    continue  # the rule names sources, none of this family
                expanded.append(
                    {
                        "instance": instance["name"],
                        "index": index,
                        "chain": rule["chain"],
                        "family": family,
                        "interfaces": rule["interfaces"],
                        "sources": sources,
                        "exclude": [str(n) for n in nets["exclude"] if n and n.version == version],
                        "ports": rule["ports"],
                        "local_port": instance["local_port"],
                    }
                )
    return expanded


def upstream_ips(instances: Any, family: str) -> list[str]:
    """Sorted unique upstream addresses of one family ("ipv4"/"ipv6"), for the OUTPUT skips."""
    version = 4 if family == "ipv4" else 6
    found = set()
    for instance in instances:
        ip = upstream_ip(instance.get("upstream_proxy"))
        if ip and ipaddress.ip_address(ip).version == version:
            found.add(ip)
    return sorted(found, key=ipaddress.ip_address)


def timeout_stop_sec(instances: Any) -> int:
    """TimeoutStopSec for the template unit: longer than every instance's drain_timeout."""
    longest = 30.0  # the forwarder's default drain-timeout
    for instance in instances:
        seconds = parse_duration(instance.get("drain_timeout", "30s"))
        if seconds is not None:
            longest = max(longest, seconds)
    return max(TIMEOUT_STOP_FLOOR, int(longest + 0.999) + TIMEOUT_STOP_MARGIN)


def toml_value(value: Any, key: str) -> str:
    """One TOML value: durations and strings quoted, integers bare, lists as arrays."""
    if OPTION_KINDS.get(key) == "duration":
        return _toml_string(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v, "") for v in value) + "]"
    if _is_int(value):
        return str(value)
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def iptables_interface(name: str) -> str:
    """An interface name in iptables syntax: nft's trailing `*` wildcard is `+` there."""
    return name[:-1] + "+" if name.endswith("*") else name


class FilterModule:
    """Registers the filters under handyproxy_* names."""

    def filters(self) -> dict[str, Any]:
        return {
            "handyproxy_preflight_errors": preflight_errors,
            "handyproxy_merge_instances": merge_instances,
            "handyproxy_capture_rules": capture_rules,
            "handyproxy_upstream_ips": upstream_ips,
            "handyproxy_timeout_stop_sec": timeout_stop_sec,
            "handyproxy_toml_value": toml_value,
            "handyproxy_iptables_interface": iptables_interface,
        }
