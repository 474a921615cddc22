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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit.waiting import wait_until
from kit.wire import echo_works

from handyproxy.lab.netns import ORIGIN_V4

pytestmark = pytest.mark.integration

LOADCLIENT = Path(__file__).with_name("loadclient.py")
TUNNELS = 20_000
CLIENT_PROCS = 2
UPSTREAM_PROCS = 2
WORKERS = 4
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
WIDE_PORTS = "net.ipv4.ip_local_port_range=10000 65000"
#: How long CPU use and log lines are measured while nothing should happen (a window, not a
#: wait: the figures are rates over it).
QUIET_WINDOW = 3.0
IDLE_WINDOW = 2.0


def established(lab, ns: str) -> int:
    """The kernel's count of established TCP sockets in ``ns``."""
    out = lab.run(
        ns, ["ss", "-Htn", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


class Clients:
    """Client connections that each sent ``hi`` to an echoing upstream, and what each has seen:
    ``echo`` (the tunnel works), ``waiting``, ``reset``, ``eof`` or ``other``."""

    def __init__(self, lab, count: int, first_port: int) -> None:
        self.seen: dict[socket.socket, str] = {}
        try:
            for i in range(count):  # to a port of its own each: one record per client
                sock = lab.connect("client", ORIGIN_V4, first_port + i)
                self.seen[sock] = "waiting"
                sock.sendall(b"hi")
                sock.setblocking(False)  # poll() looks without waiting
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self) -> dict[socket.socket, str]:
        """Look, without waiting, at every connection still waiting; returns all outcomes."""
        for sock, how in self.seen.items():
            if how == "waiting" and sock.fileno() >= 0:
                self.seen[sock] = outcome(sock)
        return self.seen

    def count(self, how: str, among: list[socket.socket] | None = None) -> int:
        seen = self.poll()
        return sum(seen[sock] == how for sock in (among if among is not None else seen))

    def close(self, socks: list[socket.socket] | None = None) -> None:
        for sock in socks if socks is not None else list(self.seen):
            sock.close()


def outcome(sock: socket.socket) -> str:
    """What has arrived on the non-blocking ``sock`` so far; ``waiting`` when nothing has."""
    try:
        data = sock.recv(10)
    except BlockingIOError:
        return "waiting"
    except ConnectionResetError:
        return "reset"
    return {b"hi": "echo", b"": "eof"}.get(data, "other")


def settled(fwd, upstream, clients: Clients, baseline: int) -> bool:
    """Every tunnel the forwarder took on is set up and carrying bytes, and no more are coming:
    each open tunnel holds its two sockets and has reached the upstream, and as many clients as
    there are open tunnels have their echo. (With accepting paused nothing else changes.)"""
    open_tunnels = len(upstream.events("connect")) - len(fwd.records())
    sockets = fwd.fd_count() - baseline
    echoing = sum(1 for sock, how in clients.poll().items() if how == "echo" and sock.fileno() >= 0)
    return sockets == 2 * open_tunnels == 2 * echoing


@pytest.mark.slow
@pytest.mark.fresh_lab  # it widens the port range and leaves 40,000 sockets in TIME_WAIT
def test_20000_concurrent_tunnels_are_served_and_fully_released(
    lab, start_upstream, start_handyproxy
):
    for ns in ("client", "router"):
        lab.run(ns, ["sysctl", "-q", "-w", WIDE_PORTS], check=True)
    start_upstream("builtin", mode="echo", processes=UPSTREAM_PROCS, nofile=HARD_NOFILE, quiet=True)
    fwd = start_handyproxy(
        "-workers", str(WORKERS), "-log-level", "warning", nofile=HARD_NOFILE, port=8443
    )
    wait_until(lambda: fwd.serving_workers() == WORKERS, what="every worker serving")
    assert len(fwd.pids()) == WORKERS + 1
    baseline = fwd.fd_count()
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
            ORIGIN_V4,
            "--count",
            str(per_client),
            "--base-port",
            str(10000 + i * 1000),
            "--parallel",
            "200",
        ]
        clients.append(
            lab.spawn("client", argv, name=f"loadclient {i}", stdin=subprocess.PIPE, bufsize=1)
        )
    try:
        held = [
            json.loads(out.wait_for('"ev": "held"', timeout=100)[0].string) for _, out in clients
        ]
        setup_seconds = time.monotonic() - started
        ok = sum(h["ok"] for h in held)
        assert ok == TUNNELS, held
        sockets = fwd.fd_count()
        kernel = established(lab, "router")
        rss_held = fwd.rss_kib()
        cpu0 = fwd.cpu_seconds()
        time.sleep(IDLE_WINDOW)  # the window idle CPU is measured over
        idle_cpu = (fwd.cpu_seconds() - cpu0) / IDLE_WINDOW
        assert sockets - baseline == 2 * TUNNELS
        assert kernel == 2 * TUNNELS  # client side + upstream side, nothing else
        assert fwd.alive()
        for popen, _ in clients:
            popen.stdin.write("close\n")
            popen.stdin.flush()
        for _, out in clients:
            out.wait_for('"ev": "closed"', timeout=60)
        assert fwd.wait_fds(baseline, timeout=30) == baseline
        assert established(lab, "router") == 0
        sock = lab.connect("client", ORIGIN_V4, 9999)
        assert echo_works(sock)
        sock.close()
    finally:
        for popen, _ in clients:
            lab.stop(popen)
            popen.stdin.close()
    assert idle_cpu < 0.2, f"{idle_cpu:.0%} CPU with 20,000 idle tunnels"
    print(
        f"\n20000 tunnels: set up in {setup_seconds:.1f}s, forwarder sockets {sockets - baseline}, "
        f"kernel established {kernel}, RSS {rss_before} -> {rss_held} KiB "
        f"({(rss_held - rss_before) * 1024 / TUNNELS:.0f} B/tunnel), idle CPU {idle_cpu:.1%}"
    )


