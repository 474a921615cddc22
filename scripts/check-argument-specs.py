#!/usr/bin/env python3
"""Fail when the handyproxy role's defaults, argument specs and README drift apart.

The role's inventory contract is written three times: `defaults/main.yml` (the values),
`meta/argument_specs.yml` (types, choices, descriptions: Ansible validates against it) and the
role README (for people). A variable added to one and forgotten in another is a silent bug, so
this check compares them: the same keys in the same order, the same default values, a
description for every option, and every variable named in the README.

An instance's options are the forwarder's (handyproxy.config) plus the role's own keys, as the
role's filter plugin lists them; the argument spec and the README's instance table must name
exactly those, so an option added to the forwarder fails this check until the role documents it.

Usage: scripts/check-argument-specs.py [ROLE_DIR]   (default: ansible/roles/handyproxy)
Exit status 0 when they agree, 1 with one line per mismatch otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROLE = ROOT / "ansible" / "roles" / "handyproxy"


def load(path: Path) -> Any:
    """Parse one YAML file; a missing or empty file is a mismatch reported by the caller."""
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def options_without_description(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Every option (nested ones too) that has no description."""
    missing = []
    for name, spec in options.items():
        spec = spec or {}
        if not spec.get("description"):
            missing.append(prefix + name)
        if isinstance(spec.get("options"), dict):
            missing += options_without_description(spec["options"], f"{prefix}{name}.")
    return missing


def role_filters(role: Path) -> Any:
    """The role's filter plugin, imported from its file (it imports handyproxy.config).

    The filters belong to the collection the role is in (ROLE/../../plugins/filter: the role
    calls them as handyproxy.fleet.NAME).
    """
    path = role.parent.parent / "plugins" / "filter" / "handyproxy.py"
    spec = importlib.util.spec_from_file_location("handyproxy_role_filters", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_instance_options(role: Path, options: dict[str, Any], readme: str) -> list[str]:
    """The instance keys of the argument spec and README against the forwarder's options."""
    filters = role_filters(role)
    want = filters.instance_keys()
    instances = options.get("handyproxy_instances") or {}
    have = list(instances.get("options") or {})
    problems = [
        f"handyproxy_instances.{key}: a forwarder option (handyproxy.config) or role key"
        " missing from meta/argument_specs.yml"
        for key in want
        if key not in have
    ]
    problems += [
        f"handyproxy_instances.{key}: in meta/argument_specs.yml but neither a forwarder option"
        " nor a role key"
        for key in have
        if key not in want
    ]
    problems += [
        f"handyproxy_instances.{key}: not in the README's instance table"
        for key in want
        if f"| `{key}` |" not in readme
    ]
    return problems


def check(role: Path) -> list[str]:
    """The list of mismatches between defaults, argument specs and README of one role."""
    problems: list[str] = []
    defaults = load(role / "defaults" / "main.yml") or {}
    specs = load(role / "meta" / "argument_specs.yml") or {}
    options = (specs.get("argument_specs", {}).get("main", {}) or {}).get("options") or {}
    readme = (role / "README.md").read_text(encoding="utf-8")

    default_keys, spec_keys = list(defaults), list(options)
    for key in default_keys:
        if key not in options:
            problems.append(f"{key}: in defaults/main.yml, missing from meta/argument_specs.yml")
    for key in spec_keys:
        if key not in defaults:
            problems.append(f"{key}: in meta/argument_specs.yml, missing from defaults/main.yml")
    common_defaults = [k for k in default_keys if k in options]
    common_specs = [k for k in spec_keys if k in defaults]
    if common_defaults != common_specs:
        problems.append(
            "order differs: defaults/main.yml has "
            f"{', '.join(common_defaults)}; meta/argument_specs.yml has {', '.join(common_specs)}"
        )
    for key in common_defaults:
        spec = options[key] or {}
        if "default" not in spec:
            problems.append(f"{key}: meta/argument_specs.yml gives no default")
        elif spec["default"] != defaults[key]:
            problems.append(
                f"{key}: default {defaults[key]!r} in defaults/main.yml but "
                f"{spec['default']!r} in meta/argument_specs.yml"
            )
    for key in default_keys:
        if not key.startswith("handyproxy_"):
            problems.append(f"{key}: public variables must start with handyproxy_")
        if f"`{key}`" not in readme:
            problems.append(f"{key}: not documented in README.md")
    problems += [
        f"{name}: no description in meta/argument_specs.yml"
        for name in options_without_description(options)
    ]
    problems += check_instance_options(role, options, readme)
    return problems


def main(argv: list[str]) -> int:
    role = Path(argv[1]) if len(argv) > 1 else DEFAULT_ROLE
    problems = check(role)
    for problem in problems:
        print(f"check-argument-specs: {problem}", file=sys.stderr)
    if not problems:
        print(f"check-argument-specs: {role.name}: defaults, argument specs and README agree")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
