"""The programs the benchmark starts: forwarders under test, upstream proxies, and /proc readers.

Each forwarder and upstream is described by a small class with ``argv()`` (what to run inside its
namespace), optional config files written into the run's scratch directory, and ``version()``.
Keeping them here lets ``run.py`` treat HandyProxy, redsocks and pproxy the same way.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The benchmark's own tools from PyPI (pproxy, py-spy), pinned in BENCH_REQUIREMENTS.
BENCH_VENV = REPO / "bench" / ".venv-tools"
BENCH_REQUIREMENTS = REPO / "requirements-bench.txt"
PPROXY = BENCH_VENV / "bin" / "pproxy"
PY_SPY = BENCH_VENV / "bin" / "py-spy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# /proc readers


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (workers a forwarder forks)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def user_system(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) in seconds summed over ``pids`` (all their threads): user space (the
    interpreter) apart from the kernel (system calls, and the loopback TCP work they trigger)."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])  # stat fields 14, 15
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every listed process (all their threads), in seconds."""
    return sum(user_system(pids))


def rss_kib(pids: list[int]) -> int:
    """Resident set size summed over the processes, KiB (from /proc/<pid>/statm)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KIB
        except OSError:
            continue
    return total


def first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def dpkg_version(package: str) -> str:
    return first_line(["dpkg-query", "-W", "-f=${Version}", package])


# Forwarders under test


@dataclass
class Forwarder:
    """A transparent forwarder that listens on ``port`` in the router namespace."""

    name: str
    upstream: str  # host:port of the CONNECT proxy
    port: int
    workdir: Path
    workers: int = 1
    multiprocess: bool = False  # can it spread over processes (fd limit is per process)

    def argv(self) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError


@dataclass
class HandyProxy(Forwarder):
    python: str = field(default_factory=lambda: sys.executable)
    log_level: str = "warning"
    relay: str | None = None  # -relay splice|copy; None = the forwarder's default
    extra: list[str] = field(default_factory=list)  # more flags (a variant row's)

    def __post_init__(self) -> None:
        self.multiprocess = True

    def argv(self) -> list[str]:
        # -P: the working directory (the repo) is not put first on sys.path, so PYTHONPATH
        # decides which checkout's handyproxy runs (bench.profile --source).
        argv = [
            self.python,
            "-P",
            "-m",
            "handyproxy",
            "-local-port",
            str(self.port),
            "-upstream-proxy",
            self.upstream,
            "-log-level",
            self.log_level,
        ]
        if self.workers > 1:
            argv += ["-workers", str(self.workers)]
        if self.relay:
            argv += ["-relay", self.relay]
        return argv + self.extra

    def version(self) -> str:
        return first_line([self.python, "-m", "handyproxy", "-version"])


@dataclass
class Redsocks(Forwarder):
    def argv(self) -> list[str]:
        host, _, port = self.upstream.rpartition(":")
        conf = self.workdir / f"redsocks-{self.port}.conf"
        conf.write_text(
            "base {\n  log_debug = off;\n  log_info = off;\n  log = stderr;\n"
            "  daemon = off;\n  redirector = iptables;\n"
            # 6 fds per tunnel (two sockets, two splice pipes) under the 20,000-file limit
            "  redsocks_conn_max = 3300;\n}\n"
            "redsocks {\n  local_ip = 0.0.0.0;\n"
            f"  local_port = {self.port};\n  ip = {host};\n  port = {port};\n"
            "  type = http-connect;\n  listenq = 4096;\n}\n"
        )
        return ["redsocks", "-c", str(conf)]

    def version(self) -> str:
        return dpkg_version("redsocks")


@dataclass
class Pproxy(Forwarder):
    def argv(self) -> list[str]:
        return [
            str(PPROXY),
            "-l",
            f"redir://:{self.port}",
            "-r",
            f"http://{self.upstream}",
        ]

    def version(self) -> str:
        return first_line([str(PPROXY), "--version"])


def ensure_bench_venv() -> None:
    """Build the benchmark's own venv from scratch when it is missing or its pins changed.

    Its own venv because pproxy crashes at start when uvloop is importable; a fresh clone has
    none, so this must work from nothing: the stdlib venv (with its pip), then the pins.
    """
    want = BENCH_REQUIREMENTS.read_text()
    stamp = BENCH_VENV / ".requirements"
    if PPROXY.exists() and PY_SPY.exists() and stamp.exists() and stamp.read_text() == want:
        return
    if BENCH_VENV.exists():
        shutil.rmtree(BENCH_VENV)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(BENCH_VENV)], check=True)
    pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(BENCH_REQUIREMENTS)], check=True)
    for exe in (PPROXY, PY_SPY):
        if not exe.exists():
            raise RuntimeError(f"installing {BENCH_REQUIREMENTS.name} left no {exe}")
    stamp.write_text(want)


# Upstream CONNECT proxies (run in the upstream namespace)


@dataclass
class Upstream:
    name: str
    listen: str  # ip:port
    workdir: Path
    workers: int = 1

    def argv(self) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def stop_argv(self) -> list[str] | None:
        """A command that stops a daemonized instance (None: stopping our child is enough)."""
        return None

    def cleanup(self) -> None:
        """Remove what the instance leaves outside the run's scratch directory."""


