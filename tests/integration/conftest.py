"""Fixtures for the integration tests: one namespace lab per session, and factories that start
the forwarder, an upstream proxy (Debian's squid or tinyproxy, or the built-in one) and origin
servers inside it, recording what they start and stopping it newest first.

The tests need root, iproute2, nftables, squid, tinyproxy, curl and openssl. CI runs as root with
all of them installed, so a missing piece fails the run instead of skipping it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from handyproxy import connect_proxy
from handyproxy import lab as lablib

PYTHON = sys.executable
#: The helpers (origins, built-in proxy) use only the standard library: ``-S`` skips the venv's
#: site setup, whose editable-install finder costs ~0.2 s per process start.
HELPER_PYTHON = [PYTHON, "-S"]
HERE = Path(__file__).resolve().parent
ORIGIN_NAME = "origin.test"
PROXY_PORT = 3128
#: an upstream that is down: the upstream host, a port where nothing listens
DOWN_UPSTREAM = f"{lablib.UPSTREAM_V4}:{PROXY_PORT + 1}"
ORIGIN_PORTS = {"http": 80, "https": 443, "banner": 25, "echo": 7}
BODY_SIZE = 3 * 1024 * 1024 + 12345  # not a multiple of any buffer size
START_TIMEOUT = 10.0
TOOLS = {
    "ip": "iproute2",
    "nft": "nftables",
    "squid": "squid",
    "tinyproxy": "tinyproxy",
    "curl": "curl",
    "openssl": "openssl",
}


class ProcessLog:
    """Collects a stream's lines in a thread so tests can wait for a line without blocking."""

    def __init__(self, stream: IO[str] | None = None, path: Path | None = None) -> None:
        self.lines: list[str] = []
        self.path = path
        self._offset = 0
        self._cond = threading.Condition()
        if stream is not None:
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # closed at EOF, when the process (and any child sharing it) is gone
            for raw in stream:
                with self._cond:
                    self.lines.append(raw.rstrip("\n"))
                    self._cond.notify_all()

    def _all(self) -> list[str]:
        if self.path is not None:
            with contextlib.suppress(OSError):
                return self.path.read_text(errors="replace").splitlines()
            return []
        return list(self.lines)

    def _current(self) -> list[str]:
        return self._all()[self._offset :]

    def view(self) -> ProcessLog:
        """The same log, showing only lines that arrive from now on (for a reused process)."""
        view = copy.copy(self)
        view._offset = len(self._all())
        return view

    def text(self) -> str:
        return "\n".join(self._current())

    def mark(self) -> int:
        """A position to pass as ``since``, so only later lines count."""
        return len(self._current())

    def wait_for(
        self, pattern: str, timeout: float = 5.0, count: int = 1, since: int = 0
    ) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern``; fails the test with the log on timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in self._current()[since:] if (m := regex.search(line))]
            if len(found) >= count:
                return found[:count]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern!r} within {timeout}s; log:\n{self.text()}")
            with self._cond:
                self._cond.wait(min(remaining, 0.05))

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self._current() if regex.search(line)]


@dataclass
class Forwarder:
    """A running handyproxy in the router namespace."""

    proc: subprocess.Popen[str]
    log: ProcessLog
    port: int
    argv: list[str]

    def access(self, *needles: str, timeout: float = 5.0) -> str:
        """The first access record (``tunnel end ...``) that contains every one of ``needles``.

        Needles are plain text; end one with a space to match a whole field (``"status=200 "``).
        """
        lookahead = "".join(f"(?=.*{re.escape(needle)})" for needle in needles)
        return self.log.wait_for(rf"tunnel end {lookahead}", timeout)[0].string


