"""A throwaway lab of four network namespaces: client, router, upstream proxy host and origin.

Why it exists: a transparent forwarder can only be proven on a real REDIRECT path, where the
kernel rewrites the destination and ``SO_ORIGINAL_DST`` hands it back. The demo, the integration
tests and the benchmark all build the same topology from this module, so it needs root and the
``ip``, ``nft`` and ``conntrack`` binaries but nothing beyond the standard library.

Topology (every address is fixed; each lab lives in its own namespaces, so labs never collide)::

    client ───────────── router ─────────────── upstream ─────────────── origin
    198.51.100.2/24      198.51.100.1/24        203.0.113.2/24          198.18.0.2/24
    2001:db8:100::2/64   2001:db8:100::1/64     2001:db8:113::2/64      2001:db8:18::2/64
                         203.0.113.1/24         198.18.0.1/24
                         2001:db8:113::1/64     2001:db8:18::1/64

- client: default routes via the router (198.51.100.1, 2001:db8:100::1), nothing else.
- router: connected routes only. It has NO route to the origin network 198.18.0.0/24 /
  2001:db8:18::/64, so a client's packets reach the origin only when the router's REDIRECT hands
  them to the forwarder, which tunnels them through the upstream proxy with CONNECT.
- upstream: connected routes to the router and the origin; forwarding is off, so it never passes
  a packet on by itself: only a proxy process running there reaches the origin.
- origin: its connected route only; it can answer the upstream and nobody else.

Forwarding is off everywhere, IPv6 duplicate address detection is off (addresses work at once),
``lo`` is up in every namespace, and each namespace gets its own ``resolv.conf`` pointing at
127.0.0.1 so no DNS query ever leaves the lab. Namespaces are named ``<prefix>-<role>`` with a
prefix such as ``hp1a2b3c``; veth devices are ``<prefix>-<a><b>`` (11 characters).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from handyproxy.lab.output import Output

ROLES = ("client", "router", "upstream", "origin")

CLIENT_V4 = "198.51.100.2"
CLIENT_V6 = "2001:db8:100::2"
ROUTER_CLIENT_V4 = "198.51.100.1"
ROUTER_CLIENT_V6 = "2001:db8:100::1"
ROUTER_UPSTREAM_V4 = "203.0.113.1"
ROUTER_UPSTREAM_V6 = "2001:db8:113::1"
UPSTREAM_V4 = "203.0.113.2"
UPSTREAM_V6 = "2001:db8:113::2"
UPSTREAM_ORIGIN_V4 = "198.18.0.1"
UPSTREAM_ORIGIN_V6 = "2001:db8:18::1"
ORIGIN_V4 = "198.18.0.2"
ORIGIN_V6 = "2001:db8:18::2"
#: Where the upstream proxy listens in the upstream namespace (the demo's, the tests').
PROXY_PORT = 3128

#: The address others use to reach each role, by IP version (4 or 6).
ADDRESSES: dict[int, dict[str, str]] = {
    4: {
        "client": CLIENT_V4,
        "router": ROUTER_CLIENT_V4,
        "upstream": UPSTREAM_V4,
        "origin": ORIGIN_V4,
    },
    6: {
        "client": CLIENT_V6,
        "router": ROUTER_CLIENT_V6,
        "upstream": UPSTREAM_V6,
        "origin": ORIGIN_V6,
    },
}

# (namespace a, namespace b, [(address of a, address of b)], one per family)
_LINKS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "client",
        "router",
        (("198.51.100.2/24", "198.51.100.1/24"), ("2001:db8:100::2/64", "2001:db8:100::1/64")),
    ),
    (
        "router",
        "upstream",
        (("203.0.113.1/24", "203.0.113.2/24"), ("2001:db8:113::1/64", "2001:db8:113::2/64")),
    ),
    (
        "upstream",
        "origin",
        (("198.18.0.1/24", "198.18.0.2/24"), ("2001:db8:18::1/64", "2001:db8:18::2/64")),
    ),
)

_SYSCTLS = (
    "net.ipv4.ip_forward=0",
    "net.ipv6.conf.all.forwarding=0",
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_ra=0",
    "net.ipv6.conf.default.accept_ra=0",
)

NFT_TABLE = "handyproxy_lab"
NETNS_RUN = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
OWNER_DIR = Path("/run/handyproxy-lab")
DEFAULT_PREFIX = "hp"
CLONE_NEWNET = 0x40000000
_MAX_IFNAME = 15

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


def missing_requirements() -> list[str]:
    """Say what the lab needs and this machine lacks (root, ip, nft, conntrack), empty when all
    is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if shutil.which(tool) is None:
            missing.append(f"the {tool!r} command (Debian package {package})")
    return missing


