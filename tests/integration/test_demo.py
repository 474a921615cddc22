"""``handyproxy demo`` is the README's first command: it must work and leave nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from handyproxy.lab import demo
from handyproxy.lab.output import Output

pytestmark = pytest.mark.integration


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def lab_namespaces(output: str) -> list[str]:
    match = re.search(r"namespaces: (.*)", output)
    assert match, output
    return match.group(1).split(", ")


def test_demo_prints_the_origins_response_and_exits_zero():
    proc = subprocess.run(
        [sys.executable, "-m", "handyproxy", "demo"], capture_output=True, text=True, timeout=60
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count(f"client     | {demo.GREETING}") == 2  # IPv4 and IPv6
    assert "origin     | " in out and '"GET / HTTP/1.1" 200' in out
    assert re.search(r"upstream   \| .*CONNECT 198\.18\.0\.2:80 .*status=200", out)
    assert re.search(r"upstream   \| .*CONNECT \[2001:db8:18::2\]:80 .*status=200", out)
    assert re.search(r"router     \| .*tunnel end .*dst=198\.18\.0\.2:80 .*status=200", out)
    left = [ns for ns in lab_namespaces(out) if ns in namespaces().split()]
    assert not left, f"the demo left namespaces behind: {left}"


def test_demo_removes_its_lab_on_ctrl_c():
    # SIGINT back to its default in the demo: a test run started in the background by a shell
    # without job control (`cmd &` in a script) inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt, so Ctrl-C would not reach the demo at all.
    proc = subprocess.Popen(
        [sys.executable, "-m", "handyproxy", "demo", "--keep"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    log = Output(proc.stdout, name="handyproxy demo")
    try:
        log.wait_for("The lab stays up", timeout=60)
        names = lab_namespaces(log.text())
        assert all(ns in namespaces().split() for ns in names)
        proc.send_signal(signal.SIGINT)
        # Not a speed check: what counts is that Ctrl-C ends the demo and leaves nothing behind.
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not end within 60 s of Ctrl-C:\n{log.text()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode in (0, 130), log.text()
    left = [ns for ns in names if ns in namespaces().split()]
    assert not left, f"Ctrl-C left namespaces behind: {left}"
