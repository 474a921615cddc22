"""Process-level behaviour on the real path: several workers on one port, JSON records, and a
SIGTERM that lets an open tunnel finish before the process exits 0."""

from __future__ import annotations

import json
import signal

import pytest
from kit.client import Client, host_of
from kit.origins import Body
from kit.wire import recv_all, recv_until, sha256_file

pytestmark = pytest.mark.integration


def test_workers_share_the_port_and_all_serve(
    body: Body, client: Client, start_origin, start_upstream, start_handyproxy, lab
):
    start_origin("http")
    start_upstream("builtin")
    forwarder = start_handyproxy(workers=3)

    for _ in range(12):
        result, out = client.curl(f"http://{host_of(4)}/body.bin", 4)
        assert result.returncode == 0, result.stderr
        assert sha256_file(out) == body.sha256

    children = lab.run(
        "router", ["pgrep", "-P", str(forwarder.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 3
    forwarder.log.wait_for(r"tunnel end .*end=eof", count=12)
    forwarder.proc.send_signal(signal.SIGTERM)
    assert forwarder.proc.wait(timeout=10) == 0


def test_json_log_records_carry_the_access_fields(
    client: Client, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    start_upstream("builtin")
    forwarder = start_handyproxy(log_format="json")

    result, _ = client.curl(f"http://{host_of(6)}/index.html", 6)
    assert result.returncode == 0, result.stderr

    line = forwarder.log.wait_for(r'"message": "tunnel end"')[0].string
    record = json.loads(line)
    assert record["logger"] == "handyproxy.access"
    assert record["dst"] == f"{host_of(6)}:80"
    assert record["status"] == 200
    assert record["end"] == "eof"
    assert record["down"] > 0
    assert json.loads(forwarder.log.wait_for(r'"message": "listening on')[0].string)["level"]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])
def test_sigterm_refuses_new_clients_lets_an_open_tunnel_finish_then_exits_zero(
    client: Client, start_origin, start_upstream, start_handyproxy, workers: int
):
    """Once "stopping" is logged, the port is closed in every process (a -workers parent
    included): a new client gets a refusal at once, not a queue slot and a later reset."""
    origin = start_origin("banner")
    start_upstream("builtin")
    forwarder = start_handyproxy(drain_timeout="10s", workers=workers)

    with client.connect(4, origin.port) as sock:
        assert recv_until(sock, b"\r\n") == b"220 origin.test banner\r\n"
        forwarder.proc.send_signal(signal.SIGTERM)
        forwarder.log.wait_for("stopping: no new connections", count=workers)
        with pytest.raises(ConnectionRefusedError):
            client.connect(4, origin.port).close()
        sock.sendall(b"QUIT\r\n")  # the tunnel opened before SIGTERM still carries bytes
        assert recv_all(sock) == b"221 bye\r\n"

    assert forwarder.proc.wait(timeout=10) == 0
    assert "end=eof" in forwarder.access(f"dst={host_of(4)}:{origin.port} ")


def test_sigterm_resets_tunnels_still_open_after_the_drain_timeout(
    client: Client, start_origin, start_upstream, start_handyproxy
):
    origin = start_origin("banner")
    start_upstream("builtin")
    forwarder = start_handyproxy(drain_timeout="1s")

    with client.connect(4, origin.port) as sock:
        assert recv_until(sock, b"\r\n") == b"220 origin.test banner\r\n"
        forwarder.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            sock.settimeout(10)
            sock.recv(100)

    assert forwarder.proc.wait(timeout=10) == 0
    assert "end=shutdown" in forwarder.access(f"dst={host_of(4)}:{origin.port} ")


def test_a_port_already_in_use_exits_3_with_the_reason(start_handyproxy, lab):
    forwarder = start_handyproxy()
    proc = lab.run(
        "router",
        [*forwarder.argv[:3], "-local-port", str(forwarder.port)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 3
    assert "Address already in use" in proc.stderr
