"""Exhaustion: 20,000 tunnels at once, and more clients than descriptors under a low limit.

Promises: the process neither dies nor spins, tunnels it opened keep working, and it serves
normally (descriptors back at their idle count) once the load is gone.

Descriptor arithmetic for 20,000 tunnels: the forwarder holds two sockets per tunnel, 40,000 in
all, but this machine's hard RLIMIT_NOFILE is 20,000 per process and cannot be raised (no
CAP_SYS_RESOURCE). So the forwarder runs with ``-workers 4`` (SO_REUSEPORT, ~10,000 sockets
each) and the client and echo upstream run as several processes too; every process gets the
hard limit with prlimit. This is also how a large deployment would run it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import ORIGIN, UPSTREAM, Proc, echo_works, settle_fds

pytestmark = pytest.mark.integration

LOADCLIENT = Path(__file__).with_name("loadclient.py")
TUNNELS = 20_000
CLIENT_PROCS = 2
UPSTREAM_PROCS = 2
WORKERS = 4
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
WIDE_PORTS = "net.ipv4.ip_local_port_range=10000 65000"


def established(lab, ns: str) -> int:
    """The kernel's count of established TCP sockets in ``ns``."""
    out = lab.run(
        ns, ["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


@pytest.mark.slow
def test_20000_concurrent_tunnels_are_served_and_fully_released(lab, start_fake, start_forwarder):
    for ns in ("client", "router"):
        lab.run(ns, ["sysctl", "-q", "-w", WIDE_PORTS], check=True)
    for _ in range(UPSTREAM_PROCS):
        start_fake(
            "upstream", mode="echo", reuseport=True, nofile=HARD_NOFILE, listen=[f"{UPSTREAM}:3128"]
        )
    fwd = start_forwarder(
        "-workers", str(WORKERS), "-log-level", "warning", nofile=HARD_NOFILE, port=8443
    )
    time.sleep(1.0)
    assert len(fwd.pids()) == WORKERS + 1
    baseline = settle_fds(fwd)
    rss_before = fwd.rss_kib()
    per_client = TUNNELS // CLIENT_PROCS
    clients = []
    started = time.monotonic()
    for i in range(CLIENT_PROCS):
        argv = [
            "prlimit",
            f"--nofile={HARD_NOFILE}:{HARD_NOFILE}",
            "--",
            sys.executable,
            str(LOADCLIENT),
            "--host",
            ORIGIN,
            "--count",
            str(per_client),
            "--base-port",
            str(10000 + i * 1000),
            "--parallel",
            "200",
        ]
        popen = lab.popen(
            "client",
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        clients.append(Proc(popen, f"loadclient {i}"))
    try:
        held = [json.loads(c.wait_line('"ev": "held"', timeout=100)) for c in clients]
        setup_seconds = time.monotonic() - started
        ok = sum(h["ok"] for h in held)
        assert ok == TUNNELS, held
        sockets = fwd.fd_count()
        kernel = established(lab, "router")
        rss_held = fwd.rss_kib()
        cpu0 = fwd.cpu_seconds()
        time.sleep(2.0)
        idle_cpu = (fwd.cpu_seconds() - cpu0) / 2.0
        assert sockets - baseline == 2 * TUNNELS
        assert kernel == 2 * TUNNELS  # client side + upstream side, nothing else
        assert fwd.alive()
        for c in clients:
            c.popen.stdin.write("close\n")
            c.popen.stdin.flush()
        for c in clients:
            c.wait_line('"ev": "closed"', timeout=60)
        assert fwd.wait_fds(baseline, timeout=30) == baseline
        assert established(lab, "router") == 0
        sock = lab.connect("client", ORIGIN, 9999)
        assert echo_works(sock)
        sock.close()
    finally:
        for c in clients:
            lab.stop(c.popen)
            c.popen.stdin.close()
    assert idle_cpu < 0.2, f"{idle_cpu:.0%} CPU with 20,000 idle tunnels"
    print(
        f"\n20000 tunnels: set up in {setup_seconds:.1f}s, forwarder sockets {sockets - baseline}, "
        f"kernel established {kernel}, RSS {rss_before} -> {rss_held} KiB "
        f"({(rss_held - rss_before) * 1024 / TUNNELS:.0f} B/tunnel), idle CPU {idle_cpu:.1%}"
    )


@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_low_descriptor_limit_slows_accepting_without_spinning(
    lab, start_fake, start_forwarder, relay
):
    start_fake("upstream", mode="echo")
    fwd = start_forwarder("-relay", relay, nofile=64)
    baseline = settle_fds(fwd)
    socks = []
    for i in range(100):  # more clients than the forwarder has descriptors
        sock = lab.connect("client", ORIGIN, 6000 + i)
        sock.sendall(b"hi")
        socks.append(sock)
    time.sleep(1.5)
    lines_before = len(fwd.lines)
    cpu0 = fwd.cpu_seconds()
    time.sleep(3.0)
    cpu_share = (fwd.cpu_seconds() - cpu0) / 3.0
    log_lines = len(fwd.lines) - lines_before
    seen = [outcome(sock, 0.05) for sock in socks]
    counts = {how: seen.count(how) for how in ("echo", "waiting", "reset", "eof", "other")}
    assert fwd.alive()
    fwd.wait_line("out of file descriptors", timeout=1)
    assert cpu_share < 0.10, f"{cpu_share:.0%} CPU while saturated ({counts})"
    assert log_lines < 20, f"{log_lines} log lines in 3 s while saturated"
    assert counts["other"] == counts["eof"] == 0, counts
    assert counts["reset"] == 0, f"clients over the limit must wait, not be reset: {counts}"
    assert counts["echo"] >= 10, f"open tunnels must work: {counts}"
    # Load drops: every client goes away; a new one is served normally.
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 15
    while fwd.fd_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    sock = lab.connect("client", ORIGIN, 80)
    assert echo_works(sock, b"after the storm")
    sock.close()
    assert fwd.wait_fds(baseline, timeout=10) == baseline
    print(f"\nnofile=64 relay={relay}: {counts}, CPU {cpu_share:.1%}, {log_lines} log lines/3s")


def test_waiting_clients_are_served_when_descriptors_free_up(lab, start_fake, start_forwarder):
    """Clients queued in the backlog while saturated get their tunnel once others close."""
    start_fake("upstream", mode="echo")
    fwd = start_forwarder("-relay", "copy", nofile=48)
    settle_fds(fwd)
    socks = []
    for i in range(40):
        sock = lab.connect("client", ORIGIN, 6000 + i)
        sock.sendall(b"hi")
        socks.append(sock)
    time.sleep(1.0)
    first = {sock: outcome(sock, 0.2) for sock in socks}
    served = [s for s, how in first.items() if how == "echo"]
    waiting = [s for s, how in first.items() if how == "waiting"]
    assert served, f"no tunnel opened at all: {first.values()}"
    assert "eof" not in first.values()
    for sock in served:
        sock.close()
    time.sleep(3.0)  # the freed descriptors let the backlog in
    later = [outcome(sock, 0.2) for sock in waiting]
    for sock in socks:
        sock.close()
    # Each freed tunnel's descriptors let exactly one waiting client in; nobody is reset and
    # nobody gets a silent clean close.
    assert "reset" not in first.values(), list(first.values())
    assert "eof" not in later and "other" not in later and "reset" not in later, later
    assert later.count("echo") == min(len(served), len(waiting)), later
    assert fwd.alive()
    print(f"\nnofile=48: first {list(first.values())}, after release {later}")


def outcome(sock, timeout: float) -> str:
    """``echo`` (the tunnel works), ``waiting``, ``reset``, ``eof`` or ``other``."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(10)
    except TimeoutError:
        return "waiting"
    except ConnectionResetError:
        return "reset"
    return {b"hi": "echo", b"": "eof"}.get(data, "other")
