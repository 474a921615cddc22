"""The collection's metadata agrees with the forwarder and keeps the checkout-only parts out.

A release bumps handyproxy.__version__; a collection artifact with another version number would
install beside the old one instead of replacing it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

import handyproxy

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


def galaxy() -> dict:
    return yaml.safe_load((ANSIBLE / "galaxy.yml").read_text(encoding="utf-8"))


def test_collection_version_is_the_forwarders():
    assert galaxy()["version"] == handyproxy.__version__


def test_collection_leaves_the_checkout_link_and_tests_out_of_the_artifact():
    ignored = set(galaxy()["build_ignore"])
    assert {"collections", "tests", "roles/*/tests", "inventory", "ansible.cfg"} <= ignored


def test_checkout_link_points_back_at_the_collection_root():
    link = ANSIBLE / "collections" / "ansible_collections" / "handyproxy" / "fleet"
    assert link.is_symlink()
    assert link.resolve() == ANSIBLE.resolve()
    assert (ANSIBLE / "meta" / "runtime.yml").is_file()
    assert yaml.safe_load((ANSIBLE / "meta" / "runtime.yml").read_text())["requires_ansible"]


def collection_filters() -> dict[str, object]:
    """The filters of ansible/plugins/filter by name, as Ansible registers them."""
    names: dict[str, object] = {}
    for path in sorted((ANSIBLE / "plugins" / "filter").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"fleet_filter_{path.stem}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        names.update(module.FilterModule().filters())
    return names


def role_files() -> list[Path]:
    role = ANSIBLE / "roles" / "handyproxy"
    return [
        p
        for d in ("tasks", "templates", "vars", "handlers", "defaults")
        for p in (role / d).iterdir()
    ]


def test_role_calls_the_collections_plugins_by_fqcn_only():
    # A role's own filter_plugins/ is not loaded inside a collection, and a collection's filter
    # is not found by its short name: a short name would work in no installed copy.
    filters = collection_filters()
    lookups = {path.stem for path in (ANSIBLE / "plugins" / "lookup").glob("*.py")}
    short = re.compile(r"(" + "|".join(map(re.escape, filters)) + r")\b")
    fqcn = re.compile(r"handyproxy\.fleet\.(\w+)")
    for path in role_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for part in line.split("|")[1:]:
                assert not short.match(part.strip()), f"{path.name}:{number}: {line.strip()}"
            for name in fqcn.findall(line):
                known = name in filters or name in lookups or name in {"handyproxy", "site"}
                assert known, f"{path.name}:{number}"


def test_checkout_playbook_and_molecule_import_the_collections_playbook():
    # One play: ansible/site.yml (the README's command) and Molecule's converge run
    # handyproxy.fleet.site, the collection's playbooks/site.yml.
    for path in (ANSIBLE / "site.yml", ANSIBLE.parent / "molecule" / "shared" / "converge.yml"):
        plays = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert [play.get("ansible.builtin.import_playbook") for play in plays] == [
            "handyproxy.fleet.site"
        ], path
    (play,) = yaml.safe_load((ANSIBLE / "playbooks" / "site.yml").read_text(encoding="utf-8"))
    assert play["roles"] == [{"role": "handyproxy.fleet.handyproxy"}]