def test_low_descriptor_limit_slows_accepting_without_spinning(
    lab, start_upstream, start_handyproxy, relay
):
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-relay", relay, nofile=64)
    baseline = fwd.fd_count()
    with Clients(lab, 100, 6000) as clients:  # more clients than the forwarder has descriptors
        fwd.log.wait_for("out of file descriptors")
        wait_until(lambda: settled(fwd, upstream, clients, baseline), what="the saturated state")
        lines_before = len(fwd.log.lines)
        cpu0 = fwd.cpu_seconds()
        time.sleep(QUIET_WINDOW)  # the window CPU and log lines are measured over
        cpu_share = (fwd.cpu_seconds() - cpu0) / QUIET_WINDOW
        log_lines = len(fwd.log.lines) - lines_before
        seen = list(clients.poll().values())
    counts = {how: seen.count(how) for how in ("echo", "waiting", "reset", "eof", "other")}
    assert fwd.alive()
    assert cpu_share < 0.10, f"{cpu_share:.0%} CPU while saturated ({counts})"
    assert log_lines < 20, f"{log_lines} log lines in {QUIET_WINDOW:g} s while saturated"
    assert counts["other"] == counts["eof"] == 0, counts
    assert counts["reset"] == 0, f"clients over the limit must wait, not be reset: {counts}"
    assert counts["echo"] >= 10, f"open tunnels must work: {counts}"
    # Load drops: every client went away; a new one is served normally.
    fwd.wait_fds(baseline, timeout=15)
    sock = lab.connect("client", ORIGIN_V4, 80)
    assert echo_works(sock, b"after the storm")
    sock.close()
    assert fwd.wait_fds(baseline, timeout=10) == baseline
    print(f"\nnofile=64 relay={relay}: {counts}, CPU {cpu_share:.1%}, {log_lines} log lines/3s")


def test_waiting_clients_are_served_when_descriptors_free_up(lab, start_upstream, start_handyproxy):
    """Clients queued in the backlog while saturated get their tunnel once others close."""
    upstream = start_upstream("builtin", mode="echo")
    fwd = start_handyproxy("-relay", "copy", nofile=48)
    baseline = fwd.fd_count()
    with Clients(lab, 40, 6000) as clients:
        fwd.log.wait_for("out of file descriptors")
        wait_until(lambda: settled(fwd, upstream, clients, baseline), what="the saturated state")
        first = dict(clients.poll())
        served = [s for s, how in first.items() if how == "echo"]
        waiting = [s for s, how in first.items() if how == "waiting"]
        assert served, f"no tunnel opened at all: {first.values()}"
        assert "eof" not in first.values()
        clients.close(served)
        expected = min(len(served), len(waiting))
        # the freed descriptors let the backlog in, one waiting client per tunnel that closed
        wait_until(
            lambda: (
                clients.count("echo", waiting) >= expected
                and settled(fwd, upstream, clients, baseline)
            ),
            what=f"{expected} waiting clients served",
        )
        later = [clients.seen[sock] for sock in waiting]
    # Each freed tunnel's descriptors let exactly one waiting client in; nobody is reset and
    # nobody gets a silent clean close.
    assert "reset" not in first.values(), list(first.values())
    assert "eof" not in later and "other" not in later and "reset" not in later, later
    assert later.count("echo") == expected, later
    assert fwd.alive()
    print(f"\nnofile=48: first {list(first.values())}, after release {later}")
