"""Run the HandyProxy benchmark: one lab, every forwarder, every figure, one report.

``.venv/bin/python -m bench`` builds the namespace lab (``handyproxy.lab.netns.Lab``),
starts the
origin servers and the upstream CONNECT proxy (chosen per figure by measurement), starts every
forwarder on its own port, and measures the direct path and each forwarder on the same path,
switching the REDIRECT rule between them in interleaved rounds; it writes ``docs/benchmarks.md``
and ``docs/benchmarks.json``. Everything it starts runs inside the lab and is stopped, and the
lab removed, on any exit.

Why each figure is taken the way it is:

* throughput: one iperf3 TCP stream through the REDIRECT (client→origin and ``-R``);
* CPU per GiB: utime+stime of the forwarder's processes (from /proc) across those two runs,
  divided by the bytes iperf3 delivered; it does not depend on which upstream is used;
* tunnels per second: ``wrk -H 'Connection: close'`` against a tiny origin HTTP server, so every
  request is a new tunnel (REDIRECT, CONNECT, request, response, close); best error-free rate;
* added latency: 1 KiB request/response over 50 open tunnels at a fixed 5,000 req/s, taking
  turns in 50 ms slots with 50 baseline tunnels on which the client speaks CONNECT to the
  upstream itself; added = forwarder percentile minus baseline percentile;
* memory: the forwarder's RSS growth divided by N open idle tunnels (each proven with an echo);
* concurrency: 20,000 tunnels open at once, each proven end to end twice, zero errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.tools import (
    PPROXY,
    REPO,
    UPSTREAMS,
    Forwarder,
    HandyProxy,
    Pproxy,
    Redsocks,
    Upstream,
    cpu_seconds,
    descendants,
    dpkg_version,
    ensure_bench_venv,
    first_line,
    parse_wrk,
    rss_kib,
)
from handyproxy.address import authority
from handyproxy.config import Config
from handyproxy.lab import netns as labmod

ORIGIN = labmod.ORIGIN_V4
ORIGIN_ADDRESS = {4: labmod.ORIGIN_V4, 6: labmod.ORIGIN_V6}
#: What the TLS figure's client asks for (SNI): resolves to the origin in the client and
#: upstream namespaces, so a sniffing forwarder's CONNECT names it and the upstream reaches it.
ORIGIN_NAME = "bench-origin.test"
HTTPS_PORT = 8443
UPSTREAM_IP = labmod.UPSTREAM_V4
IPERF_PORT = 5201
ECHO_PORT = 9000
HTTP_PORT = 8080
PROXY_PORT = 3128
# The hard RLIMIT_NOFILE a process may have; CAP_SYS_RESOURCE is not available to raise it here.
NOFILE_HARD = 20000
# Per-figure upstream when the selection is skipped (--quick / --upstream): the winners so far.
DEFAULT_UPSTREAMS = {"bulk": "squid", "connect": "tinyproxy", "latency": "tinyproxy"}

SYSCTLS_ALL = (
    "net.ipv4.ip_local_port_range=1024 65535",
    # the listeners of the run start late: keep outgoing connections off their ports
    "net.ipv4.ip_local_reserved_ports=3128-3129,5201,8080,8443,9000,12000-12099",
    "net.ipv4.tcp_tw_reuse=1",
    "net.core.somaxconn=65535",
    "net.ipv4.tcp_max_syn_backlog=65535",
)


def log(msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


@dataclass
class Subject:
    """One path under test: a forwarder, or a baseline without one (``forwarder`` None).

    ``via`` marks the upstream-only baseline: the client itself speaks CONNECT (latency only).
    ``raw`` keeps every round; ``aggregate()`` turns them into the figures the report shows.
    """

    name: str
    forwarder: Forwarder | None = None
    via: str | None = None
    family: int = 4  # the client's: 6 sends every figure's traffic to the origin's IPv6 address
    figures: tuple[str, ...] = ("bulk", "connect", "latency", "memory")
    proc: subprocess.Popen[Any] | None = None
    error: str | None = None
    raw: dict[str, list[dict]] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return descendants(self.proc.pid)

    def start(self, bench: Bench) -> None:
        fw = self.forwarder
        assert fw is not None
        self.result.update(
            version=fw.version(),
            argv=shlex.join(fw.argv()),
            workers=fw.workers,
            family=self.family,
            figures=list(self.figures),
        )
        self.proc = bench.start_forwarder(fw)

    def stop(self, bench: Bench) -> None:
        if self.proc is not None:
            self.result["alive_at_end"] = self.proc.poll() is None
            bench.lab.stop(self.proc, timeout=5.0)

    def aggregate(self) -> None:
        res = self.result
        if self.error:
            res["error"] = self.error
        if bulk := [r for r in self.raw.get("bulk", []) if "error" not in r]:
            out: dict[str, Any] = {"rounds": self.raw["bulk"]}
            total_b = total_c = 0.0
            for key in ("up", "down"):
                runs = [r[key] for r in bulk]
                b = sum(r["bytes"] for r in runs)
                c = sum(r.get("cpu_s", 0.0) for r in runs)
                total_b, total_c = total_b + b, total_c + c
                errs = [r["error"] for r in runs if "error" in r]
                out[key] = {
                    "gbps": median([r["gbps"] for r in runs if r["bytes"]]),
                    "gbps_rounds": [r["gbps"] for r in runs],
                    "bytes": b,
                    "cpu_s": c,
                    "cpu_s_per_gib": round(c / (b / 2**30), 3) if b else None,
                    "upstream_cpu_pct": median([r["upstream_cpu_pct"] for r in runs]),
                    **({"error": errs[0]} if errs else {}),
                }
            out["cpu_s_per_gib"] = round(total_c / (total_b / 2**30), 3) if total_b else None
            res["bulk"] = out
        for figure in ("connect", "connect_tls"):
            self.aggregate_connect(figure)
        self.aggregate_latency()

    def aggregate_connect(self, figure: str) -> None:
        res = self.result
        if conn := [r for r in self.raw.get(figure, []) if "error" not in r]:
            runs = []
            for i, c in enumerate(self.args_concurrency(conn)):
                rr = [r["runs"][i] for r in conn]
                detail: dict[str, int] = {}
                for r in rr:
                    for k, v in r["error_detail"].items():
                        detail[k] = detail.get(k, 0) + v
                requests = sum(r["requests"] for r in rr)
                cpu = sum(r.get("cpu_s", 0.0) for r in rr)
                runs.append(
                    {
                        "connections": c,
                        "rps": median([r["rps"] for r in rr]),
                        "rps_rounds": [r["rps"] for r in rr],
                        "requests": requests,
                        "errors": sum(detail.values()),
                        "error_detail": detail,
                        "cpu_s": round(cpu, 2),
                        "cpu_us_per_tunnel": round(1e6 * cpu / requests, 1) if requests else None,
                    }
                )
            clean = [r for r in runs if r["errors"] == 0 and r["requests"]]
            top = max(clean, key=lambda r: r["rps"]) if clean else None
            res[figure] = {
                "runs": runs,
                "best_rps": top["rps"] if top else 0.0,
                "best_connections": top["connections"] if top else None,
                "cpu_s": top["cpu_s"] if top else None,
                "cpu_us_per_tunnel": top["cpu_us_per_tunnel"] if top else None,
            }

    def aggregate_latency(self) -> None:
        res = self.result
        if lat := [r for r in self.raw.get("latency", []) if "p99_us" in r]:
            res["latency"] = {
                k: median([r[k] for r in lat])
                for k in ("p50_us", "p90_us", "p99_us", "p999_us", "achieved_rate")
            }
            res["latency"]["lost"] = sum(r["lost"] for r in lat)
            if paired := [r for r in lat if "added_p50_us" in r]:
                for k in ("added_p50_us", "added_p99_us", "added_p999_us"):
                    res["latency"][k] = median([r[k] for r in paired])
                for k in ("p50_us", "p99_us"):
                    res["latency"]["paired_" + k] = median([r["paired"][k] for r in paired])
            res["latency"]["rounds"] = self.raw["latency"]
        elif self.raw.get("latency"):
            res["latency"] = {"error": str(self.raw["latency"][-1].get("error"))[:200]}

    @staticmethod
    def args_concurrency(conn: list[dict]) -> list[int]:
        return [r["connections"] for r in conn[0]["runs"]]


class Bench:
    """One benchmark run inside one lab."""

    def __init__(self, lab: labmod.Lab, args: argparse.Namespace, workdir: Path) -> None:
        self.lab = lab
        self.args = args
        self.workdir = workdir
        self.python = sys.executable
        self.env = dict(os.environ, PYTHONPATH=str(REPO))
        self.upstream: Upstream | None = None
        self.upstream_proc: subprocess.Popen[Any] | None = None
        self.next_port = 12000
        self.upstreams_used: dict[str, dict[str, str]] = {}

    # Lab plumbing

    def sysctl(self, ns: str, *settings: str, check: bool = True) -> None:
        proc = self.lab.run(ns, ["sysctl", "-q", "-w", *settings], capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"sysctl in {ns}: {proc.stderr.strip()}")

    def setup(self) -> None:
        for role in labmod.ROLES:
            self.sysctl(role, *SYSCTLS_ALL)
        # Without -B iperf3 listens on both families (one dual-stack socket).
        self.bg("origin", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        names = {ORIGIN_NAME: ORIGIN}
        self.lab.hosts("client", names)
        self.lab.hosts("upstream", names)
        cert, key = self.workdir / "origin.crt", self.workdir / "origin.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={ORIGIN_NAME}", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        for kind, host, port, procs in (
            ("echo", labmod.ORIGIN_V6, ECHO_PORT, 2),
            ("http", labmod.ORIGIN_V6, HTTP_PORT, 1),
        ):
            self.bg("origin", [self.python, "-m", "bench.servers", kind, "--host", host,
                               "--port", str(port), "--procs", str(procs)])  # fmt: skip
        self.bg("origin", [self.python, "-m", "bench.servers", "http", "--host", ORIGIN,
                           "--port", str(HTTPS_PORT), "--procs", "2",
                           "--cert", str(cert), "--key", str(key)])  # fmt: skip
        self.bg(
            "origin",
            [
                self.python,
                "-m",
                "bench.servers",
                "echo",
                "--host",
                ORIGIN,
                "--port",
                str(ECHO_PORT),
                "--procs",
                "4",
            ],
        )
        self.bg(
            "origin",
            [
                self.python,
                "-m",
                "bench.servers",
                "http",
                "--host",
                ORIGIN,
                "--port",
                str(HTTP_PORT),
                "--procs",
                "2",
            ],
        )
        for port, count in ((IPERF_PORT, 1), (ECHO_PORT, 2), (HTTP_PORT, 2), (HTTPS_PORT, 1)):
            self.wait_listen("origin", port, count=count)

    def cmd(self, argv: list[str]) -> list[str]:
        """Every program of the run gets the same priority (``--nice``): on a shared machine
        a raised priority keeps other work from being what the figures measure."""
        return ["nice", "-n", str(self.args.nice), *argv] if self.args.nice else argv

    def bg(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        return self.lab.popen(ns, self.cmd(argv), cwd=REPO, env=self.env, **kwargs)

    def wait_listen(
        self,
        ns: str,
        port: int,
        count: int = 1,
        timeout: float = 15.0,
        proc: subprocess.Popen[Any] | None = None,
    ) -> None:
        """Wait until ``count`` sockets listen on ``port`` (without connecting to them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.lab.run(
                ns, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True
            ).stdout
            if len(out.strip().splitlines()) >= count:
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before listening")
            time.sleep(0.05)
        raise TimeoutError(f"nothing listens on port {port} in {ns}")

    def tcp_counters(self) -> dict[str, dict[str, int]]:
        """Listen-queue overflows and retransmission counters per namespace (for diagnosis)."""
        keys = (
            "TcpExtListenOverflows",
            "TcpExtListenDrops",
            "TcpRetransSegs",
            "TcpExtTCPSynRetrans",
            "TcpExtTCPTimeouts",
            "TcpAttemptFails",
            "TcpExtTCPAbortOnMemory",
            "TcpExtTW",
            "TcpExtTCPBacklogDrop",
        )
        out: dict[str, dict[str, int]] = {}
        for role in labmod.ROLES:
            text = self.lab.run(
                role, ["nstat", "-asz", *keys], capture_output=True, text=True
            ).stdout
            vals = {}
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] in keys and parts[1].isdigit():
                    vals[parts[0]] = int(parts[1])
            out[role] = vals
        return out

    def routed(self, on: bool) -> None:
        """Let the kernel route client↔origin and client↔upstream (the no-forwarder baselines).

        The lab deliberately has no such route; it exists only while baselines run.
        """
        verb = "replace" if on else "del"
        routes = (
            ("router", "198.18.0.0/24", labmod.UPSTREAM_V4),
            ("upstream", "198.51.100.0/24", labmod.ROUTER_UPSTREAM_V4),
            ("origin", "198.51.100.0/24", labmod.UPSTREAM_ORIGIN_V4),
        )
        for ns, net, via in routes:
            self.lab.run(ns, ["ip", "route", verb, net, "via", via], capture_output=True)
        for ns in ("router", "upstream"):
            self.sysctl(ns, f"net.ipv4.ip_forward={int(on)}")

    # Upstream proxy

    def start_upstream(self, name: str, workers: int = 1) -> Upstream:
        self.stop_upstream()
        up = UPSTREAMS[name](
            name=name, listen=f"{UPSTREAM_IP}:{PROXY_PORT}", workdir=self.workdir, workers=workers
        )
        err = open(self.workdir / f"upstream-{name}.log", "ab")  # noqa: SIM115
        self.upstream_proc = self.bg("upstream", up.argv(), stderr=err)
        self.upstream = up
        self.wait_listen(
            "upstream",
            PROXY_PORT,
            timeout=15.0 if workers == 1 else 90.0,  # SMP kids start slowly on a loaded box
            proc=None if workers > 1 else self.upstream_proc,
        )
        time.sleep(0.5 if workers == 1 else 2.0)  # SMP kids attach after the master listens
        return up

    def stop_upstream(self) -> None:
        if self.upstream is not None and (stop := self.upstream.stop_argv()):
            self.lab.run("upstream", stop, capture_output=True)
            time.sleep(1.0)
        if self.upstream_proc is not None:
            self.lab.stop(self.upstream_proc)
        if self.upstream is not None and self.upstream.workers > 1:
            # A daemonized squid is not our child: sweep what still runs in the namespace.
            pids = self.lab.run(
                "upstream",
                ["ip", "netns", "pids", self.lab.ns("upstream")],
                capture_output=True,
                text=True,
            ).stdout.split()
            for pid in pids:
                if self.cmdline(int(pid)).startswith(("squid", "(squid")):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
        if self.upstream is not None:
            self.upstream.cleanup()
        self.upstream = self.upstream_proc = None

    def upstream_pids(self) -> list[int]:
        if self.upstream_proc is None:
            return []
        if self.upstream is not None and self.upstream.workers > 1:
            out = subprocess.run(
                ["ip", "netns", "pids", self.lab.ns("upstream")], capture_output=True, text=True
            ).stdout.split()
            return [int(p) for p in out if "squid" in self.cmdline(int(p))]
        return descendants(self.upstream_proc.pid)

    @staticmethod
    def cmdline(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    # Forwarder under test

    def start_forwarder(self, fw: Forwarder, attempts: int = 2) -> subprocess.Popen[Any]:
        """Start ``fw`` in the router; one retry, since a start can fail on a loaded machine."""
        logf = self.workdir / f"{fw.name}.log"
        for attempt in range(attempts):
            with open(logf, "ab") as err:
                proc = self.bg("router", fw.argv(), stderr=err)
            try:
                self.wait_listen("router", fw.port, proc=proc)
                break
            except (RuntimeError, TimeoutError) as exc:
                self.lab.stop(proc)
                tail = logf.read_text(errors="replace")[-300:]
                if attempt + 1 == attempts:
                    raise RuntimeError(f"{exc}; log: {tail}") from None
                log(f"{fw.name} did not start ({exc}); log: {tail}; retrying")
                time.sleep(1.0)
        time.sleep(0.5 if fw.workers == 1 else 1.5)
        return proc

    def stop_forwarder(self, proc: subprocess.Popen[Any]) -> None:
        self.lab.unredirect()
        self.lab.stop(proc, timeout=5.0)

    # Load tools

    def iperf(self, seconds: float, reverse: bool, family: int = 4) -> dict:
        origin = ORIGIN_ADDRESS[family]
        argv = ["iperf3", "-c", origin, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
        if reverse:
            argv.append("-R")
        proc = self.lab.run(
            "client", self.cmd(argv), capture_output=True, text=True, timeout=seconds + 30
        )
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return {"error": (proc.stderr or proc.stdout).strip()[:200], "bytes": 0, "gbps": 0.0}
        if "error" in data:
            return {"error": data["error"], "bytes": 0, "gbps": 0.0}
        recv = data["end"]["sum_received"]
        return {
            "bytes": int(recv["bytes"]),
            "seconds": round(recv["seconds"], 2),
            "gbps": round(recv["bits_per_second"] / 1e9, 3),
        }

    def wrk(self, connections: int, seconds: float, url: str = "") -> dict:
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-H",
            "Connection: close",
            url or f"http://{ORIGIN}:{HTTP_PORT}/",
        ]
        proc = self.lab.run(
            "client", self.cmd(argv), capture_output=True, text=True, timeout=seconds + 30
        )
        out = parse_wrk(proc.stdout)
        out["connections"] = connections
        return out

    def latency(
        self,
        via: str | None = None,
        seconds: float | None = None,
        paired: str | None = None,
        family: int = 4,
    ) -> dict:
        """One latency probe; with ``paired`` the baseline path (CONNECT to that proxy) takes
        turns with the measured one inside the same client (see loadgen.run_latency)."""
        a = self.args
        seconds = seconds or a.latency_seconds
        argv = [self.python, "-m", "bench.loadgen", "latency", "--target",
                authority(ORIGIN_ADDRESS[family], ECHO_PORT), "--rate", str(a.rate),
                "--tunnels", "50",
                "--size", "1024", "--duration", str(seconds), "--warmup", "1"]  # fmt: skip
        if via:
            argv += ["--via", via]
        if paired:
            argv += ["--paired-via", paired]
        proc = self.lab.run("client", self.cmd(argv), capture_output=True, text=True,
                            cwd=REPO, env=self.env, timeout=seconds + 60)  # fmt: skip
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return {"error": proc.stderr.strip()[-300:]}

    def hold(
        self,
        count: int,
        pids_of: Any,
        via: str | None = None,
        timeout: float = 30.0,
        concurrency: int = 100,
        deadline: float = 90.0,
        family: int = 4,
    ) -> dict:
        """Open ``count`` idle tunnels; RSS of ``pids_of()`` before and while they are open."""
        per_proc = 4500  # each client process stays well under the 20,000-file limit
        nprocs = max(1, -(-count // per_proc))
        shares = [count // nprocs + (1 if i < count % nprocs else 0) for i in range(nprocs)]
        time.sleep(1.0)
        before = rss_kib(pids_of())
        procs = []
        t0 = time.monotonic()
        for share in shares:
            argv = [
                self.python,
                "-m",
                "bench.loadgen",
                "hold",
                "--target",
                authority(ORIGIN_ADDRESS[family], ECHO_PORT),
                "--count",
                str(share),
                "--concurrency",
                str(concurrency),
                "--timeout",
                str(timeout),
                "--deadline",
                str(deadline),
            ]
            if via:
                argv += ["--via", via]
            procs.append(
                self.bg(
                    "client",
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=None,
                    text=True,
                )
            )
        result: dict[str, Any] = {"n": count, "client_processes": nprocs}
        try:
            opened = [json.loads(p.stdout.readline() or "{}") for p in procs]
            result["open_seconds"] = round(time.monotonic() - t0, 2)
            result["established"] = sum(o.get("established", 0) for o in opened)
            result["open_errors"] = sum(o.get("errors", count) for o in opened)
            kinds: dict[str, int] = {}
            for o in opened:
                for k, v in o.get("error_kinds", {}).items():
                    kinds[k] = kinds.get(k, 0) + v
            result["error_kinds"] = kinds
            time.sleep(1.0)
            pids = pids_of()
            after = rss_kib(pids)
            result.update(
                rss_before_kib=before,
                rss_after_kib=after,
                processes=len(pids),
                kib_per_tunnel=round((after - before) / max(1, result["established"]), 2),
            )
            for p in procs:
                p.stdin.write("check\n")
                p.stdin.flush()
            checked = [json.loads(p.stdout.readline() or "{}") for p in procs]
            result["alive_after_check"] = sum(c.get("alive", 0) for c in checked)
            result["check_errors"] = sum(c.get("errors", 0) for c in checked)
            result["errors"] = result["open_errors"] + result["check_errors"]
        finally:
            for p in procs:
                with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                    p.stdin.write("close\n")
                    p.stdin.flush()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
                self.lab.stop(p)
        time.sleep(2.0)  # let the closes drain before the next figure
        return result

    # Interleaved rounds: every path measured once per round, so background load that drifts
    # during the run (this is a shared 2-core machine) hits every tool alike.

    def activate(self, path: Subject) -> None:
        if path.forwarder is None:
            self.lab.unredirect()
            self.routed(True)
        else:
            self.routed(False)
            family = "ipv6" if path.family == 6 else "ipv4"
            self.lab.redirect(path.forwarder.port, family=family)
            self.sysctl("router", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=5", check=False)

    def rounds(self, paths: list[Subject], figure: str, fn: Any) -> None:
        paths = [p for p in paths if figure in p.figures]
        for r in range(self.args.rounds):
            for path in paths:
                if path.error:
                    continue
                self.activate(path)
                log(f"round {r + 1}/{self.args.rounds} {figure}: {path.name}")
                try:
                    path.raw.setdefault(figure, []).append(fn(path))
                except Exception as exc:  # keep the other paths' figures
                    log(f"{path.name}: {figure} failed: {exc!r}")
                    path.raw.setdefault(figure, []).append({"error": repr(exc)})
        self.routed(False)

    def bulk_once(self, path: Subject) -> dict:
        out: dict[str, Any] = {}
        up_pids = self.upstream_pids()
        for key, reverse in (("up", False), ("down", True)):
            pids = path.pids()
            c0, u0, t0 = cpu_seconds(pids), cpu_seconds(up_pids), time.monotonic()
            r = self.iperf(self.args.iperf_seconds, reverse, path.family)
            wall = time.monotonic() - t0
            r["cpu_s"] = round(cpu_seconds(path.pids()) - c0, 3)
            r["upstream_cpu_pct"] = round(100 * (cpu_seconds(up_pids) - u0) / wall, 1)
            out[key] = r
            time.sleep(0.3)
        return out

    def connect_once(self, path: Subject, tls: bool = False) -> dict:
        if tls:
            url = f"https://{ORIGIN_NAME}:{HTTPS_PORT}/"
        else:
            url = f"http://{authority(ORIGIN_ADDRESS[path.family], HTTP_PORT)}/"
        runs = []
        for c in self.args.connect_concurrency:
            c0 = cpu_seconds(path.pids())
            r = self.wrk(c, self.args.connect_seconds, url)
            r["cpu_s"] = round(cpu_seconds(path.pids()) - c0, 3)
            runs.append(r)
            time.sleep(0.5)
        return {"runs": runs}

    def connect_tls_once(self, path: Subject) -> dict:
        return self.connect_once(path, tls=True)

    def latency_once(self, path: Subject) -> dict:
        if path.forwarder is None:
            return self.latency(via=path.via)
        # The paired baseline (client → upstream with its own CONNECT) must bypass the REDIRECT
        # and be routed by the router; the origin network stays unreachable except via proxies.
        self.lab.run(
            "router",
            [
                "nft",
                "insert",
                "rule",
                "inet",
                labmod.NFT_TABLE,
                "prerouting",
                "ip",
                "daddr",
                UPSTREAM_IP,
                "return",
            ],
            check=True,
        )
        self.lab.run(
            "upstream",
            ["ip", "route", "replace", "198.51.100.0/24", "via", labmod.ROUTER_UPSTREAM_V4],
        )
        self.sysctl("router", "net.ipv4.ip_forward=1")
        try:
            return self.latency(paired=f"{UPSTREAM_IP}:{PROXY_PORT}", family=path.family)
        finally:
            self.routed(False)

    def memory(self, path: Subject, key: str = "memory", count: int | None = None) -> None:
        count = count or self.args.idle_n
        self.activate(path)
        log(f"{path.name}: memory, {count} idle tunnels")
        path.result.setdefault("idle_rss_kib", rss_kib(path.pids()))
        path.result[key] = self.hold(count, path.pids, family=path.family)

    def use_upstream(self, spec: str) -> None:
        """Switch the upstream proxy (same address) unless ``spec`` already runs."""
        name, _, w = spec.partition(":")
        up = self.upstream
        if up is not None and up.name == name and up.workers == int(w or 1):
            return
        log(f"upstream proxy now {spec}")
        self.start_upstream(name, workers=int(w or 1))
        self.upstreams_used[spec] = {
            "version": self.upstream.version() if self.upstream else "",
            "argv": shlex.join(self.upstream.argv()) if self.upstream else "",
        }

    def run_paths(self, paths: list[Subject], upstreams: dict[str, str]) -> None:
        for path in paths:
            if path.forwarder is not None:
                try:
                    path.start(self)
                except Exception as exc:
                    log(f"{path.name}: does not start: {exc!r}")
                    path.error = repr(exc)
        fwd = [p for p in paths if p.forwarder is not None]
        self.use_upstream(upstreams["bulk"])
        for path in fwd:
            if not path.error and "memory" in path.figures:
                self.memory(path)
        big = [p for p in fwd if not p.error and isinstance(p.forwarder, HandyProxy)]
        if big and self.args.idle_n_big:
            self.memory(big[0], "memory_big", self.args.idle_n_big)
        self.rounds([p for p in paths if p.via is None], "bulk", self.bulk_once)
        self.use_upstream(upstreams["connect"])
        self.rounds([p for p in paths if p.via is None], "connect", self.connect_once)
        self.rounds([p for p in paths if p.via is None], "connect_tls", self.connect_tls_once)
        self.use_upstream(upstreams["latency"])
        self.rounds(paths, "latency", self.latency_once)
        self.lab.unredirect()
        for path in fwd:
            path.stop(self)
            path.aggregate()

    def select_upstream(self, names: list[str]) -> dict:
        """Each candidate upstream behind redsocks (a fixed, fast C forwarder): pick the best."""
        results: dict[str, Any] = {}
        for spec in names:
            name, _, w = spec.partition(":")
            log(f"upstream candidate {spec}")
            try:
                up = self.start_upstream(name, workers=int(w or 1))
            except (RuntimeError, TimeoutError) as exc:
                results[spec] = {"error": str(exc)}
                continue
            fw = Redsocks(
                name="redsocks-selection",
                upstream=f"{UPSTREAM_IP}:{PROXY_PORT}",
                port=self.port(),
                workdir=self.workdir,
            )
            try:
                proc = self.start_forwarder(fw)
            except RuntimeError as exc:
                results[spec] = {"error": str(exc)[:300]}
                self.stop_upstream()
                continue
            self.lab.redirect(fw.port, family="ipv4")
            try:
                up_pids = self.upstream_pids()
                u0, t0 = cpu_seconds(up_pids), time.monotonic()
                bulk = self.iperf(3, reverse=False)
                bulk["upstream_cpu_pct"] = round(
                    100 * (cpu_seconds(up_pids) - u0) / (time.monotonic() - t0), 1
                )
                f0, u0, t0 = (
                    cpu_seconds(descendants(proc.pid)),
                    cpu_seconds(up_pids),
                    time.monotonic(),
                )
                conn = self.wrk(32, 3)
                wall = time.monotonic() - t0
                lat = self.latency(seconds=2)
                results[spec] = {
                    "version": up.version(),
                    "gbps": bulk.get("gbps"),
                    "latency_p50_us": lat.get("p50_us"),
                    "latency_p99_us": lat.get("p99_us"),
                    "bulk": bulk,
                    "connect_rps": conn["rps"],
                    "connect_errors": conn["errors"],
                    "connect_upstream_cpu_pct": round(100 * (cpu_seconds(up_pids) - u0) / wall, 1),
                    "connect_forwarder_cpu_pct": round(
                        100 * (cpu_seconds(descendants(proc.pid)) - f0) / wall, 1
                    ),
                }
            finally:
                self.stop_forwarder(proc)
                self.stop_upstream()
            log(f"upstream {spec}: {results[spec]}")
            time.sleep(1.0)
        # Each figure gets the upstream that limits it least: no candidate is best at all three.
        # Rates swing with the machine's background load; the upstream's CPU cost per GiB and
        # per tunnel (from /proc) barely does, so the choice is made on cost.
        chosen = dict(DEFAULT_UPSTREAMS)
        for r in results.values():
            if r.get("gbps"):
                r["upstream_cpu_s_per_gib"] = round(
                    r["bulk"]["upstream_cpu_pct"]
                    / 100
                    * r["bulk"]["seconds"]
                    / (r["bulk"]["bytes"] / 2**30),
                    3,
                )
            if r.get("connect_rps"):
                r["upstream_cpu_us_per_tunnel"] = round(
                    1e4 * r["connect_upstream_cpu_pct"] / r["connect_rps"], 1
                )
        if ok := {n: r for n, r in results.items() if r.get("upstream_cpu_s_per_gib")}:
            chosen["bulk"] = min(ok, key=lambda n: ok[n]["upstream_cpu_s_per_gib"])
        if ok := {
            n: r
            for n, r in results.items()
            if r.get("upstream_cpu_us_per_tunnel") and not r.get("connect_errors")
        }:
            chosen["connect"] = min(ok, key=lambda n: ok[n]["upstream_cpu_us_per_tunnel"])
        if ok := {n: r for n, r in results.items() if r.get("latency_p50_us") is not None}:
            chosen["latency"] = min(ok, key=lambda n: ok[n]["latency_p50_us"])
        return {"candidates": results, "chosen": chosen}

    def concurrency(self, count: int, workers: int) -> dict:
        """20,000 tunnels at once: needs processes that each stay under the open-file limit."""
        log(f"concurrency: {count} tunnels, handyproxy -workers {workers}, squid SMP")
        self.start_upstream("squid", workers=max(2, -(-count * 2 // 18000)))
        fw = HandyProxy(
            name=f"handyproxy-w{workers}",
            upstream=f"{UPSTREAM_IP}:{PROXY_PORT}",
            port=self.port(),
            workdir=self.workdir,
            workers=workers,
            python=self.python,
        )
        proc = self.start_forwarder(fw)
        self.lab.redirect(fw.port, family="ipv4")
        try:
            before = self.tcp_counters()
            res = self.hold(
                count, lambda: descendants(proc.pid), timeout=60.0, concurrency=50, deadline=240.0
            )
            after = self.tcp_counters()
            res["tcp_counters"] = {
                ns: {
                    k: v - before[ns].get(k, 0) for k, v in vals.items() if v - before[ns].get(k, 0)
                }
                for ns, vals in after.items()
            }
            res["forwarder"] = shlex.join(fw.argv())
            res["upstream"] = f"squid workers={self.upstream.workers if self.upstream else '?'}"
            res["alive_at_end"] = proc.poll() is None
        finally:
            self.stop_forwarder(proc)
            self.stop_upstream()
        log(f"concurrency: {res}")
        return res

    def port(self) -> int:
        self.next_port += 1
        return self.next_port


def summary(out: dict) -> str:
    b, c, lat, m = (out.get(k, {}) for k in ("bulk", "connect", "latency", "memory"))
    return (
        f"up {b.get('up', {}).get('gbps')} Gbit/s, down {b.get('down', {}).get('gbps')}, "
        f"cpu/GiB {b.get('cpu_s_per_gib')}, tunnels/s {c.get('best_rps')}, "
        f"p50/p99 {lat.get('p50_us')}/{lat.get('p99_us')} us, "
        f"KiB/tunnel {m.get('kib_per_tunnel')} (errors {m.get('errors')})"
    )


def problems(result: dict) -> list[str]:
    """Every row the run should have measured and did not, or measured with errors.

    ``--check`` (the test command's smoke run) fails on these: it proves the benchmark still
    runs end to end, and asserts nothing about speed.
    """
    out: list[str] = []
    rows = {
        "direct": (result.get("baseline", {}).get("direct", {}), ("bulk", "connect", "latency")),
        "upstream only": (result.get("baseline", {}).get("upstream_only", {}), ("latency",)),
    }
    for name, res in result.get("tools", {}).items():
        rows[name] = (res, tuple(res.get("figures", ("bulk", "connect", "latency", "memory"))))
    for name, (res, figures) in rows.items():
        if res.get("error"):
            out.append(f"{name}: {res['error']}")
            continue
        for fig in figures:
            got = res.get(fig)
            if not got or got.get("error"):
                out.append(f"{name}: {fig} not measured ({(got or {}).get('error', 'missing')})")
            elif fig == "bulk":
                out += [f"{name}: bulk {k} moved nothing" for k in ("up", "down")
                        if not got[k].get("bytes") or got[k].get("error")]  # fmt: skip
            elif fig in ("connect", "connect_tls"):
                errors = sum(r["errors"] for r in got["runs"])
                if errors or not got["best_rps"]:
                    out.append(f"{name}: {fig} had {errors} errors, best {got['best_rps']}/s")
            elif fig == "latency":
                if got.get("lost") or got.get("p99_us") is None:
                    out.append(f"{name}: latency lost {got.get('lost')} round trips")
            elif fig == "memory" and (got.get("errors") or not got.get("established")):
                out.append(f"{name}: memory had {got.get('errors')} errors")
    if "concurrency" in result:
        conc = result["concurrency"]
        if conc.get("error") or conc.get("errors") or not conc.get("established"):
            out.append(f"concurrency: {conc.get('error') or conc.get('errors')} errors")
    from bench import profile as profiling  # it imports this module

    out += profiling.problems(result.get("profiles") or {})
    return out


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024 // 1024} GiB"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "memory": mem,
        "os": first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "load_before": open("/proc/loadavg").read().split()[:3],
        "nofile_hard_limit": NOFILE_HARD,
    }


def versions(args: argparse.Namespace) -> dict:
    import uvloop

    return {
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "handyproxy": first_line([sys.executable, "-m", "handyproxy", "-version"]),
        "redsocks": dpkg_version("redsocks"),
        "pproxy": first_line([str(PPROXY), "--version"]),
        "squid": dpkg_version("squid"),
        "tinyproxy": dpkg_version("tinyproxy"),
        "iperf3": dpkg_version("iperf3"),
        "wrk": dpkg_version("wrk"),
    }


#: What a variant row adds to HandyProxy's command line, and how the row is named.
VARIANTS = {
    "sniff": ["-sniff-timeout", "1s"],
    "info": ["-log-level", "info"],
    "metrics": ["-metrics-address", "127.0.0.1:0"],
}
ALL_FIGURES = ("bulk", "connect", "connect_tls", "latency", "memory")


def has_metrics() -> bool:
    """Whether this checkout's forwarder has -metrics-address (its row is measured then)."""
    return "metrics_address" in {f.name for f in dataclasses.fields(Config)}


def default_tools() -> str:
    tools = "handyproxy,handyproxy:2,redsocks,pproxy,handyproxy:sniff,handyproxy:info,handyproxy@6"
    return tools + (",handyproxy:metrics" if has_metrics() else "")


def forwarders(args: argparse.Namespace, b: Bench) -> list[Subject]:
    """``handyproxy[:WORKERS][:RELAY][:sniff|info|metrics][@6]``, ``redsocks``, ``pproxy``.

    A variant (sniffing, access logging, metrics) changes only the per-tunnel work, so its row
    measures tunnels per second (plain and TLS); ``@6`` measures every figure with an IPv6
    client. The TLS figure is taken for the single-process HandyProxy and redsocks rows.
    """
    up = f"{UPSTREAM_IP}:{PROXY_PORT}"
    out: list[Subject] = []
    for spec in args.tools.split(","):
        spec, _, fam = spec.partition("@")
        family = int(fam or 4)
        name, *opts = spec.split(":")
        workers = next((int(o) for o in opts if o.isdigit()), 1)
        variants = [o for o in opts if o in VARIANTS]
        relay = next((o for o in opts if not o.isdigit() and o not in VARIANTS), None)
        extra = [arg for v in variants if v != "info" for arg in VARIANTS[v]]
        label = (
            name
            + (f" -workers {workers}" if workers > 1 else "")
            + (f" -relay {relay}" if relay else "")
            + "".join(" " + " ".join(VARIANTS[v]) for v in variants)
            + (" (IPv6 client)" if family == 6 else "")
        )
        if variants:
            figures: tuple[str, ...] = ("connect", "connect_tls")
        elif family == 6:
            figures = ("bulk", "connect", "latency", "memory")
        elif workers == 1 and name in ("handyproxy", "redsocks"):
            figures = ALL_FIGURES
        else:
            figures = ("bulk", "connect", "latency", "memory")
        fw: Forwarder
        if name == "handyproxy":
            fw = HandyProxy(
                name=label,
                upstream=up,
                port=b.port(),
                workdir=b.workdir,
                workers=workers,
                python=sys.executable,
                relay=relay,
                log_level="info" if "info" in variants else "warning",
                extra=extra,
            )
        elif name == "redsocks":
            fw = Redsocks(name=label, upstream=up, port=b.port(), workdir=b.workdir)
        elif name == "pproxy":
            fw = Pproxy(name=label, upstream=up, port=b.port(), workdir=b.workdir)
        else:
            raise SystemExit(f"unknown tool {name!r}")
        out.append(Subject(label, forwarder=fw, family=family, figures=figures))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="short runs, 1,000 idle tunnels, no upstream selection, no 20k run",
    )
    p.add_argument(
        "--tools",
        default=default_tools(),
        help="comma list of handyproxy[:WORKERS][:RELAY][:sniff|info|metrics][@6], redsocks, "
        "pproxy",
    )
    p.add_argument(
        "--upstream", choices=sorted(UPSTREAMS), help="skip the selection and use this upstream"
    )
    p.add_argument("--candidates", default="squid,squid:2,tinyproxy,builtin")
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value for every program of the run (0: leave priorities alone)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds per figure (3; quick: 1)")
    p.add_argument("--idle-n", type=int, help="idle tunnels for the memory figure")
    p.add_argument("--concurrent-n", type=int, help="tunnels for the concurrency check (0: skip)")
    p.add_argument("--concurrent-workers", type=int, default=4)
    p.add_argument("--out", type=Path, help="markdown path (JSON goes next to it)")
    p.add_argument(
        "--profile-seconds",
        type=int,
        help="length of each profile the run takes (bench.profile.FULL_RUN; 10, quick: one of "
        "2 s; 0 skips them)",
    )
    p.add_argument(
        "--earlier-profiles",
        type=Path,
        default=REPO / "docs" / "benchmarks-profile.json",
        help="profiles taken earlier (python -m bench.profile, collected into one JSON) to show "
        "after this run's",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every row was measured with zero errors (never a timing check)",
    )
    args = p.parse_args(argv)
    if args.quick:
        # A smoke run (every row measured, zero errors), not figures: as short as still measures.
        args.iperf_seconds, args.connect_seconds, args.latency_seconds = 1, 1, 1
        args.rounds = args.rounds or 1
        args.connect_concurrency = [32]
        args.idle_n = args.idle_n or 1000
        args.idle_n_big = 0
        args.concurrent_n = 0 if args.concurrent_n is None else args.concurrent_n
        args.out = args.out or Path(tempfile.gettempdir()) / "handyproxy-bench-quick.md"
        args.profile_seconds = 2 if args.profile_seconds is None else args.profile_seconds
    else:
        args.iperf_seconds, args.connect_seconds, args.latency_seconds = 3, 3, 4
        args.rounds = args.rounds or 3
        args.connect_concurrency = [16, 64]
        # redsocks keeps two splice pipes per tunnel (6 fds): 3,000 is what it can hold under the
        # 20,000-file limit; HandyProxy (2 fds per tunnel) is also measured at 9,000.
        args.idle_n = args.idle_n or 3000
        args.idle_n_big = 9000
        args.concurrent_n = 20000 if args.concurrent_n is None else args.concurrent_n
        args.out = args.out or REPO / "docs" / "benchmarks.md"
        args.profile_seconds = 10 if args.profile_seconds is None else args.profile_seconds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing := labmod.missing_requirements():
        print("bench needs " + ", ".join(missing), file=sys.stderr)
        return 2
    ensure_bench_venv()
    command = ".venv/bin/python -m bench" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "versions": versions(args),
    }
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hpbench-") as tmp, labmod.Lab(prefix=None) as lab:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        b = Bench(lab, args, workdir)
        b.setup()
        log(f"lab {lab.prefix} up; machine {result['machine']}")
        if args.upstream:
            chosen = dict.fromkeys(DEFAULT_UPSTREAMS, args.upstream)
            result["upstream_selection"] = {"chosen": chosen, "candidates": {}}
        elif args.quick:
            result["upstream_selection"] = {"chosen": dict(DEFAULT_UPSTREAMS), "candidates": {}}
        else:
            result["upstream_selection"] = b.select_upstream(args.candidates.split(","))
        chosen = result["upstream_selection"]["chosen"]
        result["settings"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        }
        direct = Subject("direct (no forwarder)", figures=("bulk", "connect", "latency"))
        up_only = Subject(
            "upstream only (client CONNECTs)",
            via=f"{UPSTREAM_IP}:{PROXY_PORT}",
            figures=("latency",),
        )
        tools = forwarders(args, b)
        b.run_paths([direct, up_only, *tools], chosen)
        result["upstream"] = {"per_figure": chosen, "used": b.upstreams_used}
        direct.aggregate()
        up_only.aggregate()
        result["baseline"] = {"direct": direct.result, "upstream_only": up_only.result}
        result["tools"] = {t.name: t.result for t in tools}
        for t in tools:
            log(f"{t.name}: {summary(t.result)}")
        b.stop_upstream()
        if args.concurrent_n:
            try:
                result["concurrency"] = b.concurrency(args.concurrent_n, args.concurrent_workers)
            except Exception as exc:
                log(f"concurrency: FAILED {exc!r}")
                result["concurrency"] = {"error": repr(exc), "n": args.concurrent_n}
        for name in ("squid", "redsocks"):
            logf = workdir / (f"squid-{PROXY_PORT}/cache.log" if name == "squid" else f"{name}.log")
            with contextlib.suppress(OSError):
                result.setdefault("logs_tail", {})[name] = logf.read_text()[-1500:]
    if args.profile_seconds:
        from bench import profile as profiling  # it imports this module

        specs = profiling.FULL_RUN[:1] if args.quick else profiling.FULL_RUN
        result["profiles"] = profiling.take(specs, args.profile_seconds, log)
    result["seconds"] = round(time.monotonic() - t0, 1)
    if not args.quick and args.earlier_profiles and args.earlier_profiles.exists():
        result["profiles_earlier"] = json.loads(args.earlier_profiles.read_text())
    with open("/proc/loadavg") as f:
        result["machine"]["load_after"] = f.read().split()[:3]
    out_md = Path(args.out)
    out_json = out_md.with_suffix(".json")
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    out_md.write_text(report.render(result))
    log(f"wrote {out_md} and {out_json} in {result['seconds']} s")
    if args.check:
        if bad := problems(result):
            for line in bad:
                log(f"check: {line}")
            return 1
        log("check: every row measured, zero errors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
