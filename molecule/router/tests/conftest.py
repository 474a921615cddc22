"""Fixtures of the router scenario: each router's own client and variables, the shared peers.

Both routers run the same tests (testinfra's `host` fixture, one per router); a router and its
client share the `site` variable of their host_vars, which names both and their addresses.
"""

from __future__ import annotations

from typing import Any

import helpers
import pytest
from testinfra.host import Host


def name_of(host: Host) -> str:
    """The inventory name of a testinfra host (the `ansible://` backend keeps it)."""
    return host.backend.host


@pytest.fixture
def site(host: Host) -> dict[str, Any]:
    return helpers.host_vars(name_of(host))["site"]


@pytest.fixture
def instances(host: Host) -> list[dict[str, Any]]:
    return helpers.host_vars(name_of(host))["handyproxy_instances"]


@pytest.fixture
def client(site: dict[str, Any]) -> Host:
    return helpers.get_host(site["client"])


@pytest.fixture(scope="module")
def proxy() -> Host:
    return helpers.host_in("proxy")


@pytest.fixture(scope="module")
def blob_sha256() -> str:
    origin = helpers.host_in("origin")
    return origin.check_output("sha256sum /srv/origin/blob.bin").split()[0]
