"""Fixtures for the integration tests: one namespace lab per session, and factories that start
the forwarder, an upstream proxy (Debian's squid or tinyproxy, or the built-in one) and origin
servers inside it, recording what they start and stopping it newest first.

The tests need root, iproute2, nftables, squid, tinyproxy, curl and openssl. CI runs as root with
all of them installed, so a missing piece fails the run instead of skipping it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pathkit import (
    BODY_SIZE,
    HELPER_PYTHON,
    HERE,
    ORIGIN_NAME,
    ORIGIN_PORTS,
    PROXY_PORT,
    PYTHON,
    START_TIMEOUT,
    TOOLS,
    Body,
    Client,
    Forwarder,
    Origin,
    ProcessLog,
    Upstream,
)

from handyproxy.lab import connect_proxy
from handyproxy.lab import netns as lablib


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
    """``{"dial_timeout": "1s"}`` -> ``["-dial-timeout=1s"]`` (one word: boolean flags take
    their value only so); a None value leaves the flag out (to let a ``config`` file set it); a
    list repeats the flag."""
    argv = []
    for name, value in flags.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                argv.append(f"-{name.replace('_', '-')}={item}")
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
    ``builtin`` (``handyproxy.lab.connect_proxy``; ``reply_status``, ``no_reply``, ``greedy``
    make it misbehave). ``allow_domains`` admits only those names (never an IP); ``deny_all``
    answers 403.

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


@pytest.fixture
def client(lab: lablib.Lab, tmp_path: Path) -> Client:
    return Client(lab, tmp_path)
