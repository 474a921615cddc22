"""Filters for the role's optional cNTLM per credential owner (an instance's `cntlm` block).

An instance that declares `cntlm` gets its upstream from the role: one cNTLM per credential
owner (`handyproxy-cntlm@OWNER.service`) on 127.0.0.1:PORT, whose parents are the real proxies.
These filters check the blocks (every mistake named by host, instance and field, never showing
the password), point each such instance at its owner's cNTLM, and list the owners to run.

Kept apart from handyproxy.py: the forwarder's options and capture rules live there, this file
only knows cNTLM. Pure functions: data in, data out, no I/O, run on the controller.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

CNTLM_KEYS = {"owner", "port", "user", "domain", "password", "auth", "parents", "no_proxy"}
# cNTLM 0.92.3's Auth values; the hashes each one needs (cntlm -H prints all three).
AUTH_HASHES: dict[str, list[str]] = {
    "NTLMv2": ["PassNTLMv2"],
    "NTLM2SR": ["PassNT"],
    "NT": ["PassNT"],
    "NTLM": ["PassLM", "PassNT"],
    "LM": ["PassLM"],
}
DEFAULT_AUTH = "NTLMv2"
LISTEN_HOST = "127.0.0.1"
OWNER_RE = re.compile(r"^[a-z0-9_-]+$")
# Written into cntlm's configuration unquoted, one per line: no blanks, no comment signs.
WORD_RE = re.compile(r"^[^\s#\"'\\]+$")
DOMAIN_RE = re.compile(r"^[^\s#\"'\\]*$")
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)
NO_PROXY_RE = re.compile(r"^[A-Za-z0-9_.*?:\[\]/-]+$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    """A non-empty string; vaulted values are str subclasses and count too."""
    return isinstance(value, str) and len(str(value)) > 0


def owner_name(instance: dict[str, Any]) -> Any:
    """The credential owner of an instance's block: `owner`, else the instance's name."""
    block = instance.get("cntlm")
    if isinstance(block, dict) and "owner" in block:
        return block["owner"]
    return instance.get("name")


def _parent_error(value: Any) -> str | None:
    """Why a parent proxy is not `host:port` cNTLM 0.92.3 can use, or None."""
    if not isinstance(value, str) or value.count(":") != 1:
        if isinstance(value, str) and (value.startswith("[") or value.count(":") > 1):
            return (
                f"{value!r}: cNTLM 0.92.3 splits host:port at the first colon, so an IPv6"
                " literal cannot be a parent; use a name or an IPv4 address"
            )
        return f"{value!r} must be host:port"
    host, port = value.split(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{value!r}: port must be 1-65535"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not HOSTNAME_RE.fullmatch(host):
            return f"{value!r}: {host!r} is neither an IPv4 address nor a host name"
    return None


def _block_errors(block: Any) -> list[str]:
    """Reasons why one `cntlm` block is wrong, each naming its field; never the password."""
    if not isinstance(block, dict):
        return ["cntlm: must be a mapping (user, domain, password, port, parents, ...)"]
    errors = [f"cntlm.{key}: unknown field" for key in sorted(set(block) - CNTLM_KEYS)]
    owner = block.get("owner")
    if "owner" in block and (not isinstance(owner, str) or not OWNER_RE.fullmatch(owner)):
        errors.append(f"cntlm.owner: {owner!r} must match [a-z0-9_-]+")
    port = block.get("port")
    if not _is_int(port) or not 1024 <= port <= 65535:
        errors.append(
            f"cntlm.port: {port!r} is required and must be an integer 1024-65535 (the loopback"
            " port this owner's cNTLM listens on)"
        )
    user = block.get("user")
    if not isinstance(user, str) or not WORD_RE.fullmatch(user):
        errors.append(f"cntlm.user: {user!r} is required: a user name without blanks or quotes")
    domain = block.get("domain", "")
    if not isinstance(domain, str) or not DOMAIN_RE.fullmatch(domain):
        errors.append(f"cntlm.domain: {domain!r} must be a domain name without blanks or quotes")
    if not _is_text(block.get("password")):
        errors.append("cntlm.password: is required (a string, e.g. from Ansible Vault)")
    auth = block.get("auth", DEFAULT_AUTH)
    if auth not in AUTH_HASHES:
        errors.append(f"cntlm.auth: {auth!r} must be one of {', '.join(AUTH_HASHES)}")
    parents = block.get("parents")
    if not isinstance(parents, list) or not parents:
        errors.append("cntlm.parents: is required: a non-empty list of host:port proxies")
    else:
        errors += [
            f"cntlm.parents[{i}]: {reason}"
            for i, parent in enumerate(parents)
            if (reason := _parent_error(parent))
        ]
    no_proxy = block.get("no_proxy", [])
    if not isinstance(no_proxy, list) or not all(
        isinstance(p, str) and NO_PROXY_RE.fullmatch(p) for p in no_proxy
    ):
        errors.append(
            f"cntlm.no_proxy: {no_proxy!r} must be a list of host wildcards such as *.local"
        )
    return errors


def _comparable(block: dict[str, Any]) -> dict[str, Any]:
    """A block with its defaults filled, for comparing two instances of one owner."""
    return {
        "port": block.get("port"),
        "user": block.get("user"),
        "domain": block.get("domain", ""),
        "password": str(block.get("password")),
        "auth": block.get("auth", DEFAULT_AUTH),
        "parents": block.get("parents"),
        "no_proxy": block.get("no_proxy", []),
    }


def cntlm_errors(instances: Any, host: str) -> list[str]:
    """Every mistake in the instances' `cntlm` blocks, one line each naming host, instance, field.

    Checked: the block's fields, no `upstream_proxy` beside it (the role sets it), one block per
    owner (instances sharing an owner declare the same one), and each owner's port unique among
    the owners and not any instance's local_port.
    """
    if not isinstance(instances, list):
        return []  # handyproxy_preflight_errors reports it
    errors: list[str] = []
    owners: dict[Any, tuple[str, dict[str, Any]]] = {}
    ports: dict[Any, str] = {}
    local_ports = {i.get("local_port"): i.get("name") for i in instances if isinstance(i, dict)}
    for position, instance in enumerate(instances):
        if not isinstance(instance, dict) or "cntlm" not in instance:
            continue
        name = instance.get("name")
        label = f"instance {name!r}" if name else f"handyproxy_instances[{position}]"
        block = instance["cntlm"]
        reasons = _block_errors(block)
        if "upstream_proxy" in instance:
            reasons.append(
                "upstream_proxy: must not be set with cntlm (the role points the instance at its"
                " owner's cNTLM); list the real proxies in cntlm.parents"
            )
        if not reasons:
            owner = owner_name(instance)
            port = block["port"]
            if owner in owners and owners[owner][1] != _comparable(block):
                reasons.append(
                    f"cntlm: owner {owner!r} is also declared by {owners[owner][0]} with other"
                    " settings; instances sharing an owner need the same block"
                )
            elif owner not in owners:
                if port in ports:
                    reasons.append(f"cntlm.port: {port} is already used by owner {ports[port]!r}")
                elif port in local_ports:
                    reasons.append(
                        f"cntlm.port: {port} is the local_port of instance {local_ports[port]!r}"
                    )
                owners[owner] = (label, _comparable(block))
                ports[port] = owner
        errors += [f"host {host}: {label}: {reason}" for reason in reasons]
    return errors


def cntlm_upstreams(instances: Any) -> Any:
    """The instances with each `cntlm` block replaced by an upstream_proxy at its owner's cNTLM.

    What the forwarder's own preflight and the instance files then see is a plain instance. A
    block whose port is wrong gets a placeholder upstream: cntlm_errors reports the port.
    """
    if not isinstance(instances, list):
        return instances
    result = []
    for instance in instances:
        if isinstance(instance, dict) and "cntlm" in instance:
            block = instance["cntlm"]
            port = block.get("port") if isinstance(block, dict) else None
            port = port if _is_int(port) and 1 <= port <= 65535 else 3128
            instance = {k: v for k, v in instance.items() if k != "cntlm"}
            instance["upstream_proxy"] = f"{LISTEN_HOST}:{port}"
        result.append(instance)
    return result


def cntlm_owners(instances: Any) -> list[dict[str, Any]]:
    """One entry per credential owner, in inventory order, with the block's defaults filled."""
    owners: dict[str, dict[str, Any]] = {}
    for instance in instances if isinstance(instances, list) else []:
        if not isinstance(instance, dict) or not isinstance(instance.get("cntlm"), dict):
            continue
        owner = owner_name(instance)
        if owner in owners:
            continue
        block = instance["cntlm"]
        auth = block.get("auth", DEFAULT_AUTH)
        owners[owner] = {
            "owner": owner,
            "listen": f"{LISTEN_HOST}:{block.get('port')}",
            "user": block.get("user"),
            "domain": block.get("domain", ""),
            "password": block.get("password"),
            "auth": auth,
            "hashes": AUTH_HASHES.get(auth, []),
            "parents": list(block.get("parents") or []),
            "no_proxy": list(block.get("no_proxy") or []),
        }
    return list(owners.values())


def cntlm_hashes(output: Any) -> dict[str, str]:
    """The `PassLM`/`PassNT`/`PassNTLMv2` hashes from the output of `cntlm -H`."""
    text = output if isinstance(output, str) else ""
    return dict(re.findall(r"^(Pass(?:LM|NT|NTLMv2))\s+([0-9A-Fa-f]{32})\b", text, re.M))


class FilterModule:
    """Registers the filters; tasks and templates call them as handyproxy.fleet.NAME."""

    def filters(self) -> dict[str, Any]:
        return {
            "cntlm_errors": cntlm_errors,
            "cntlm_upstreams": cntlm_upstreams,
            "cntlm_owners": cntlm_owners,
            "cntlm_hashes": cntlm_hashes,
        }