@dataclass
class Upstream:
    """A running upstream proxy in the upstream namespace."""

    kind: str
    proc: subprocess.Popen[str]
    log: ProcessLog
    workdir: Path | None = None
    address: str = f"{lablib.UPSTREAM_V4}:{PROXY_PORT}"

    def view(self) -> Upstream:
        """This upstream for one more test: its log starts empty, the process is shared."""
        return dataclasses.replace(self, log=self.log.view())

    def stop(self, lab: lablib.Lab) -> None:
        if self.kind == "squid":
            self.proc.kill()  # its SIGTERM shutdown takes two seconds; nothing to save
        lab.stop(self.proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Origin:
    kind: str
    port: int
    proc: subprocess.Popen[str]
    log: ProcessLog


@dataclass
class Body:
    """The random file the HTTP(S) origins serve, and what it must hash to."""

    root: Path
    path: Path
    sha256: str
    size: int = field(default=BODY_SIZE)


#: the address the origin sees connections from (the upstream's side of their link)
SEEN_BY_ORIGIN = {4: lablib.UPSTREAM_ORIGIN_V4, 6: lablib.UPSTREAM_ORIGIN_V6}


def host_of(version: int, role: str = "origin") -> str:
    """The role's address as it goes in a URL (brackets for IPv6)."""
    address = lablib.ADDRESSES[version][role]
    return f"[{address}]" if version == 6 else address


def _missing() -> list[str]:
    missing = lablib.missing_requirements()
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None and tool not in ("ip", "nft"):
            missing.append(f"the {tool!r} command (Debian package {package})")
    return missing


@pytest.fixture(scope="session")
def lab() -> Iterator[lablib.Lab]:
    """One lab for the whole session; name resolution for ``origin.test`` in client and upstream."""
    missing = _missing()
    if missing:
        pytest.fail("integration tests need " + "; ".join(missing), pytrace=False)
    lablib.cleanup_stale()
    with lablib.Lab() as the_lab:
        names = {ORIGIN_NAME: [lablib.ORIGIN_V4, lablib.ORIGIN_V6]}
        the_lab.hosts("client", names)
        the_lab.hosts("upstream", names)
        yield the_lab


#: Parametrize ``family`` explicitly, as the decorator nearest the top, so it varies fastest and
#: consecutive tests share an upstream configuration (see ``start_upstream``).
each_family = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    """The IP version the client uses to reach the origin."""
    return int(request.param)


@pytest.fixture(scope="session")
def body(tmp_path_factory: pytest.TempPathFactory) -> Body:
    root = tmp_path_factory.mktemp("www")
    data = os.urandom(BODY_SIZE)
    path = root / "body.bin"
    path.write_bytes(data)
    (root / "index.html").write_text("origin index\n")
    return Body(root=root, path=path, sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for origin.test and both origin addresses."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj",
         f"/CN={ORIGIN_NAME}", "-addext",
         f"subjectAltName=DNS:{ORIGIN_NAME},IP:{lablib.ORIGIN_V4},IP:{lablib.ORIGIN_V6}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def _origins(
    lab: lablib.Lab, body: Body, tls_cert: tuple[Path, Path]
) -> Iterator[dict[str, Origin]]:
    """Origins are stateless, so each kind is started once and kept for the session."""
    started: dict[str, Origin] = {}
    yield started
    for origin in reversed(list(started.values())):
        lab.stop(origin.proc)


@pytest.fixture
def start_origin(
    lab: lablib.Lab, _origins: dict[str, Origin], body: Body, tls_cert: tuple[Path, Path]
) -> Callable[[str], Origin]:
    def start(kind: str) -> Origin:
        if kind in _origins and _origins[kind].proc.poll() is None:
            return _origins[kind]
        port = ORIGIN_PORTS[kind]
        cert, key = tls_cert
        argv = [*HELPER_PYTHON, str(HERE / "origin_server.py"), kind, "--port", str(port),
                "--root", str(body.root), "--cert", str(cert), "--key", str(key)]  # fmt: skip
        proc = lab.popen("origin", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        log = ProcessLog(proc.stdout)
        log.wait_for(rf"^ready {port}$", START_TIMEOUT)
        origin = Origin(kind, port, proc, log)
        _origins[kind] = origin
        return origin

    return start


def _flag_argv(flags: dict[str, Any]) -> list[str]:
    argv = []
    for name, value in flags.items():
        argv += [f"-{name.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture
def start_handyproxy(lab: lablib.Lab) -> Iterator[Callable[..., Forwarder]]:
    """Factory: run ``python -m handyproxy`` in the router namespace and REDIRECT to it.

    Keyword arguments are flags (``dial_timeout="1s"`` → ``-dial-timeout 1s``); ``redirect``
    picks the chain (``prerouting``, ``output`` or None), ``family`` and ``skip_uid`` go to
    ``Lab.redirect``. The port is the one the ``listening on`` line reports.
    """
    started: list[Forwarder] = []

    def start(
        *,
        redirect: str | None = "prerouting",
        family: str = "both",
        skip_uid: int | None = None,
        **flags: Any,
    ) -> Forwarder:
        options = {
            "local_port": 0,
            "upstream_proxy": f"{lablib.UPSTREAM_V4}:{PROXY_PORT}",
            "drain_timeout": "1s",
        }
        options.update(flags)
        argv = [PYTHON, "-m", "handyproxy", *_flag_argv(options)]
        proc = lab.popen("router", argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        log = ProcessLog(proc.stderr)
        match = log.wait_for(r"listening on \S+:(\d+)", START_TIMEOUT)[0]
        forwarder = Forwarder(proc, log, int(match.group(1)), argv)
        started.append(forwarder)
        if redirect:
            lab.redirect(forwarder.port, chain=redirect, family=family, skip_uid=skip_uid)
        return forwarder

    yield start
    with contextlib.suppress(lablib.LabError):
        lab.unredirect()
    for forwarder in reversed(started):
        lab.stop(forwarder.proc)
        # pytest shows a test's captured output only when it fails: then this log explains why
        print(f"--- handyproxy log ({' '.join(forwarder.argv[3:])}):\n{forwarder.log.text()}")


def _squid_conf(workdir: Path, allow_domains: list[str] | None, deny_all: bool) -> str:
    if deny_all:
        access = ["http_access deny all"]
    elif allow_domains is not None:
        # -n: match the name as given; never reverse-resolve an IP target into an allowed name
        access = [f"acl allowed dstdomain -n {' '.join(allow_domains)}",
                  "http_access allow CONNECT allowed", "http_access deny all"]  # fmt: skip
    else:
        access = ["http_access allow CONNECT", "http_access deny all"]
    return "\n".join([
        f"http_port {PROXY_PORT}",
        "visible_hostname upstream.lab",
        f"pid_filename {workdir}/squid.pid",
        f"cache_log {workdir}/cache.log",
        f"access_log stdio:{workdir}/access.log",
        f"coredump_dir {workdir}",
        "cache deny all",
        "hosts_file /etc/hosts",  # the lab's /etc/netns/<ns>/hosts under ip netns exec
        "dns_nameservers 127.0.0.1",
        "shutdown_lifetime 0 seconds",
        "netdb_filename none",
        "pinger_enable off",
        "logfile_rotate 0",
        "acl CONNECT method CONNECT",  # any port: no SSL_ports restriction
        *access,
    ]) + "\n"  # fmt: skip


def _tinyproxy_conf(workdir: Path, allow_domains: list[str] | None, deny_all: bool) -> str:
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {PROXY_PORT}",
        "Timeout 60",
        f'LogFile "{workdir}/tinyproxy.log"',
        "LogLevel Connect",
        f'PidFile "{workdir}/tinyproxy.pid"',
        "MaxClients 100",
        "DisableViaHeader Yes",
        # no ConnectPort line: CONNECT to every port is allowed
    ]
    if deny_all or allow_domains is not None:
        patterns = [] if deny_all else allow_domains or []
        (workdir / "filter").write_text(
            "".join(f"^{re.escape(name)}$\n" for name in patterns) or "^$\n"
        )
        lines += [f'Filter "{workdir}/filter"', "FilterDefaultDeny Yes", "FilterType ere"]
    return "\n".join(lines) + "\n"


@dataclass
class _UpstreamPool:
    """The one upstream that owns port 3128, kept across tests while they ask for the same one."""

    key: tuple[Any, ...] | None = None
    current: Upstream | None = None

    def stop(self, lab: lablib.Lab) -> None:
        if self.current is not None:
            self.current.stop(lab)
        self.key = self.current = None


@pytest.fixture(scope="session")
def _upstream_pool(lab: lablib.Lab) -> Iterator[_UpstreamPool]:
    pool = _UpstreamPool()
    yield pool
    pool.stop(lab)


@pytest.fixture
def start_upstream(
    lab: lablib.Lab, _upstream_pool: _UpstreamPool
) -> Iterator[Callable[..., Upstream]]:
    """Factory: an upstream proxy on port 3128 of the upstream namespace (IPv4 and IPv6).

    ``kind``: ``squid`` or ``tinyproxy`` (Debian's, with a temporary config, no daemon mode) or
    ``builtin`` (``handyproxy.connect_proxy``; ``reply_status``, ``no_reply``, ``greedy`` make it
    misbehave). ``allow_domains`` admits only those names (never an IP); ``deny_all`` answers 403.

    Starting a proxy costs more than most tests, so the last one keeps running until a test asks
    for a different kind or configuration (or the session ends); each test gets a log view that
    starts empty. A test that needs "no upstream" must point the forwarder at ``DOWN_UPSTREAM``.
    """
    handed_out: list[Upstream] = []

    def start(kind: str = "squid", **options: Any) -> Upstream:
        key = (kind, tuple(sorted((k, repr(v)) for k, v in options.items())))
        pool = _upstream_pool
        if not (pool.key == key and pool.current and pool.current.proc.poll() is None):
            pool.stop(lab)
            pool.current, pool.key = _launch_upstream(lab, kind, **options), key
        assert pool.current is not None
        upstream = pool.current.view()
        handed_out.append(upstream)
        return upstream

    yield start
    for upstream in handed_out:
        print(f"--- {upstream.kind} log during this test:\n{upstream.log.text()}")


def _launch_upstream(
    lab: lablib.Lab,
    kind: str,
    *,
    allow_domains: list[str] | None = None,
    deny_all: bool = False,
    reply_status: int | None = None,
    no_reply: bool = False,
    greedy: bool = False,
) -> Upstream:
    workdir: Path | None = None
    log_path: Path | None = None
    if kind == "squid":
        workdir = Path(tempfile.mkdtemp(prefix="hp-squid-"))
        (workdir / "squid.conf").write_text(_squid_conf(workdir, allow_domains, deny_all))
        shutil.chown(workdir, "proxy", "proxy")
        argv = ["squid", "-N", "-f", str(workdir / "squid.conf")]
        log_path = workdir / "access.log"
    elif kind == "tinyproxy":
        workdir = Path(tempfile.mkdtemp(prefix="hp-tinyproxy-"))
        (workdir / "tinyproxy.conf").write_text(_tinyproxy_conf(workdir, allow_domains, deny_all))
        workdir.chmod(0o755)
        shutil.chown(workdir, "nobody", "nogroup")
        argv = ["tinyproxy", "-d", "-c", str(workdir / "tinyproxy.conf")]
        log_path = workdir / "tinyproxy.log"
    elif kind == "builtin":
        argv = [*HELPER_PYTHON, connect_proxy.__file__, "--listen", f":{PROXY_PORT}"]
        argv += [f"--allow={name}" for name in allow_domains or []]
        if deny_all:
            reply_status = 403
        if reply_status is not None:
            argv += ["--reply-status", str(reply_status)]
        argv += ["--no-reply"] if no_reply else []
        argv += ["--greedy"] if greedy else []
    else:
        raise ValueError(f"unknown upstream kind {kind!r}")
    proc = lab.popen("upstream", argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    stderr_log = ProcessLog(proc.stderr)
    log = ProcessLog(path=log_path) if log_path else stderr_log
    upstream = Upstream(kind, proc, log, workdir)
    try:
        lab.wait_port("upstream", lablib.UPSTREAM_V4, PROXY_PORT, START_TIMEOUT)
        lab.wait_port("upstream", lablib.UPSTREAM_V6, PROXY_PORT, START_TIMEOUT)
    except TimeoutError:
        upstream.stop(lab)
        pytest.fail(f"{kind} did not start: {stderr_log.text()}\n{log.text()}")
    return upstream


@dataclass
class Client:
    """The client namespace: curl for HTTP(S), sockets for everything else."""

    lab: lablib.Lab
    tmp: Path

    def curl(
        self, url: str, version: int | None = None, *args: str, timeout: float = 20.0
    ) -> tuple[subprocess.CompletedProcess[str], Path]:
        """Fetch ``url`` with curl (``-k``: the origin's cert is self-signed); body in a file."""
        out = Path(tempfile.mkstemp(dir=self.tmp, suffix=".body")[1])
        argv = ["curl", "-sS", "-k", "--max-time", str(timeout), "-o", str(out)]
        argv += [f"-{version}"] if version else []
        proc = self.lab.run("client", [*argv, *args, url], capture_output=True, text=True,
                            timeout=timeout + 5)  # fmt: skip
        return proc, out

    def connect(self, version: int, port: int, role: str = "origin") -> socket.socket:
        return self.lab.connect("client", lablib.ADDRESSES[version][role], port)

    def expect_reset(
        self, version: int, port: int, payload: bytes = b"", role: str = "origin",
        timeout: float = 10.0,
    ) -> float:  # fmt: skip
        """Seconds from connect() until the forwarder resets the connection.

        A reset that lands before connect() returns (a fast forwarder on a busy host) counts.
        """
        start = time.monotonic()
        try:
            sock = self.connect(version, port, role)
        except ConnectionResetError:
            return time.monotonic() - start
        with sock:
            expect_reset(sock, payload, timeout)
        return time.monotonic() - start

    def expect_refused(self, version: int, port: int, role: str, payload: bytes) -> None:
        """The connection is reset, or closed without one byte of data."""
        try:
            sock = self.connect(version, port, role)
        except ConnectionResetError:
            return
        with sock:
            sock.settimeout(5)
            try:
                sock.sendall(payload)
                data = sock.recv(65536)
            except ConnectionResetError:
                return
        assert data == b"", f"a refused connection got data: {data[:80]!r}"


@pytest.fixture
def client(lab: lablib.Lab, tmp_path: Path) -> Client:
    return Client(lab, tmp_path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def expect_reset(sock: socket.socket, payload: bytes = b"", timeout: float = 10.0) -> float:
    """Seconds until the peer resets ``sock``; fails if it answers or closes cleanly instead."""
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        if payload:
            sock.sendall(payload)
        data = sock.recv(65536)
    except ConnectionResetError:
        return time.monotonic() - start
    except TimeoutError:
        pytest.fail(f"no reset within {timeout}s")
    pytest.fail(f"expected a reset, got {'a clean close' if not data else repr(data[:80])}")
