"""The upstream proxy on port 3128 of the lab's upstream namespace: Debian's squid or tinyproxy
(the real thing), or the lab's own CONNECT proxy (``handyproxy.lab.connect_proxy``), which can be
scripted to misbehave.

Starting squid costs more than most tests, so the port has one tenant at a time (``Slot``):
the last upstream keeps running until a test asks for another kind or configuration, and each
test gets a view of its log that starts empty. An upstream that keeps state between tunnels (a
``fault`` counts bytes across all of them) is stopped after the test that asked for it.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from handyproxy.address import authority
from handyproxy.lab.netns import PROXY_PORT, UPSTREAM_V4, UPSTREAM_V6, Lab
from handyproxy.lab.output import Output
from kit.forwarder import PYTHON, nofile_prefix
from kit.records import fields
from kit.waiting import wait_until

KINDS = ("squid", "tinyproxy", "builtin")
SQUID_BASIC_AUTH = "/usr/lib/squid/basic_ncsa_auth"
BUILTIN = [PYTHON, "-m", "handyproxy.lab.connect_proxy"]
START_TIMEOUT = 15.0
#: How long a kept upstream may take to see the last test's tunnels end before it is replaced.
IDLE_WAIT = 3.0
#: The leading word of each line the builtin proxy logs, by event name.
EVENTS = {"connect": "CONNECT", "end": "tunnel end", "fault": "fault", "fin": "fin"}
_EVENT = re.compile(r"connect-proxy (CONNECT (?P<target>\S+)|tunnel end|fault|fin) ")


@dataclass
class Upstream:
    """A running upstream proxy (one or more processes sharing the port)."""

    kind: str
    port: int
    argv: list[str]
    procs: list[subprocess.Popen[str]]
    outputs: list[Output]
    workdir: Path | None = None
    stateless: bool = True
    #: squid and tinyproxy log CONNECTs to a file; their stderr is only for start-up errors
    file_log: Output | None = None

    @property
    def address(self) -> str:
        """Where the forwarder finds it: ``-upstream-proxy`` takes this."""
        return authority(UPSTREAM_V4, self.port)

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.procs[0]

    @property
    def log(self) -> Output:
        """Where it logs its requests (the first process's output for the builtin proxy)."""
        return self.file_log or self.outputs[0]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def idle(self) -> bool:
        """No tunnel of an earlier test is still open here (each CONNECT has its end line), so
        a new test's view of the log holds only its own events. Always true for squid and
        tinyproxy: their lines are never counted or matched to tunnels."""
        if self.kind != "builtin":
            return True
        for output in self.outputs:
            ids = {"connect": set(), "end": set()}
            for line in output.lines:
                for event in ids:
                    if self._is(event, line):
                        ids[event].add(self._parse(line).get("id"))
            if ids["connect"] - ids["end"]:
                return False
        return True

    def view(self) -> Upstream:
        """This upstream for one more test: its logs start empty, the processes are shared."""
        return replace(
            self,
            outputs=[o.view() for o in self.outputs],
            file_log=self.file_log.view() if self.file_log else None,
        )

    def kill(self) -> None:
        """SIGKILL: the process vanishes, its tunnels are reset, its port refuses connections."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def start_again(self, lab: Lab) -> None:
        """After ``kill``: the same upstream on the same port (squid's log goes on)."""
        assert not any(p.poll() is None for p in self.procs), "still running"
        self.procs, self.outputs = _spawn(lab, self.kind, self.argv, len(self.procs), None)
        _wait_listening(lab, self)

    def stop(self, lab: Lab) -> None:
        if self.kind == "squid":
            self.kill()  # its SIGTERM shutdown takes two seconds; nothing to save
        for proc in self.procs:
            lab.stop(proc)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def connects(self, target: str = "") -> list[str]:
        """squid's and tinyproxy's log lines of CONNECT requests (to ``target`` when given)."""
        return self.log.matching(rf"CONNECT {re.escape(target)}")

    # The builtin proxy's events (see handyproxy.lab.connect_proxy)

    def events(self, event: str) -> list[dict[str, str]]:
        """The fields of every ``event`` line so far (``connect``, ``end``, ``fault``, ``fin``);
        a ``connect`` also carries its ``target``."""
        return [self._parse(line) for line in self._lines() if self._is(event, line)]

    def wait_event(
        self,
        event: str,
        pred: Callable[[dict[str, str]], bool] = lambda e: True,
        timeout: float = 10.0,
    ) -> dict[str, str]:
        """The first ``event`` for which ``pred`` is true (waiting on the first process)."""
        return self.wait_events(event, 1, pred, timeout)[0]

    def wait_events(
        self,
        event: str,
        count: int,
        pred: Callable[[dict[str, str]], bool] = lambda e: True,
        timeout: float = 10.0,
    ) -> list[dict[str, str]]:
        """The first ``count`` such events. Wait for them rather than read ``events()`` after
        the traffic: a line can still be on its way from the process when the bytes are not."""
        lines = self.outputs[0].wait_lines(
            lambda s: self._is(event, s) and pred(self._parse(s)), timeout, count
        )
        return [self._parse(line) for line in lines]

    def _lines(self) -> Iterable[str]:
        for output in self.outputs:
            yield from output.lines

    @staticmethod
    def _is(event: str, line: str) -> bool:
        match = _EVENT.search(line)
        return match is not None and match.group(1).startswith(EVENTS[event])

    @staticmethod
    def _parse(line: str) -> dict[str, str]:
        match = _EVENT.search(line)
        assert match is not None
        found = fields(line[match.end() :])
        if match.group("target"):
            found["target"] = match.group("target")
        return found


def squid_conf(
    workdir: Path,
    port: int,
    allow_domains: list[str] | None,
    deny_all: bool,
    users: dict[str, str] | None,
) -> str:
    if deny_all:
        access = ["http_access deny all"]
    elif allow_domains is not None:
        # -n: match the name as given; never reverse-resolve an IP target into an allowed name
        access = [f"acl allowed dstdomain -n {' '.join(allow_domains)}",
                  "http_access allow CONNECT allowed", "http_access deny all"]  # fmt: skip
    elif users:
        access = [f"auth_param basic program {SQUID_BASIC_AUTH} {workdir}/passwd",
                  "auth_param basic realm handyproxy-test", "acl authed proxy_auth REQUIRED",
                  "http_access allow CONNECT authed", "http_access deny all"]  # fmt: skip
    else:
        access = ["http_access allow CONNECT", "http_access deny all"]
    return "\n".join([
        f"http_port {port}",
        f"visible_hostname squid-{port}.lab",
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


def squid_passwords(workdir: Path, users: dict[str, str]) -> None:
    """``passwd`` for basic_ncsa_auth: one ``user:apr1-hash`` line per user."""
    lines = []
    for user, password in users.items():
        hashed = subprocess.run(
            ["openssl", "passwd", "-apr1", password], check=True, capture_output=True, text=True
        ).stdout.strip()
        lines.append(f"{user}:{hashed}\n")
    (workdir / "passwd").write_text("".join(lines))


def tinyproxy_conf(
    workdir: Path, port: int, allow_domains: list[str] | None, deny_all: bool
) -> str:
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {port}",
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


def builtin_argv(
    port: int, allow_domains: list[str] | None = None, deny_all: bool = False, **options: Any
) -> list[str]:
    """The lab proxy's command line: each option is its flag (``mode="echo"`` → ``--mode
    echo``, ``greedy=True`` → ``--greedy``); ``allow_domains`` and ``deny_all`` as for squid."""
    argv = [*BUILTIN, "--listen", f":{port}", "--uvloop"]
    argv += [f"--allow={name}" for name in allow_domains or []]
    if deny_all:
        options["reply_status"] = 403
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def launch(
    lab: Lab,
    kind: str,
    *,
    port: int = PROXY_PORT,
    users: dict[str, str] | None = None,
    nofile: int | None = None,
    processes: int = 1,
    **options: Any,
) -> Upstream:
    """Start an upstream of ``kind`` on ``port`` (IPv4 and IPv6); returns once it listens.

    ``users`` (squid) asks for Basic authentication with these passwords; ``processes`` > 1
    runs that many builtin proxies sharing the port (``reuseport``), each with ``nofile``
    descriptors, for loads one process cannot hold.
    """
    workdir: Path | None = None
    file_log: Path | None = None
    allow_domains = options.pop("allow_domains", None)
    deny_all = bool(options.pop("deny_all", False))
    if kind != "builtin" and (processes != 1 or options or (users and kind != "squid")):
        raise ValueError(f"{kind} takes port, allow_domains, deny_all (squid: users) only")
    if kind == "squid":
        workdir = Path(tempfile.mkdtemp(prefix=f"hp-squid{port}-"))
        (workdir / "squid.conf").write_text(
            squid_conf(workdir, port, allow_domains, deny_all, users)
        )
        if users:
            squid_passwords(workdir, users)
        for path in (workdir, *workdir.iterdir()):
            shutil.chown(path, "proxy", "proxy")
        argv = ["squid", "-N", "-f", str(workdir / "squid.conf")]
        file_log = workdir / "access.log"
    elif kind == "tinyproxy":
        workdir = Path(tempfile.mkdtemp(prefix=f"hp-tinyproxy{port}-"))
        conf = tinyproxy_conf(workdir, port, allow_domains, deny_all)
        (workdir / "tinyproxy.conf").write_text(conf)
        workdir.chmod(0o755)
        shutil.chown(workdir, "nobody", "nogroup")
        argv = ["tinyproxy", "-d", "-c", str(workdir / "tinyproxy.conf")]
        file_log = workdir / "tinyproxy.log"
    elif kind == "builtin":
        if processes > 1:
            options["reuseport"] = True
        argv = builtin_argv(port, allow_domains, deny_all, **options)
    else:
        raise ValueError(f"unknown upstream kind {kind!r}; one of {', '.join(KINDS)}")
    procs, outputs = _spawn(lab, kind, argv, processes, nofile)
    upstream = Upstream(
        kind,
        port,
        [*nofile_prefix(nofile), *argv],
        procs,
        outputs,
        workdir,
        # a fault counts bytes across tunnels; a quiet one cannot show that it is idle
        stateless=not options.get("fault") and not options.get("quiet"),
        file_log=Output(path=file_log, name=kind) if file_log else None,
    )
    try:
        _wait_listening(lab, upstream)
    except AssertionError:
        upstream.stop(lab)
        raise
    return upstream


def _spawn(
    lab: Lab, kind: str, argv: list[str], processes: int, nofile: int | None
) -> tuple[list[subprocess.Popen[str]], list[Output]]:
    procs, outputs = [], []
    for i in range(processes):
        proc, output = lab.spawn("upstream", [*nofile_prefix(nofile), *argv], name=f"{kind} {i}")
        procs.append(proc)
        outputs.append(output)
    return procs, outputs


def _wait_listening(lab: Lab, upstream: Upstream) -> None:
    try:
        if upstream.kind == "builtin":
            for output in upstream.outputs:  # one socket per family
                output.wait_for("listening on", START_TIMEOUT, count=2)
        else:
            lab.wait_port("upstream", UPSTREAM_V4, upstream.port, START_TIMEOUT)
            lab.wait_port("upstream", UPSTREAM_V6, upstream.port, START_TIMEOUT)
    except TimeoutError as exc:
        texts = "\n".join(o.text() for o in upstream.outputs)
        cache = upstream.workdir / "cache.log" if upstream.workdir else None
        if cache and cache.exists():
            texts += "\n" + cache.read_text(errors="replace")
        raise AssertionError(
            f"{upstream.kind} did not start on {upstream.address}: {exc}\n{texts}"
        ) from None


@dataclass
class Slot:
    """Port 3128 of one lab's upstream namespace and the upstream that holds it (upstreams
    on other ports belong to the test that started them)."""

    lab: Lab
    key: tuple[Any, ...] | None = None
    current: Upstream | None = None

    def start(self, kind: str = "squid", **options: Any) -> Upstream:
        """The upstream of ``kind`` with ``options`` (started now or kept from a test before),
        seen through a log view that starts empty."""
        key = (kind, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if not (self.key == key and self.current and self.reusable(self.current)):
            self.vacate()
            self.current, self.key = launch(self.lab, kind, **options), key
        assert self.current is not None
        return self.current.view()

    def reusable(self, upstream: Upstream) -> bool:
        """Alive, stateless, and idle once the previous test's tunnels have ended (a tunnel the
        last forwarder left hanging, say in ``hold`` mode, means a fresh start instead)."""
        if not (upstream.stateless and upstream.alive()):
            return False
        with contextlib.suppress(AssertionError):
            return bool(wait_until(upstream.idle, IDLE_WAIT, "the upstream idle"))
        return False

    def vacate(self) -> None:
        """Stop the upstream, leaving the port free (for a test that plays the upstream)."""
        if self.current is not None:
            self.current.stop(self.lab)
        self.key = self.current = None

    def end_of_test(self) -> None:
        """An upstream that keeps state between tunnels is not kept for the next test."""
        if self.current is not None and not self.current.stateless:
            self.vacate()
