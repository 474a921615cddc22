"""The collection's metadata agrees with the forwarder and keeps the checkout-only parts out.

A release bumps handyproxy.__version__; a collection artifact with another version number would
install beside the old one instead of replacing it.
"""

from __future__ import annotations

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
