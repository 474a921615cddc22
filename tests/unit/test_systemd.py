"""sd_notify and socket activation against a real notify socket and real inherited fds.

The datagrams must be exactly what systemd parses (``KEY=VALUE`` lines), every call must be a
harmless False outside systemd, and ``LISTEN_FDS`` must be honoured only for this process, as
sd_listen_fds(3) describes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator

import pytest

from handyproxy import systemd

SD_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under CI, which may itself be a systemd unit."""
    for name in SD_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound at a short path (sun_path is 108 bytes) named by NOTIFY_SOCKET."""
    with tempfile.TemporaryDirectory(prefix="hp-sd-") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock``."""
    out = [sock.recv(4096)]
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


@pytest.mark.parametrize(
    ("call", "datagram"),
    [
        (lambda: systemd.ready(), b"READY=1"),
        (
            lambda: systemd.ready("listening on [::]:8443"),
            b"READY=1\nSTATUS=listening on [::]:8443",
        ),
        (lambda: systemd.status("3 tunnels open"), b"STATUS=3 tunnels open"),
        (lambda: systemd.stopping(), b"STOPPING=1"),
        (lambda: systemd.stopping("draining 2 tunnels"), b"STOPPING=1\nSTATUS=draining 2 tunnels"),
        (lambda: systemd.watchdog(), b"WATCHDOG=1"),
        (lambda: systemd.notify("READY=1", "MAINPID=42"), b"READY=1\nMAINPID=42"),
    ],
)
def test_each_call_sends_exactly_one_datagram(
    notify_socket: socket.socket, call: Callable[[], bool], datagram: bytes
) -> None:
    assert call() is True
    assert received(notify_socket) == [datagram]


def test_abstract_namespace_address_works(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hp-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    "call", [systemd.ready, systemd.stopping, systemd.watchdog, lambda: systemd.status("x")]
)
def test_without_notify_socket_every_call_is_false(call: Callable[[], bool]) -> None:
    assert call() is False


def test_empty_notify_socket_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.ready() is False


def test_notify_with_no_messages_sends_nothing(notify_socket: socket.socket) -> None:
    assert systemd.notify() is False
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)


@pytest.mark.parametrize(
    "address",
    [
        "/nonexistent/hp-notify",
        "relative-hp-notify",
        "/" + "x" * 200,
        "@hp-nobody-listens-" + uuid.uuid4().hex,
    ],
)
def test_a_broken_notify_socket_gives_false_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.ready() is False
    assert systemd.watchdog() is False


def test_a_stream_socket_at_the_notify_path_gives_false(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="hp-sd-") as tmp:
        path = os.path.join(tmp, "stream")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
            sock.listen()
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            assert systemd.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        (None, None, None),
        ("2000000", None, 1.0),
        ("30000000", "self", 15.0),
        ("500000", "self", 0.25),
        ("2000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("abc", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, interval: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + (0 if pid == "self" else 1)))
    assert systemd.watchdog_interval() == interval


def test_listen_fds_without_the_environment_is_empty() -> None:
    assert systemd.listen_fds() == []


def test_listen_fds_for_another_process_is_empty_and_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd.listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "2"


@pytest.mark.parametrize("count", ["0", "abc", ""])
def test_listen_fds_with_no_usable_count_is_empty(
    monkeypatch: pytest.MonkeyPatch, count: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    assert systemd.listen_fds() == []


CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from handyproxy import systemd

    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\\0hp-test-activation-" + str(os.getpid()))
    unix.listen()
    high = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in (tcp, unix)]
    expected = [tcp.getsockname(), unix.getsockname().decode()]
    tcp.close()
    unix.close()
    for target, fd in zip((3, 4), high):
        os.dup2(fd, target)
        os.close(fd)
    if sys.argv[1] == "own-pid":
        os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "2"
    os.environ["LISTEN_FDNAMES"] = "tcp:unix"
    socks = systemd.listen_fds()
    print(json.dumps({
        "fds": [s.fileno() for s in socks],
        "families": [int(s.family) for s in socks],
        "types": [int(s.type) for s in socks],
        "names": [s.getsockname() if s.family == socket.AF_INET else s.getsockname().decode()
                  for s in socks],
        "expected": expected,
        "inheritable": [os.get_inheritable(s.fileno()) for s in socks],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
    """
)


def run_child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SD_VARS}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_listen_fds_adopts_inherited_sockets_from_fd_3() -> None:
    out = run_child("own-pid")
    assert out["fds"] == [3, 4]
    assert out["families"] == [socket.AF_INET, socket.AF_UNIX]
    assert out["types"] == [socket.SOCK_STREAM, socket.SOCK_STREAM]
    assert out["names"] == out["expected"]
    assert out["inheritable"] == [False, False]
    assert out["env_left"] == []  # children of ours must not think the fds are theirs


def test_listen_fds_without_listen_pid_is_empty_as_in_sd_listen_fds() -> None:
    """libsystemd returns 0 when LISTEN_PID is unset: a stray LISTEN_FDS is not ours."""
    out = run_child("no-pid")
    assert out["fds"] == []
