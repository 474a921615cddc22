"""The forwarder speaks systemd's protocols for real: READY/STATUS/STOPPING datagrams on a
NOTIFY_SOCKET, and a listening socket handed over as fd 3 with LISTEN_FDS (socket activation),
as systemd would do, with the service started in the router namespace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pathkit import PROXY_PORT, Client, ProcessLog, host_of, sha256_file

from handyproxy.lab import netns as lablib

pytestmark = pytest.mark.integration

LAUNCHER = """
import os, socket, sys
sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.bind(("::", 0))
sock.listen(16)
print(sock.getsockname()[1], flush=True)
if sock.fileno() == 3:
    os.set_inheritable(3, True)
else:
    os.dup2(sock.fileno(), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "handyproxy", *sys.argv[1:]])
"""


def test_socket_activation_and_notify_messages(
    tmp_path: Path, lab: lablib.Lab, client: Client, body, start_origin, start_upstream
):
    start_origin("http")
    start_upstream("builtin")
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    upstream = f"{lablib.UPSTREAM_V4}:{PROXY_PORT}"
    argv = [sys.executable, "-c", LAUNCHER, "-local-port", "1", "-upstream-proxy", upstream]
    proc = lab.popen(
        "router", argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        log = ProcessLog(proc.stderr)
        try:
            first = notify.recv(4096)
        except TimeoutError:
            pytest.fail(f"no READY=1 within 10s; log:\n{log.text()}")
        assert first.split(b"\n")[0] == b"READY=1"
        log.wait_for(rf"listening on \[::\]:{port} ")  # the inherited socket, not -local-port 1
        lab.redirect(port)

        result, out = client.curl(f"http://{host_of(4)}/body.bin", 4)
        assert result.returncode == 0, result.stderr
        assert sha256_file(out) == body.sha256

        messages = b""
        while b"STATUS=1 tunnels open" not in messages and b"STATUS=0 tunnels open" not in messages:
            messages += notify.recv(4096) + b"\n"
        proc.send_signal(signal.SIGTERM)
        while b"STOPPING=1" not in messages:
            messages += notify.recv(4096) + b"\n"
        assert proc.wait(timeout=10) == 0
    finally:
        lab.unredirect()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        notify.close()
