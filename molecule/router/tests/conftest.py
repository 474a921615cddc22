"""Fixtures of the router scenario: the containers around the router and the origin's blob."""

from __future__ import annotations

import helpers
import pytest


@pytest.fixture(scope="module")
def client():
    return helpers.host_in("client")


@pytest.fixture(scope="module")
def proxy():
    return helpers.host_in("proxy")


@pytest.fixture(scope="module")
def blob_sha256():
    origin = helpers.host_in("origin")
    return origin.check_output("sha256sum /srv/origin/blob.bin").split()[0]
