"""The collection handyproxy.fleet's plugins as plain Python modules, for the role's tests.

Ansible loads ansible/plugins/<kind>/<name>.py by path, not as a package; the tests do the same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"


def load(kind: str, name: str) -> ModuleType:
    """ansible/plugins/KIND/NAME.py, e.g. load("filter", "handyproxy")."""
    path = PLUGINS / kind / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"handyproxy_fleet_{kind}_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
