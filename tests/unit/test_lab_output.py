"""Waiting for a process's line (handyproxy.lab.output): at once when it is there, at once with
the output when the process ended without it, and views that see only later lines."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from handyproxy.lab.output import Output

SCRIPT = "import sys\nfor line in sys.argv[1:]:\n    print(line, flush=True)\n"


def run(*lines: str) -> tuple[subprocess.Popen[str], Output]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *lines], stdout=subprocess.PIPE, text=True
    )
    return proc, Output(proc.stdout, name="script")


def test_wait_for_returns_the_matches_as_the_lines_arrive():
    proc, out = run("listening on [::]:80", "tunnel end a", "tunnel end b")
    matches = out.wait_for(r"tunnel end (\w)", timeout=10, count=2)
    proc.wait()
    assert [m.group(1) for m in matches] == ["a", "b"]


def test_a_line_that_never_comes_fails_as_soon_as_the_process_ends():
    proc, out = run("one", "two")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)0 of 1 lines wanted \(the process ended\).*two"):
        out.wait_for("three", timeout=30)
    assert time.monotonic() - started < 10
    proc.wait()


def test_a_view_and_since_count_only_later_lines():
    proc, out = run("first", "second")
    out.wait_for("second")
    proc.wait()
    view = out.view()
    assert view.lines == [] and out.lines == ["first", "second"]
    assert out.wait_for("s", since=1)[0].string == "second"
    with pytest.raises(TimeoutError):
        view.wait_for("first", timeout=1)
