"""Hooks for the Molecule scenarios' testinfra verifiers: show the forwarder's journal on failure.

A failed traffic check says little by itself; the forwarder's access and error lines on the role's
host usually say why (upstream refused, not redirected, loop), so they go into the report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "shared"))

import helpers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    try:
        for name in helpers.hosts_in("handyproxy"):
            report.sections.append(
                (f"journal of {name} (handyproxy units)", helpers.journal(helpers.get_host(name)))
            )
    except Exception as exc:
        report.sections.append(("journal", f"could not read the journal: {exc!r}"))
