"""scripts/build-wheelhouse.sh: one wheelhouse for a fleet of Pythons and architectures.

The role installs every host from one directory, choosing the wheels for the host's Python and
architecture and checking them against SHA256SUMS; so building again for another Python must
add to the directory and never take away what other hosts need. The dependency wheels here are
stand-ins with real names (the script goes by names, and a present wheel is not downloaded
again); the handyproxy wheel is really built from this checkout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-wheelhouse.sh"
UVLOOP = "uvloop-{version}-cp{py}-cp{py}-manylinux_2_17_{arch}.manylinux2014_{arch}.whl"


def build(out: Path, requirements: Path, pythons: str, arches: str) -> str:
    env = {
        **os.environ,
        "WHEELHOUSE_DIR": str(out),
        "PYTHON": sys.executable,
        "REQUIREMENTS": str(requirements),
        "TARGET_PYTHON_VERSIONS": pythons,
        "TARGET_ARCHES": arches,
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def manifest(out: Path) -> dict[str, str]:
    lines = (out / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


def test_building_for_another_python_keeps_the_others_and_the_manifest_holds(tmp_path):
    out = tmp_path / "wheelhouse"
    out.mkdir()
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# runtime pins\nuvloop==0.23.0\n")
    fleet = {
        UVLOOP.format(version="0.23.0", py=py, arch=arch)
        for py in ("311", "313")
        for arch in ("x86_64", "aarch64")
    }
    for name in fleet:
        (out / name).write_bytes(name.encode())
    old = UVLOOP.format(version="0.19.0", py="311", arch="x86_64")
    (out / old).write_bytes(b"old pin")

    log = build(out, requirements, "3.11 3.13", "x86_64 aarch64")

    assert "downloaded" not in log  # every pinned wheel was there already
    assert not (out / old).exists(), "a wheel of an earlier pin stayed"
    (handyproxy,) = [p.name for p in out.glob("handyproxy-*-py3-none-any.whl")]
    wheels = {p.name for p in out.glob("*.whl")}
    assert wheels == fleet | {handyproxy}
    sums = manifest(out)
    assert set(sums) == wheels
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    before = (out / "SHA256SUMS").read_bytes(), (out / handyproxy).read_bytes()

    # A build for Debian 13 arm64 routers alone: the 3.11 and x86_64 wheels stay.
    log = build(out, requirements, "3.13", "aarch64")

    assert {p.name for p in out.glob("*.whl")} == wheels
    assert ((out / "SHA256SUMS").read_bytes(), (out / handyproxy).read_bytes()) == before
    assert f"{handyproxy} is up to date" in log
