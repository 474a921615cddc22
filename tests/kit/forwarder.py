"""The forwarder under test: ``python -m handyproxy`` in the lab's router namespace, with what a
test reads from it: its access records, and its descriptors, CPU and memory from /proc."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handyproxy.lab.netns import PROXY_PORT, UPSTREAM_V4, Lab
from handyproxy.lab.output import Output
from kit.records import fields
from kit.waiting import wait_until

PYTHON = sys.executable
HANDYPROXY = [PYTHON, "-m", "handyproxy"]
#: What every forwarder the kit starts is given unless the test says otherwise.
DEFAULT_FLAGS: dict[str, Any] = {
    "upstream_proxy": f"{UPSTREAM_V4}:{PROXY_PORT}",
    "drain_timeout": "1s",  # a stop at the end of a test never waits long for open tunnels
}
#: An upstream that is down: the upstream host, a port where nothing listens.
DOWN_UPSTREAM = f"{UPSTREAM_V4}:{PROXY_PORT + 1}"
START_TIMEOUT = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def flag_argv(flags: Mapping[str, Any]) -> list[str]:
    """``{"dial_timeout": "1s"}`` → ``["-dial-timeout=1s"]``: one word each, so a boolean
    flag takes its value too; a list repeats the flag, None leaves it out."""
    argv = []
    for name, value in flags.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                argv.append(f"-{name.replace('_', '-')}={item}")
    return argv


def flag_names(argv: list[str]) -> set[str]:
    """The flags (``-dial-timeout``, ``--dial-timeout=1s``) named in an argv, as field names."""
    return {
        arg.lstrip("-").split("=", 1)[0].replace("-", "_")
        for arg in argv
        if arg.startswith("-") and not arg.lstrip("-")[:1].isdigit()
    }


def nofile_prefix(nofile: int | None) -> list[str]:
    """``prlimit`` in front of a command: its descriptor limit, soft and hard."""
    return ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []


@dataclass
class Forwarder:
    """A running forwarder; ``log`` is its output (the access records go there)."""

    proc: subprocess.Popen[str]
    log: Output
    port: int
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    # Access records

    def access(self, *needles: str, timeout: float = 10.0) -> str:
        """The first access record (``tunnel end ...``) that contains every one of ``needles``.

        Needles are plain text; end one with a space to match a whole field (``"status=200 "``).
        """
        lookahead = "".join(f"(?=.*{re.escape(needle)})" for needle in needles)
        return self.log.wait_for(rf"tunnel end {lookahead}", timeout)[0].string

    def records(self) -> list[dict[str, str]]:
        """The fields of every access record so far."""
        return [fields(line) for line in self.log.lines if "tunnel end " in line]

    def wait_record(
        self, pred: Callable[[dict[str, str]], bool] = lambda r: True, timeout: float = 10.0
    ) -> dict[str, str]:
        """The fields of the first access record for which ``pred`` is true."""
        line = self.log.wait_line(lambda s: "tunnel end " in s and pred(fields(s)), timeout)
        return fields(line)

    # Figures from /proc

    def pids(self) -> list[int]:
        """The main process and its workers (``-workers N`` forks children)."""
        pids = [self.pid]
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                text = Path(f"/proc/{self.pid}/task/{task}/children").read_text()
                pids += [int(p) for p in text.split()]
        return pids

    def serving_workers(self) -> int:
        """Workers whose event loop runs: each catches SIGTERM once it serves (after fork()
        it starts with the default action), and holds every socket it keeps while idle."""
        count = 0
        for pid in self.pids()[1:]:
            with contextlib.suppress(FileNotFoundError):
                status = Path(f"/proc/{pid}/status").read_text()
                caught = int(status.split("SigCgt:")[1].split()[0], 16)
                count += bool(caught & (1 << (signal.SIGTERM - 1)))
        return count

    def fd_count(self, kind: str = "socket:") -> int:
        """Open descriptors whose target starts with ``kind`` ("socket:"; "" counts all).

        Sockets by default: libuv opens a few files lazily (a /dev/null reserve, for one), and
        the splice relay keeps pipes, which would make an all-descriptor count drift without
        any tunnel leaking.
        """
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(kind):
                            total += 1
        return total

    def wait_fds(self, expected: int, timeout: float = 10.0) -> int:
        """Wait until the socket count drops back to ``expected``; returns the count then."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self.fd_count() <= expected, timeout, "sockets back at baseline")
        return self.fd_count()

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process and its workers, in seconds."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                values = stat[stat.rindex(")") + 2 :].split()
                total += int(values[11]) + int(values[12])  # utime, stime (fields 14, 15)
        return total / CLK_TCK

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total


def listening(lab: Lab, port: int, ns: str = "router") -> bool:
    """Whether a socket listens on TCP ``port`` in ``ns`` (as ``ss`` sees it)."""
    out = lab.run(ns, ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def launch(
    lab: Lab,
    *argv: str,
    port: int = 0,
    nofile: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    **flags: Any,
) -> Forwarder:
    """Start the forwarder in the router namespace; returns once it accepts connections.

    ``argv`` are flags as written on a command line (``"-relay", "copy"``), ``flags`` the same as
    keywords (``relay="copy"``); both win over ``DEFAULT_FLAGS``. With ``port`` 0 the port is
    the one its ``listening on`` line reports; a fixed port is needed when that line is not
    logged (``-log-level warning``), and then readiness is the socket showing up in ``ss``.
    ``cwd`` is where it runs: ``python -m`` looks there first, before ``PYTHONPATH``.
    """
    port = int(flags.pop("local_port", port))
    given = flag_names(list(argv)) | set(flags)
    defaults = {"local_port": port, **DEFAULT_FLAGS}
    options = {k: v for k, v in defaults.items() if k not in given}
    options.update(flags)
    command = [*HANDYPROXY, *flag_argv(options), *argv]
    proc, log = lab.spawn(
        "router",
        [*nofile_prefix(nofile), *command],
        name="handyproxy",
        env={**os.environ, **env} if env is not None else None,
        cwd=cwd,
    )
    fwd = Forwarder(proc, log, port, command)
    try:
        if port == 0:
            line = log.wait_for(r"listening on \S+:(\d+)", START_TIMEOUT)[0]
            fwd.port = int(line.group(1))
        else:
            wait_until(
                lambda: listening(lab, port) or not fwd.alive(),
                START_TIMEOUT,
                f"the forwarder listening on port {port}",
                interval=0.05,
            )
            assert fwd.alive(), f"the forwarder exited {proc.returncode}:\n{log.text()}"
    except BaseException:
        lab.stop(proc)
        raise
    return fwd
