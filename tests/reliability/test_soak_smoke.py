"""The soak in miniature: scripts/soak.py for 30 seconds must pass (the full ten-minute run is a
separate command, see docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def test_soak_for_30_seconds_loses_nothing_and_leaks_nothing(tmp_path):
    report = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "30", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["passed"] and result["failures"] == []
    traffic = result["traffic"]
    # Every kind of traffic ran, and the ones that must arrive intact all did.
    for kind in (
        "short:ok",
        "long:ok",
        "half-close:ok",
        "reset:reset-sent",
        "origin-rst:reset-seen",
        "idle:idle-done",
    ):
        assert traffic.get(kind, 0) > 0, (kind, traffic)
    assert not [k for k in traffic if "corrupt" in k or "unexpected" in k], traffic
    assert result["end"]["reported"] == 0
    assert result["end"]["kernel_established"] == 0
    assert result["end"]["sockets"] == result["baseline"]["sockets"]
