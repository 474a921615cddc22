"""Filters of the handyproxy role: inventory checks, wheel selection and capture-rule expansion.

What a forwarder option means and which values it takes is the forwarder's own business:
``handyproxy.config`` (every option, its kind, its validation) and ``handyproxy.address`` are
imported here, so the role accepts exactly what the forwarder accepts and an option added there
can be set per instance at once. What stays here belongs to the role alone: the inventory's
shape (names, ports, capture rules -> netfilter rules), the credentials it delivers with
``LoadCredential=``, and which wheels of the wheelhouse fit a host.

Why Python and not Jinja: the checks parse CIDRs and report every mistake with the host, the
instance and the field at once, and the standard library's ``ipaddress`` does it without the
``netaddr`` library the controller may lack.

Everything here runs on the controller and is pure: data in, data out, no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from pathlib import Path
from typing import Any


def _import_forwarder() -> tuple[Any, Any, Any, str]:
    """handyproxy.config, handyproxy.address and handyproxy.upstream.spec, or the reason not.

    The controller needs the handyproxy package (the venv of this checkout has it); without it
    installed, a checkout is found above this file (ansible/plugins/filter, or the collection
    installed under the checkout's .cache/collections).
    """
    for attempt in (None, *Path(__file__).resolve().parents):
        if attempt is not None:
            if not (attempt / "handyproxy" / "config.py").is_file():
                continue
            sys.path.insert(0, str(attempt))
        try:
            from handyproxy import address, config
            from handyproxy.upstream import spec

            return config, address, spec, ""
        except ImportError as exc:
            reason = str(exc)
            if attempt is not None:
                sys.path.remove(str(attempt))
    return None, None, None, reason


# One name per assignment: Ansible's plugin documentation reader (ansible-doc, ansible-lint)
# warns about a module-level tuple target.
_FORWARDER = _import_forwarder()
_config = _FORWARDER[0]
_address = _FORWARDER[1]
_spec = _FORWARDER[2]
_IMPORT_ERROR = _FORWARDER[3]

#: Inventory keys the role owns (the forwarder never sees them as such; `cntlm` is replaced by
#: an upstream_proxy before these filters see an instance: handyproxy_cntlm.py).
ROLE_KEYS = ("name", "capture", "upstream_credentials", "cntlm")
#: Forwarder options the role sets itself, with what an inventory does instead: the
#: credentials file is the LoadCredential'd copy of upstream_credentials (so an inventory cannot
#: point the service at a file on disk), the control socket is the unit's (-control-socket).
ROLE_MANAGED_OPTIONS = {
    "upstream_credentials_file": "set upstream_credentials instead",
    "control_socket": "the unit sets it: /run/handyproxy/NAME/control",
}
#: Options without a forwarder default worth writing: the instance must set them.
REQUIRED_OPTIONS = ("local_port", "upstream_proxy")
CAPTURE_KEYS = {"chain", "family", "interfaces", "sources", "ports", "exclude"}
CHAINS = ("prerouting", "output")
FAMILIES = ("ipv4", "ipv6", "both")
DEFAULT_CAPTURE_PORTS = [80, 443]

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
# Interface names as the kernel allows them (max 15 bytes); a trailing `*` is a wildcard.
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}\*?$")
# systemd must wait longer than the longest drain before it kills an instance; below this floor
# the unit file does not change with every small drain_timeout edit.
TIMEOUT_STOP_FLOOR = 90
TIMEOUT_STOP_MARGIN = 30
# A wheel file name: distribution-version(-build)?-python-abi-platform.whl (PEP 427).
WHEEL_RE = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


class ForwarderMissing(RuntimeError):
    """The controller cannot import handyproxy; raised by the filters that need it."""


def _forwarder() -> Any:
    if _config is None:
        raise ForwarderMissing(
            "the handyproxy role needs the handyproxy package on the controller (its option list"
            f" and validation are the forwarder's): pip install it there ({_IMPORT_ERROR})"
        )
    return _config


def forwarder_options() -> dict[str, str]:
    """Every forwarder option an instance may set, inventory key -> kind, in Config order."""
    config = _forwarder()
    return {
        f.name: f.metadata["kind"]
        for f in dataclasses.fields(config.Config)
        if f.name not in ROLE_MANAGED_OPTIONS
    }


def instance_keys() -> list[str]:
    """Every key an instance may have: the role's own and the forwarder's options."""
    return ["name", *forwarder_options(), *ROLE_KEYS[1:]]


def _is_int(value: Any) -> bool:
    """True for real integers; YAML booleans are ints in Python but never a valid port or count."""
    return isinstance(value, int) and not isinstance(value, bool)


def toml_key(key: str) -> str:
    """The TOML key of an inventory option (dashes, as docs/interfaces.md writes them)."""
    return key.replace("_", "-")


def upstream_specs(value: Any) -> list[Any]:
    """The forwarder's parse of an upstream_proxy value (string, list, tables); [] if malformed."""
    _forwarder()
    try:
        return list(_spec.parse_upstreams(value))
    except ValueError:
        return []


def upstream_ip(value: Any) -> str:
    """The first upstream's address when it is an IP literal, else "" (a name cannot be matched)."""
    specs = upstream_specs(value)
    if not specs:
        return ""
    try:
        return str(ipaddress.ip_address(specs[0].host))
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
    options = forwarder_options()
    base = {k: v for k, v in given.items() if k in options}
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


def toml_settings(instance: dict[str, Any], credential_name: str) -> dict[str, Any]:
    """What an instance's NAME.toml holds, TOML key -> value, in the forwarder's option order.

    Values pass through as the inventory gives them; the forwarder judges them (the preflight
    with its Config, the host with ``handyproxy -check-config``). The credentials file is the
    one LoadCredential= provides under `credential_name`, relative to $CREDENTIALS_DIRECTORY.
    """
    settings = {toml_key(k): instance[k] for k in forwarder_options() if k in instance}
    if instance.get("upstream_credentials"):
        settings[toml_key("upstream_credentials_file")] = credential_name
    return settings


def _check_options(item: dict[str, Any]) -> list[str]:
    """The forwarder's verdict on an instance's options: ["field: reason"] or [].

    Each value goes through the forwarder's own converter, then the whole set through
    Config.validate(), exactly as `handyproxy -config NAME.toml` would; the credentials file
    is left out (it exists only on the host, where -check-config reads it).
    """
    config = _forwarder()
    values: dict[str, Any] = {}
    errors = []
    for key in forwarder_options():
        if key not in item:
            continue
        try:
            values[toml_key(key)] = config.convert(key, item[key])
        except ValueError as exc:
            errors.append(f"{key}: {exc}")
    if errors:
        return errors
    try:
        config.build(values)
    except config.ConfigError as exc:
        return [f"{exc.field.replace('-', '_')}: {exc.reason}"]
    return []


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
    known = set(instance_keys())
    errors = []
    for key in sorted(set(instance) - known):
        hint = f" ({ROLE_MANAGED_OPTIONS[key]})" if key in ROLE_MANAGED_OPTIONS else ""
        errors.append(f"{key}: unknown field{hint}")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors.append(f"name: {name!r} is required and must match [a-z0-9_-]+")
    port = instance.get("local_port")
    if not _is_int(port) or not 1024 <= port <= 65535:
        errors.append(
            f"local_port: {port!r} is required and must be an integer 1024-65535 (the service has"
            " no capability to bind a privileged port)"
        )
    if instance.get("upstream_proxy") is None:
        errors.append("upstream_proxy: is required (host:port, [v6]:port or a list of them)")
    credentials = instance.get("upstream_credentials")
    if credentials is not None and (
        not isinstance(credentials, str) or ":" not in credentials or "\n" in credentials.strip()
    ):
        # Never the value itself: it is a secret.
        errors.append("upstream_credentials: must be one line user:password (value not shown)")
    if not errors:
        errors += _check_options(instance)
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
    handyproxy_instance_defaults (forwarder options only) and of each instance (merged over the
    defaults, judged by the forwarder's Config), unique names and local ports, known chains and
    families, port ranges and sane CIDRs.
    """
    errors: list[str] = []
    if not isinstance(defaults, dict):
        errors.append(f"host {host}: handyproxy_instance_defaults: must be a mapping")
        defaults = {}
    options = forwarder_options()
    for key in defaults:
        if key not in options:
            errors.append(
                f"host {host}: handyproxy_instance_defaults.{key}: not a forwarder option"
                f" (allowed: {', '.join(options)})"
            )
    if not isinstance(instances, list):
        return [*errors, f"host {host}: handyproxy_instances: must be a list"]
    base = {k: v for k, v in defaults.items() if k in options}
    names: dict[Any, int] = {}
    ports: dict[Any, str] = {}
    for position, instance in enumerate(instances):
        merged = {**base, **instance} if isinstance(instance, dict) else instance
        label, reasons = _check_instance(merged, position)
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
    errors += _metrics_port_clashes(merge_instances(instances, defaults), ports, host)
    return errors


def _metrics_port_clashes(
    merged: list[dict[str, Any]], ports: dict[Any, str], host: str
) -> list[str]:
    """Metrics ports, once every local port is known: one may not take another's port.

    The address itself is the forwarder's to judge (its Config); this is about the host.
    """
    errors = []
    taken: dict[int, str] = {}
    for position, instance in enumerate(merged):
        try:
            _, port = _address.split_hostport(
                str(instance.get("metrics_address") or ""), kernel_port=True
            )
        except ValueError:
            continue  # empty (off) or malformed: the latter is reported with the options
        name = instance.get("name")
        label = f"instance {name!r}" if isinstance(name, str) and name else f"[{position}]"
        if port == 0:
            # The forwarder takes it (the kernel picks); a fleet's scrape target cannot.
            errors.append(
                f"host {host}: {label}: metrics_address: port 0 lets the kernel pick one; a"
                " scrape target needs a fixed port"
            )
            continue
        other = ports.get(port) or taken.get(port)
        if other:
            what = "local_port" if port in ports else "metrics_address"
            errors.append(
                f"host {host}: {label}: metrics_address: port {port} is already the {what} of"
                f" {other}"
            )
        taken.setdefault(port, f"handyproxy_instances[{position}] ({name!r})")
    return errors


def _wheel_fits(match: re.Match[str], python: str, arch: str) -> bool:
    """Whether a wheel's tags fit CPython `python` ("3.13") on `arch` ("aarch64")."""
    cp = "cp" + python.replace(".", "")
    pys = set(match["py"].split("."))
    abis = set(match["abi"].split("."))
    plats = set(match["plat"].split("."))
    if plats == {"any"}:
        return bool(pys & {"py3", cp, "py" + python.replace(".", "")})
    if not any(p.startswith(("manylinux", "linux")) and p.endswith("_" + arch) for p in plats):
        return False
    if cp in pys and abis & {cp, "none"}:
        return True
    # abi3 wheels built for an older CPython 3 fit every later one.
    return "abi3" in abis and any(
        p.startswith("cp3") and p[3:].isdigit() and int(p[3:]) <= int(cp[3:]) for p in pys
    )


def parse_manifest(text: Any) -> list[dict[str, str]]:
    """SHA256SUMS lines (`HASH  FILE`) as [{file, sha256}]; malformed lines are skipped."""
    entries = []
    for line in str(text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            entries.append({"file": parts[1].lstrip("*"), "sha256": parts[0]})
    return entries


def select_wheels(manifest: Any, python: Any, arch: Any) -> dict[str, Any]:
    """The wheels of the wheelhouse a host installs, and the distributions none of them serves.

    Every distribution in the manifest is needed (the wheelhouse holds handyproxy and its
    runtime dependencies only); for each, the first fitting wheel in manifest order is taken.
    Returns {"wheels": [{file, sha256, name, version}], "missing": [names]}.
    """
    python, arch = str(python), str(arch)
    chosen: dict[str, dict[str, str]] = {}
    names: list[str] = []
    for entry in parse_manifest(manifest):
        match = WHEEL_RE.match(entry["file"])
        if not match:
            continue
        name = match["name"].lower()
        if name not in names:
            names.append(name)
        if name not in chosen and _wheel_fits(match, python, arch):
            chosen[name] = {**entry, "name": name, "version": match["version"]}
    return {
        "wheels": [chosen[n] for n in names if n in chosen],
        "missing": [n for n in names if n not in chosen],
    }


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


def _host_wheels(listing: Any) -> dict[str, dict[str, str]]:
    """The host's wheelhouse as tasks/install.yml lists it: `file NAME MODE OWNER:GROUP` lines
    (find -printf) and `SHA256  ./NAME` lines (sha256sum), in any order."""
    found: dict[str, dict[str, str]] = {}
    for line in str(listing or "").splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "file":
            found.setdefault(words[1], {}).update(mode=words[2], owner=words[3])
        elif len(words) == 2 and re.fullmatch(r"[0-9a-f]{64}", words[0]):
            found.setdefault(words[1].removeprefix("./"), {})["sha256"] = words[0]
    return found


def wheels_to_push(wheels: Any, listing: Any) -> list[dict[str, Any]]:
    """The chosen wheels (select_wheels' `wheels`) the host lacks: missing from its wheelhouse,
    or there with another hash, or not root's 0644 file."""
    found = _host_wheels(listing)
    want = {"mode": "644", "owner": "root:root"}
    return [
        wheel
        for wheel in wheels or []
        if found.get(wheel["file"]) != {**want, "sha256": wheel["sha256"]}
    ]


def stale_wheels(wheels: Any, listing: Any) -> list[str]:
    """Names of the wheels in the host's wheelhouse that are not among the chosen ones."""
    chosen = {wheel["file"] for wheel in wheels or []}
    return sorted(name for name in _host_wheels(listing) if name not in chosen)


def checksum_mismatches(wheels: Any, digests: Any) -> list[str]:
    """The chosen wheels (select_wheels' `wheels`) whose file on the controller is missing ("")
    or has another digest than the manifest's; `digests` in the same order (the lookup
    handyproxy.fleet.file_sha256 of their paths)."""
    digests = list(digests or [])
    return [
        str(wheel["file"])
        for index, wheel in enumerate(wheels or [])
        if index >= len(digests) or digests[index] != wheel["sha256"]
    ]


def upstream_ips(instances: Any, family: str) -> list[str]:
    """Sorted unique upstream addresses of one family ("ipv4"/"ipv6"), for the OUTPUT skips.

    Every upstream of every instance counts (a list, tables with groups), parsed by the
    forwarder; names cannot be matched by netfilter and are left out.
    """
    version = 4 if family == "ipv4" else 6
    found = set()
    for instance in instances:
        for spec in upstream_specs(instance.get("upstream_proxy")):
            try:
                ip = ipaddress.ip_address(spec.host)
            except ValueError:
                continue
            if ip.version == version:
                found.add(str(ip))
    return sorted(found, key=ipaddress.ip_address)


def timeout_stop_sec(instances: Any) -> int:
    """TimeoutStopSec for the template unit: longer than every instance's drain_timeout."""
    config = _forwarder()
    longest = config.Config().drain_timeout
    for instance in instances:
        try:
            seconds = config.convert("drain_timeout", instance.get("drain_timeout", "30s"))
        except ValueError:
            continue
        longest = max(longest, seconds)
    return max(TIMEOUT_STOP_FLOOR, int(longest + 0.999) + TIMEOUT_STOP_MARGIN)


def toml_value(value: Any) -> str:
    """One TOML value, as the inventory typed it: strings quoted, numbers and booleans bare,
    lists as arrays, mappings (upstream or rule tables) as inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_string(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
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
    """Registers the filters; tasks and templates call them as handyproxy.fleet.NAME."""

    def filters(self) -> dict[str, Any]:
        return {
            "preflight_errors": preflight_errors,
            "merge_instances": merge_instances,
            "capture_rules": capture_rules,
            "upstream_ips": upstream_ips,
            "timeout_stop_sec": timeout_stop_sec,
            "toml_settings": toml_settings,
            "toml_value": toml_value,
            "iptables_interface": iptables_interface,
            "select_wheels": select_wheels,
            "checksum_mismatches": checksum_mismatches,
            "wheels_to_push": wheels_to_push,
            "stale_wheels": stale_wheels,
        }