def _check(argv: Sequence[str], *, input: str | None = None) -> None:
    """Run one setup command and raise LabError naming it when it fails."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Lab:
    """Four namespaces joined by veth pairs; a context manager that removes them all on exit.

    ``Lab()`` builds nothing; ``start()`` (or ``with Lab() as lab``) does. Methods that take a
    namespace accept the role (``"client"``) or the full namespace name.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{DEFAULT_PREFIX}{secrets.token_hex(3)}"
        if len(self.prefix) + 3 > _MAX_IFNAME or not re.fullmatch(r"[a-z0-9]+", self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r}: lower-case letters/digits, at most 12")
        self.namespaces = {role: f"{self.prefix}-{role}" for role in ROLES}
        self._procs: list[subprocess.Popen[Any]] = []
        self._group_leaders: set[int] = set()
        self._started = False
        self._closed = False
        self._old_handlers: dict[int, Any] = {}
        self._lock = threading.Lock()

    # Lifecycle

    def __enter__(self) -> Lab:
        self._catch_signals()
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Lab:
        """Create the namespaces, links, addresses and routes; undo everything if a step fails."""
        if self._started:
            return self
        missing = missing_requirements()
        if missing:
            raise LabError("the lab needs " + ", ".join(missing))
        taken = [ns for ns in self.namespaces.values() if (NETNS_RUN / ns).exists()]
        if taken or (OWNER_DIR / self.prefix).exists():
            # never adopt (and later delete) someone else's namespaces
            raise LabError(f"lab prefix {self.prefix!r} is in use: {', '.join(taken)}")
        self._started = True
        atexit.register(self.close)
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.prefix).write_text(f"{os.getpid()}\n")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for role, ns in self.namespaces.items():
            _check(["ip", "netns", "add", ns])
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            self.hosts(role, {})
            _check(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_SYSCTLS])
            _check(["ip", "-n", ns, "link", "set", "lo", "up"])
        for a, b, pairs in _LINKS:
            dev_a, dev_b = self.device(a, b), self.device(b, a)
            peer = ["peer", "name", dev_b, "netns", self.ns(b)]
            _check(["ip", "link", "add", dev_a, "netns", self.ns(a), "type", "veth", *peer])
            for addr_a, addr_b in pairs:
                extra = ["nodad"] if ":" in addr_a else []
                _check(["ip", "-n", self.ns(a), "addr", "add", addr_a, "dev", dev_a, *extra])
                _check(["ip", "-n", self.ns(b), "addr", "add", addr_b, "dev", dev_b, *extra])
            _check(["ip", "-n", self.ns(a), "link", "set", dev_a, "up"])
            _check(["ip", "-n", self.ns(b), "link", "set", dev_b, "up"])
        client = self.ns("client")
        _check(["ip", "-n", client, "route", "add", "default", "via", ROUTER_CLIENT_V4])
        _check(["ip", "-n", client, "-6", "route", "add", "default", "via", ROUTER_CLIENT_V6])
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """Wait until every veth is operationally up and has its IPv6 link-local address.

        The kernel batches link state changes (linkwatch runs at most about once a second), so
        one end of a new veth can stay "DOWN" for up to a second. IPv6 is not ready on it until
        then and the first SYN to it is lost, costing the client a one-second retransmit.
        """
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for ns in self.namespaces.values():
                links = subprocess.run(
                    ["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True
                ).stdout
                addrs = subprocess.run(
                    ["ip", "-n", ns, "-o", "-6", "addr", "show", "scope", "link"],
                    capture_output=True,
                    text=True,
                ).stdout
                for line in links.splitlines():
                    dev = line.split(":")[1].strip().split("@")[0]
                    if not dev.startswith(self.prefix):
                        continue
                    if "state UP" not in line or f" {dev} " not in addrs:
                        pending.append(dev)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LabError(f"links not up after {timeout}s: {', '.join(pending)}")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop every process started here, then delete the namespaces and their /etc files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for proc in reversed(list(self._procs)):
            self.stop(proc)
        if self._started:
            _remove_namespaces(self.namespaces.values())
            with contextlib.suppress(FileNotFoundError):
                (OWNER_DIR / self.prefix).unlink()
        atexit.unregister(self.close)
        self._restore_signals()

    def _catch_signals(self) -> None:
        """Turn SIGTERM/SIGHUP into SystemExit so ``with`` blocks (and this cleanup) run."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                self._old_handlers[signum] = signal.signal(signum, _raise_system_exit)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    # Names

    def ns(self, name: str) -> str:
        """The namespace name for a role, or ``name`` itself when it already is one."""
        return self.namespaces.get(name, name)

    def device(self, here: str, there: str) -> str:
        """The veth device in namespace ``here`` that leads to ``there`` (roles)."""
        return f"{self.prefix}-{here[0]}{there[0]}"

    @staticmethod
    def address(role: str, version: int = 4) -> str:
        """The address others use to reach ``role`` over IPv``version``."""
        return ADDRESSES[version][role]

    # Running things inside a namespace

    def argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside namespace ``ns``."""
        return ["ip", "netns", "exec", self.ns(ns), *argv]

    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``ns`` (same keyword arguments, ``check`` defaults to off)."""
        kwargs.setdefault("check", False)
        return subprocess.run(self.argv(ns, argv), **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; ``close()`` stops it if nobody did before.

        The child gets its own session so a Ctrl-C on the terminal reaches only us; we then
        stop the children in order.
        """
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.argv(ns, argv), **kwargs)
        self._procs.append(proc)
        if kwargs["start_new_session"]:
            self._group_leaders.add(proc.pid)
        return proc

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        on_line: Callable[[str], None] | None = None,
        **kwargs: Any,
    ) -> tuple[subprocess.Popen[str], Output]:
        """``popen`` with the process's stdout and stderr read together, line by line, into an
        ``Output`` a caller can wait on (stdin is /dev/null unless ``stdin`` says otherwise)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = self.popen(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
        )
        return proc, Output(proc.stdout, name=name or argv[0], on_line=on_line)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status.

        A process started by ``popen`` leads its own process group: whatever it forked and left
        behind (a forwarder's workers, when the parent was killed) is killed with the group, so
        nothing keeps running, or holding a port, in the namespace.
        """
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc.pid in self._group_leaders:
            self._group_leaders.discard(proc.pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)
        return proc.returncode

    def call_in(self, ns: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a short-lived thread that has joined ``ns``.

        Sockets created there stay in that namespace for their whole life, whichever thread
        uses them later; the rest of the process never changes namespace.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(NETNS_RUN / self.ns(ns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{ns}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def socket(
        self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A new socket that lives in namespace ``ns``."""
        return self.call_in(ns, lambda: socket.socket(family, type))

    def connect(self, ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from ``ns`` to ``host:port`` (an IP literal)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.socket(ns, family)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 10.0) -> None:
        """Wait until something accepts TCP on ``host:port`` as seen from ``ns``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(ns, host, port, timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing listens on {host}:{port} in {ns}") from None
                time.sleep(0.05)

    # Configuration inside namespaces

    def hosts(self, ns: str, names: Mapping[str, str | Iterable[str]]) -> Path:
        """Write ``/etc/netns/<ns>/hosts`` so ``names`` resolve inside ``ns``.

        ``ip netns exec`` bind-mounts the file over /etc/hosts for every later command. It is
        rewritten in place, so running programs that re-read /etc/hosts see the change too.
        """
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        for name, ips in names.items():
            for ip in [ips] if isinstance(ips, str) else ips:
                lines.append(f"{ip} {name}")
        path = NETNS_ETC / self.ns(ns) / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def redirect(
        self,
        port: int,
        chain: str = "prerouting",
        family: str = "both",
        *,
        ns: str = "router",
        skip_uid: int | None = None,
    ) -> str:
        """Install ``table inet handyproxy_lab``: REDIRECT TCP to local ``port``.

        ``chain`` is ``prerouting`` (traffic routed through ``ns``) or ``output`` (connections
        made by programs in ``ns``). Local destinations are left alone (``fib daddr type
        local return``), so a connection to the listener's own address is not redirected; with
        ``skip_uid`` the sockets of that uid are skipped too (the forwarder's own upstream
        connections in the output chain). ``family`` is ``both``, ``ipv4`` or ``ipv6``. A
        second call replaces the table; the dead connections an earlier redirect left behind
        are forgotten (``forget_reset_connections``). Returns the ruleset text.
        """
        ruleset = redirect_ruleset(port, chain, family, skip_uid)
        script = f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{ruleset}"
        _check(self.argv(ns, ["nft", "-f", "-"]), input=script)
        self.forget_reset_connections(ns)
        return ruleset

    def unredirect(self, ns: str = "router") -> None:
        """Remove the REDIRECT table from ``ns`` (no error when there is none)."""
        script = f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
        _check(self.argv(ns, ["nft", "-f", "-"]), input=script)
        self.forget_reset_connections(ns)

    def forget_reset_connections(self, ns: str = "router") -> None:
        """Delete the redirected TCP connections in state CLOSE from ``ns``'s conntrack table.

        A connection the forwarder ended with a reset (no FIN seen) stays in CLOSE for 10 s,
        still mapped to the port it was redirected to. A client's new SYN from the same port,
        which the kernel may well pick again, matches that entry; conntrack neither forgets
        it (it does so only after a FIN, or a reset from the client) nor applies the current
        REDIRECT, so the SYN goes to the old port and, that forwarder gone, is refused. CLOSE
        entries are dead connections: deleting them touches none that is still open.
        """
        for family in ("ipv4", "ipv6"):
            argv = self.argv(ns, ["conntrack", "-D", "-f", family, "-p", "tcp", "--dst-nat",
                                  "--state", "CLOSE"])  # fmt: skip
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            # conntrack exits 1 when nothing matched
            if proc.returncode != 0 and " 0 flow entries have been deleted" not in proc.stderr:
                raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")


def redirect_ruleset(
    port: int, chain: str = "prerouting", family: str = "both", skip_uid: int | None = None
) -> str:
    """The nftables text ``Lab.redirect`` loads (pure, so it can be checked without root)."""
    if chain not in ("prerouting", "output"):
        raise ValueError(f"chain must be prerouting or output, not {chain!r}")
    match = {"both": "", "ipv4": "meta nfproto ipv4 ", "ipv6": "meta nfproto ipv6 "}
    if family not in match:
        raise ValueError(f"family must be both, ipv4 or ipv6, not {family!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, not {port!r}")
    priority = "dstnat" if chain == "prerouting" else "-100"
    rules = []
    if skip_uid is not None:
        rules.append(f"meta skuid {int(skip_uid)} return")
    rules.append("fib daddr type local return")
    rules.append(f"{match[family]}meta l4proto tcp redirect to :{int(port)}")
    body = "\n".join(f"        {rule}" for rule in rules)
    return (
        f"table inet {NFT_TABLE} {{\n"
        f"    chain {chain} {{\n"
        f"        type nat hook {chain} priority {priority}; policy accept;\n"
        f"{body}\n"
        f"    }}\n"
        f"}}\n"
    )


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _remove_namespaces(names: Iterable[str]) -> None:
    """Kill what still runs in each namespace, delete it and its /etc/netns directory."""
    for ns in names:
        if not (NETNS_RUN / ns).exists():
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            continue
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    with contextlib.suppress(OSError):
        NETNS_ETC.rmdir()  # only when empty: other users may keep files there


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, force: bool = False) -> list[str]:
    """Delete the namespaces of labs whose owner process is gone; returns the names removed.

    Only labs built by this module are considered: each leaves ``/run/handyproxy-lab/<prefix>``
    holding its owner's pid, so namespaces that other tools named alike are never touched.
    ``prefix`` selects labs whose prefix starts with it (the default matches every lab). A lab
    whose owner still runs is kept unless ``force`` is true, so concurrent runs do not pull
    each other's namespaces away.
    """
    removed: list[str] = []
    if not OWNER_DIR.is_dir():
        return removed
    for owner in sorted(OWNER_DIR.iterdir()):
        if not owner.name.startswith(prefix):
            continue
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _pid_alive(pid) and not force:
            continue
        names = [f"{owner.name}-{role}" for role in ROLES]
        present = [ns for ns in names if (NETNS_RUN / ns).exists()]
        _remove_namespaces(names)
        with contextlib.suppress(FileNotFoundError):
            owner.unlink()
        removed.extend(present)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handyproxy.lab up|cleanup``: keep a lab for manual work, or sweep leftovers."""
    parser = argparse.ArgumentParser(
        prog="python -m handyproxy.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="build a lab, print its namespaces, remove it on Ctrl-C")
    clean = sub.add_parser("cleanup", help="delete namespaces left by labs whose owner died")
    clean.add_argument("--prefix", default=DEFAULT_PREFIX)
    clean.add_argument("--force", action="store_true", help="also labs whose owner still runs")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        for name in cleanup_stale(args.prefix, force=args.force):
            print(f"removed {name}")
        return 0
    with Lab() as lab:
        for role, ns in lab.namespaces.items():
            print(f"{role:9} ip netns exec {ns} ...  ({ADDRESSES[4][role]}, {ADDRESSES[6][role]})")
        print("Ctrl-C removes the lab.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