@dataclass
class Squid(Upstream):
    """Squid with caching, logging and header rewriting off: a plain CONNECT relay.

    ``workers > 1`` uses Squid's SMP mode, which only runs daemonized; it is how the upstream
    gets past the per-process open-file limit for 20,000 tunnels (two sockets each).
    """

    @property
    def service(self) -> str:
        """Squid's -n name: SMP shared memory and IPC sockets are named after it, machine-wide,
        so each run and port gets its own and never meets another squid's."""
        return f"hpb{os.getpid()}p{self.listen.rpartition(':')[2]}w{self.workers}"

    def conf(self) -> Path:
        d = self.workdir / f"squid-{self.listen.rpartition(':')[2]}-w{self.workers}"
        d.mkdir(exist_ok=True)
        shutil.chown(d, "proxy", "proxy")
        host, _, port = self.listen.rpartition(":")
        conf = d / "squid.conf"
        conf.write_text(
            f"http_port {host}:{port}\n"
            "http_access allow all\n"
            "cache deny all\ncache_mem 0 MB\n"
            "access_log none\ncache_store_log none\n"
            f"cache_log {d}/cache.log\npid_filename {d}/squid.pid\ncoredump_dir {d}\n"
            "max_filedescriptors 20000\nshutdown_lifetime 0 seconds\n"
            "dns_nameservers 127.0.0.1\nclient_db off\nvia off\nforwarded_for delete\n"
            "client_persistent_connections off\nserver_persistent_connections off\n"
            "connect_timeout 10 seconds\nread_timeout 10 minutes\nclient_lifetime 1 hour\n"
            f"workers {self.workers}\n"
        )
        return conf

    def argv(self) -> list[str]:
        conf = self.conf()
        if self.workers > 1:  # SMP needs the daemon mode
            return ["squid", "-n", self.service, "-f", str(conf)]
        return ["squid", "-N", "-n", self.service, "-f", str(conf)]

    def stop_argv(self) -> list[str] | None:
        if self.workers > 1:
            return ["squid", "-n", self.service, "-f", str(self.conf()), "-k", "shutdown"]
        return None

    def cleanup(self) -> None:
        """Remove the shared-memory and IPC files this instance's SMP mode left behind."""
        for pattern in (f"/dev/shm/{self.service}-*", f"/run/squid/{self.service}-*"):
            for path in glob.glob(pattern):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def version(self) -> str:
        return dpkg_version("squid")


@dataclass
class Tinyproxy(Upstream):
    def argv(self) -> list[str]:
        host, _, port = self.listen.rpartition(":")
        conf = self.workdir / f"tinyproxy-{port}.conf"
        conf.write_text(
            f"User nobody\nGroup nogroup\nPort {port}\nListen {host}\nTimeout 600\n"
            "MaxClients 20000\nLogLevel Critical\nDisableViaHeader Yes\n"
        )
        return ["tinyproxy", "-d", "-c", str(conf)]

    def version(self) -> str:
        return dpkg_version("tinyproxy")


@dataclass
class BuiltinProxy(Upstream):
    python: str = field(default_factory=lambda: sys.executable)

    def argv(self) -> list[str]:
        return [self.python, "-m", "handyproxy.lab.connect_proxy", "--listen", self.listen]

    def version(self) -> str:
        return "handyproxy.connect_proxy (repo)"


UPSTREAMS = {"squid": Squid, "tinyproxy": Tinyproxy, "builtin": BuiltinProxy}


def parse_wrk(text: str) -> dict:
    """Requests/s and every error count wrk prints."""
    out: dict = {"rps": 0.0, "requests": 0, "errors": 0, "error_detail": {}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        for key, val in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            if int(val):
                out["error_detail"][key] = int(val)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["error_detail"]["non2xx"] = int(m.group(1))
    out["errors"] = sum(out["error_detail"].values())
    return out
