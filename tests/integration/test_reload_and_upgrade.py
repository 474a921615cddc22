"""Reload and upgrade under load, and a worker killed mid-download: 100 downloads held open and a
client opening a tunnel every 10 ms while the forwarder reloads a changed upstream or re-executes
itself on other code. Nothing is refused, nothing truncated (each download's sha256 is
checked), new tunnels take the new upstream or run on the new code; a broken file on reload
keeps the running config; a killed worker's clients see resets, never a clean end, and the
master starts another after its backoff."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.client import Client
from kit.downloads import Download, Downloads
from kit.forwarder import HANDYPROXY, Forwarder
from kit.origins import INDEX, ORIGIN_NAME
from kit.records import fields
from kit.ticker import Attempt, Ticker
from kit.waiting import wait_until
from kit.wire import sha256_file

import handyproxy
from handyproxy.address import authority
from handyproxy.lab.netns import CLIENT_V4, ORIGIN_V4, UPSTREAM_V4, Lab

pytestmark = pytest.mark.integration

FIRST = authority(UPSTREAM_V4, 3128)
SECOND = authority(UPSTREAM_V4, 3131)
WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: an AF_UNIX socket path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="hp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ask(control: Path, verb: str = "reload") -> subprocess.CompletedProcess[str]:
    """``handyproxy -reload``, as systemd's ExecReload= runs it."""
    argv = [*HANDYPROXY, f"-{verb}", "-control-socket", str(control)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def upstream_of(forwarder: Forwarder, attempts: list[Attempt], lines: list[str]) -> set[str]:
    """The upstreams that served these ticker attempts, from their access records among
    ``lines`` (a slice of the log: client ports are reused, so the slice says when)."""
    ports = {a.port for a in attempts}
    found = set()
    for line in lines:
        if "tunnel end " in line:
            record = fields(line)
            host, _, port = record["client"].rpartition(":")
            if host == CLIENT_V4 and int(port) in ports:
                found.add(record["upstream"])
    return found


def downloads_ended(forwarder: Forwarder) -> int:
    """Access records of tunnels that carried a download (more than a megabyte down)."""
    return sum(1 for r in forwarder.records() if int(r.get("down", 0)) > 1 << 20)


def assert_whole(results: list[Download], body, count: int) -> None:
    assert len(results) == count
    broken = [d for d in results if not d.whole(body.sha256, body.path.stat().st_size)]
    assert broken == []


@WORKERS
def test_reload_with_a_changed_upstream_refuses_and_truncates_nothing(
    lab: Lab, body, short_dir: Path, start_origin, start_upstream, start_handyproxy, workers
):
    start_origin("http")
    start_upstream("builtin")
    start_upstream("builtin", port=3131)
    config = short_dir / "hp.toml"
    config.write_text(f'upstream_proxy = "{FIRST}"\n')
    control = short_dir / "ctl"
    fwd = start_handyproxy(
        "-config", str(config), upstream_proxy=None, workers=workers, control_socket=control
    )
    with (
        Downloads(lab, ORIGIN_V4, name=ORIGIN_NAME) as downloads,
        Ticker(lab, ORIGIN_V4, name=ORIGIN_NAME, expect=INDEX, interval=0.01) as ticker,
    ):
        before = ticker.wait_attempts(20, after=time.time())
        config.write_text(f'upstream_proxy = "{SECOND}"\n')
        logged_before = list(fwd.log.lines)
        answer = ask(control)
        assert answer.returncode == 0, answer.stderr
        assert "reload done" in answer.stdout
        fwd.log.wait_for("reload done")
        done = next(i for i, line in enumerate(fwd.log.lines) if "reload done" in line)
        after = ticker.wait_attempts(50, after=time.time())
        assert downloads_ended(fwd) == 0  # all 100 were open across the reload
        results = downloads.finish()
        attempts = ticker.stop()
    assert_whole(results, body, 100)
    assert [a for a in attempts if a.error] == []
    assert upstream_of(fwd, before, logged_before) == {FIRST}
    assert upstream_of(fwd, after, fwd.log.lines[done:]) == {SECOND}
    assert "Traceback" not in fwd.log.text()


@WORKERS
def test_upgrade_to_other_code_refuses_and_truncates_nothing(
    lab: Lab, body, short_dir: Path, start_origin, start_upstream, start_handyproxy, workers
):
    """The code is a copy of the package on PYTHONPATH; bumping its version and then asking
    (SIGUSR2 with one worker, a reload that notices the changed code with two) re-executes
    the master on it."""
    start_origin("http")
    start_upstream("builtin")
    package = short_dir / "code" / "handyproxy"
    shutil.copytree(
        Path(handyproxy.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__")
    )
    control = short_dir / "ctl"
    fwd = start_handyproxy(
        workers=workers,
        control_socket=control,
        drain_timeout="60s",
        env={"PYTHONPATH": str(package.parent)},
        cwd=str(short_dir),
    )
    assert ask(control, "status").stdout.startswith(
        f"handyproxy: ok handyproxy {handyproxy.__version__}:"
    )
    old = set(fwd.pids()[1:])
    init = package / "__init__.py"
    init.write_text(init.read_text().replace(handyproxy.__version__, "99.0.0"))
    with (
        Downloads(lab, ORIGIN_V4, name=ORIGIN_NAME) as downloads,
        Ticker(lab, ORIGIN_V4, name=ORIGIN_NAME, expect=INDEX, interval=0.01) as ticker,
    ):
        ticker.wait_attempts(20, after=time.time())
        if workers == 1:
            os.kill(fwd.pid, signal.SIGUSR2)
            fwd.log.wait_for(r"upgrade done version=99\.0\.0", 60)
        else:
            answer = ask(control)
            assert answer.returncode == 0, answer.stderr
            assert "upgrade done" in answer.stdout
        assert ask(control, "status").stdout.startswith("handyproxy: ok handyproxy 99.0.0:")
        fwd.log.wait_for(r"stopping: no new connections", count=workers)  # the old ones
        after = ticker.wait_attempts(50, after=time.time())
        assert downloads_ended(fwd) == 0  # the old workers still carry them
        results = downloads.finish()
        attempts = ticker.stop()
    assert fwd.pid in fwd.pids()  # the same process, re-executed
    fwd.log.wait_for(r"worker exited .*status=\"exit 0\"", 60, count=workers)
    new = set(fwd.pids()[1:])
    assert len(new) == workers and not new & old
    assert_whole(results, body, 100)
    assert [a for a in attempts if a.error] == []
    assert len(after) == 50
    assert "Traceback" not in fwd.log.text()


def test_a_broken_config_on_reload_is_reported_and_the_running_one_stays(
    lab: Lab, client: Client, body, short_dir: Path, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    start_upstream("builtin")
    config = short_dir / "hp.toml"
    config.write_text(f'upstream_proxy = "{FIRST}"\n')
    control = short_dir / "ctl"
    fwd = start_handyproxy("-config", str(config), upstream_proxy=None, control_socket=control)
    config.write_text(f'upstream_proxy = "{FIRST}"\ndial_timeout = "3"\n')
    answer = ask(control)
    assert answer.returncode == 1
    assert "dial_timeout: missing unit" in answer.stderr
    fwd.log.wait_for(
        r'ERROR handyproxy: reload failed; the running config stays field="\S+: dial_timeout"'
    )
    assert len(fwd.log.matching(" ERROR ")) == 1  # once, with the field and the reason
    os.kill(fwd.pid, signal.SIGHUP)  # the same by signal: logged, never fatal
    fwd.log.wait_for(r"reload failed; the running config stays", count=2)
    result, out = client.curl(f"http://{ORIGIN_V4}/body.bin", 4)
    assert result.returncode == 0, result.stderr
    assert sha256_file(out) == body.sha256
    assert sha256_file(out) == body.sha256
    assert fwd.alive()


@WORKERS
def test_a_killed_worker_resets_its_clients_and_is_started_again(
    lab: Lab, client: Client, body, start_origin, start_upstream, start_handyproxy, workers
):
    start_origin("http")
    start_upstream("builtin")
    fwd = start_handyproxy(workers=workers)
    victim = fwd.pids()[1]
    with Downloads(lab, ORIGIN_V4, name=ORIGIN_NAME, count=40) as downloads:
        os.kill(victim, signal.SIGKILL)
        fwd.log.wait_for(
            rf'worker died; starting another pid={victim} status="signal SIGKILL" restart_in=0\.5s'
        )
        results = downloads.finish()
    size = body.path.stat().st_size
    reset = [d for d in results if d.end == "reset"]
    assert [d for d in results if d not in reset and not d.whole(body.sha256, size)] == []
    assert reset  # the killed worker's clients: never a clean end after part of the body
    if workers == 1:
        assert len(reset) == len(results)
    wait_until(
        lambda: fwd.serving_workers() == workers and victim not in fwd.pids(), 15, "a new worker"
    )
    result, out = client.curl(f"http://{ORIGIN_V4}/body.bin", 4)
    assert result.returncode == 0, result.stderr
    assert sha256_file(out) == body.sha256
