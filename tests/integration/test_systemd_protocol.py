"""The forwarder speaks systemd's protocols for real: READY/STATUS/STOPPING datagrams on a
NOTIFY_SOCKET, and a listening socket handed over as fd 3 with LISTEN_FDS (socket activation),
as systemd would do, with the service started in the router namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from kit.client import Client, host_of
from kit.notify import NotifySocket
from kit.wire import sha256_file

from handyproxy.lab import netns as lablib
from handyproxy.lab.output import Output

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
    lab: lablib.Lab, client: Client, body, start_origin, start_upstream
):
    start_origin("http")
    start_upstream("builtin")
    notify = NotifySocket()
    env = {**os.environ, **notify.env}
    upstream = f"{lablib.UPSTREAM_V4}:{lablib.PROXY_PORT}"
    argv = [sys.executable, "-c", LAUNCHER, "-local-port", "1", "-upstream-proxy", upstream]
    proc = lab.popen(
        "router", argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        log = Output(proc.stderr, name="handyproxy")
        try:
            notify.messages.wait_for("^READY=1$")
        except TimeoutError:
            pytest.fail(f"no READY=1 within 10s; log:\n{log.text()}")
        assert notify.messages.lines[0] == "READY=1"  # the first line of the first message
        log.wait_for(rf"listening on \[::\]:{port} ")  # the inherited socket, not -local-port 1
        lab.redirect(port)

        result, out = client.curl(f"http://{host_of(4)}/body.bin", 4)
        assert result.returncode == 0, result.stderr
        assert sha256_file(out) == body.sha256

        notify.messages.wait_for(r"^STATUS=[01] tunnels open$")
        proc.send_signal(signal.SIGTERM)
        notify.messages.wait_for("^STOPPING=1$")
        assert proc.wait(timeout=10) == 0
    finally:
        lab.unredirect()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        notify.close()
