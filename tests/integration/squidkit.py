"""Extra squid instances for the upstream tests: several at once in the upstream namespace, each
on its own port, optionally behind Basic authentication (``basic_ncsa_auth``), each with its own
access log, and a way to kill one and bring it back on the same port.

The shared ``start_upstream`` fixture keeps one proxy on port 3128; these run beside it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pathkit import START_TIMEOUT, ProcessLog

from handyproxy.lab import netns as lablib

SQUID_AUTH = "/usr/lib/squid/basic_ncsa_auth"


@dataclass
class Squid:
    """One squid in the upstream namespace, listening on every address at ``port``."""

    lab: lablib.Lab
    port: int
    workdir: Path
    users: dict[str, str] = field(default_factory=dict)  # Basic auth: user -> password
    proc: subprocess.Popen[str] | None = None
    log: ProcessLog | None = None

    @property
    def address(self) -> str:
        return f"{lablib.UPSTREAM_V4}:{self.port}"

    def conf(self) -> str:
        if self.users:
            access = [
                f"auth_param basic program {SQUID_AUTH} {self.workdir}/passwd",
                "auth_param basic realm handyproxy-test",
                "acl authed proxy_auth REQUIRED",
                "http_access allow CONNECT authed",
            ]
        else:
            access = ["http_access allow CONNECT"]
        return "\n".join([
            f"http_port {self.port}",
            f"visible_hostname squid-{self.port}.lab",
            f"pid_filename {self.workdir}/squid.pid",
            f"cache_log {self.workdir}/cache.log",
            f"access_log stdio:{self.workdir}/access.log",
            f"coredump_dir {self.workdir}",
            "cache deny all",
            "hosts_file /etc/hosts",
            "dns_nameservers 127.0.0.1",
            "shutdown_lifetime 0 seconds",
            "netdb_filename none",
            "pinger_enable off",
            "logfile_rotate 0",
            "acl CONNECT method CONNECT",
            *access,
            "http_access deny all",
        ]) + "\n"  # fmt: skip

    def start(self) -> Squid:
        """Start (or start again, on the same port and log) and wait until it accepts."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        (self.workdir / "squid.conf").write_text(self.conf())
        if self.users:
            lines = []
            for user, password in self.users.items():
                hashed = subprocess.run(
                    ["openssl", "passwd", "-apr1", password],
                    check=True, capture_output=True, text=True,
                ).stdout.strip()  # fmt: skip
                lines.append(f"{user}:{hashed}\n")
            (self.workdir / "passwd").write_text("".join(lines))
        shutil.chown(self.workdir, "proxy", "proxy")
        for path in self.workdir.iterdir():
            shutil.chown(path, "proxy", "proxy")
        argv = ["squid", "-N", "-f", str(self.workdir / "squid.conf")]
        self.proc = self.lab.popen(
            "upstream", argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        stderr = ProcessLog(self.proc.stderr)
        if self.log is None:
            self.log = ProcessLog(path=self.workdir / "access.log")
        try:
            self.lab.wait_port("upstream", lablib.UPSTREAM_V4, self.port, START_TIMEOUT)
        except TimeoutError:
            self.kill()
            cache = (self.workdir / "cache.log").read_text(errors="replace")
            pytest.fail(f"squid on {self.port} did not start: {stderr.text()}\n{cache}")
        return self

    def kill(self) -> None:
        """SIGKILL: the process vanishes, its tunnels are reset, its port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def connects(self, target: str = "") -> list[str]:
        """Access-log lines of CONNECT requests (to ``target`` when given)."""
        assert self.log is not None
        return self.log.matching(rf" CONNECT {target}")


class SquidFarm:
    """Starts squids and kills them all at the end of the test."""

    def __init__(self, lab: lablib.Lab) -> None:
        self.lab = lab
        self.squids: list[Squid] = []

    def start(self, port: int, users: dict[str, str] | None = None) -> Squid:
        workdir = Path(tempfile.mkdtemp(prefix=f"hp-squid{port}-"))
        squid = Squid(self.lab, port, workdir, users or {})
        self.squids.append(squid)
        return squid.start()

    def close(self) -> None:
        for squid in reversed(self.squids):
            squid.kill()
            if squid.proc is not None:
                self.lab.stop(squid.proc)
            print(f"--- squid {squid.port} access log:\n{squid.log.text() if squid.log else ''}")
            shutil.rmtree(squid.workdir, ignore_errors=True)
