"""Where a forwarder's CPU goes: under wrk (new tunnels) or iperf3 (bulk), measured, split by
perf, sampled by py-spy and counted by strace.

    sudo .venv/bin/python -m bench.profile [--tool redsocks] [--flags '...'] [--tls] [--bulk]

Builds the benchmark's lab, starts the upstream (tinyproxy for tunnels, squid for bulk, as the
benchmark's figures do) and one forwarder, and drives it through four windows, each watched by
one tool only, because every observer costs the watched process something:

1. nothing watches: the CPU per tunnel (or per GiB), split into user and system time, from
   /proc. These are the profile's figures.
2. ``perf record`` (timer samples of every thread, kernel included; it never stops the process):
   the share of the samples in each part of the process (the kernel, the Python interpreter,
   the event loop, libc, the program itself), for HandyProxy and redsocks alike.
3. ``py-spy record --native`` (HandyProxy only): the top functions by own and inclusive
   samples. py-spy pauses the process to read its stacks, which inflates its CPU (kept as
   ``sampled_cpu_per_*`` for the record, never used as a figure).
4. ``strace -c -f``: the system calls per tunnel (or per GiB).

Prints JSON. A full ``python -m bench`` run takes the profiles of ``FULL_RUN`` this way and
shows them in its report. py-spy is not a dependency of the project: the benchmark installs the
pin in ``requirements-bench.txt`` into its own venv; perf is Debian's ``linux-perf``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.run import (
    HTTPS_PORT,
    ORIGIN_NAME,
    PROXY_PORT,
    UPSTREAM_IP,
    Bench,
)
from bench.tools import (
    PY_SPY,
    Forwarder,
    HandyProxy,
    Redsocks,
    cpu_seconds,
    descendants,
    ensure_bench_venv,
    user_system,
)
from handyproxy.lab import netns as labmod

_FRAME_LINE = re.compile(r":\d+\)$")


def top_functions(raw: str, count: int) -> dict:
    """Own and inclusive sample shares per function from py-spy's ``--format raw`` stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [_FRAME_LINE.sub(")", f) for f in stack.split(";") if f]
        samples = int(n)
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            incl[frame] += samples
    share = lambda c: [  # noqa: E731
        {"function": f, "pct": round(100 * n / total, 1)} for f, n in c.most_common(count)
    ]
    return {"samples": total, "own": share(own), "inclusive": share(incl)}


def strace_table(text: str, units: float) -> list[dict]:
    """strace -c's table as calls per unit (a tunnel, a GiB), busiest first."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            rows.append({"syscall": parts[-1], "per_tunnel": round(calls / max(1e-9, units), 2)})
    rows.sort(key=lambda r: -r["per_tunnel"])
    return rows


#: The parts of a process perf's samples are sorted into, by the object they fall in: the
#: first pattern that matches names the part. Whatever matches none is "other".
PARTS = (
    ("kernel", re.compile(r"^\[kernel")),
    ("Python interpreter", re.compile(r"^libpython")),
    ("event loop (uvloop, libevent)", re.compile(r"^(loop\.cpython|libevent)")),
    ("libc", re.compile(r"^(libc\.so|libm\.so|\[vdso\])")),
    ("Python extensions", re.compile(r"\.cpython-.*\.so$")),
    ("the program", re.compile(r"^(redsocks|python3?(\.\d+)?)$")),
)
_PERF_ROW = re.compile(r"^\s*([\d.]+)%\s+(\S.*?)\s*$")


def perf_parts(report: str, cpu_per_unit: float | None = None) -> list[dict]:
    """``perf report --sort dso``'s shares summed into ``PARTS``, largest first; with
    ``cpu_per_unit`` each part also gets its share of it (``per_unit``, in the unit's scale)."""
    shares: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        m = _PERF_ROW.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        dso = m.group(2)
        part = next((name for name, rx in PARTS if rx.search(dso)), "other")
        shares[part] += float(m.group(1))
    rows = []
    for part, pct in shares.most_common():
        row: dict = {"part": part, "pct": round(pct, 1)}
        if cpu_per_unit is not None:
            row["per_unit"] = round(cpu_per_unit * pct / 100, 3 if cpu_per_unit < 10 else 1)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Spec:
    """One profile: which forwarder, with which flags, under which load."""

    label: str
    tool: str = "handyproxy"  # or "redsocks"
    flags: str = ""  # more HandyProxy flags
    log_level: str = "warning"
    tls: bool = False  # wrk over https to the origin's name (a sniffer reads the SNI)
    bulk: bool = False  # iperf3 one stream, each way, instead of wrk

    def command(self, seconds: int) -> str:
        argv = ["python", "-m", "bench.profile", "--seconds", str(seconds)]
        if self.tool != "handyproxy":
            argv += ["--tool", self.tool]
        if self.flags:
            argv += ["--flags", self.flags]
        if self.log_level != "warning":
            argv += ["--log-level", self.log_level]
        argv += ["--tls"] * self.tls + ["--bulk"] * self.bulk
        return shlex.join(argv)


#: What a full benchmark run profiles, in the order its report shows them.
FULL_RUN = (
    Spec("HandyProxy, HTTP tunnels"),
    Spec("redsocks, HTTP tunnels", tool="redsocks"),
    Spec(
        "HandyProxy -log-level info (one access record per tunnel), HTTP tunnels", log_level="info"
    ),
    Spec(
        "HandyProxy -sniff-timeout 1s, TLS tunnels (the SNI read first)",
        "handyproxy",
        "-sniff-timeout 1s",
        tls=True,
    ),
    Spec("redsocks, TLS tunnels", tool="redsocks", tls=True),
    Spec("HandyProxy, bulk (one iperf3 stream up, then down)", bulk=True),
    Spec("redsocks, bulk (one iperf3 stream up, then down)", tool="redsocks", bulk=True),
)
GIB = 1 << 30


def profile(
    spec: Spec,
    seconds: int = 10,
    py_spy: str | None = None,
    top: int = 25,
    strace: bool = True,
    connections: int = 32,
    source: Path | None = None,
    perf: str | None = "perf",
) -> dict:
    """Run one profile on a lab of its own and return its figures (see the module's doc)."""
    bench_args = argparse.Namespace(nice=0, rate=5000, latency_seconds=3)
    out: dict = {
        "command": spec.command(seconds),
        "tool": spec.tool,
        "flags": spec.flags,
        "log_level": spec.log_level,
        "tls": spec.tls,
        "bulk": spec.bulk,
    }
    if spec.tool != "handyproxy":
        py_spy = None  # C: no interpreter frames to sample
    if perf and not shutil.which(perf):
        out["perf_error"] = f"{perf} is not installed (Debian: linux-perf)"
        perf = None
    with tempfile.TemporaryDirectory(prefix="hpprof-") as tmp, labmod.Lab(prefix=None) as lab:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        b = Bench(lab, bench_args, workdir)
        if source:
            b.env["PYTHONPATH"] = f"{source.resolve()}:{b.env['PYTHONPATH']}"
        b.setup()
        b.start_upstream("squid" if spec.bulk else "tinyproxy")
        upstream = f"{UPSTREAM_IP}:{PROXY_PORT}"
        fw: Forwarder
        if spec.tool == "redsocks":
            fw = Redsocks(name="redsocks", upstream=upstream, port=b.port(), workdir=workdir)
        else:
            fw = HandyProxy(
                name="handyproxy",
                upstream=upstream,
                port=b.port(),
                workdir=workdir,
                log_level=spec.log_level,
                extra=shlex.split(spec.flags),
            )
        proc = b.start_forwarder(fw)
        lab.redirect(fw.port, family="ipv4")
        try:
            pid = proc.pid
            url = f"https://{ORIGIN_NAME}:{HTTPS_PORT}/" if spec.tls else ""

            def load(secs: float) -> tuple[float, dict]:
                """Drive the forwarder for ``secs``: (units done, what the load tool said)."""
                if not spec.bulk:
                    res = b.wrk(connections, secs, url)
                    figures = {k: res[k] for k in ("rps", "requests", "errors")}
                    return max(1, res["requests"]), figures
                half = max(1.0, secs / 2)
                runs = [b.iperf(half, reverse) for reverse in (False, True)]
                moved = sum(r["bytes"] for r in runs)
                errors = [r["error"] for r in runs if "error" in r]
                figures = {"gbps_up_down": [r["gbps"] for r in runs], "bytes": moved}
                return max(1, moved) / GIB, figures | ({"errors": errors} if errors else {})

            load(2)  # warm up
            unit = "gib" if spec.bulk else "tunnel"
            # Per tunnel in microseconds, per GiB in seconds.
            scale = 1 if spec.bulk else 1e6
            places = 3 if spec.bulk else 1

            def measured(secs: float) -> tuple[dict, dict]:
                """Drive ``secs``; the forwarder's CPU per unit over that window, and the load."""
                pids = descendants(pid)
                c0, (u0, s0) = cpu_seconds(pids), user_system(pids)
                units, figures = load(secs)
                pids = descendants(pid)
                cpu = cpu_seconds(pids) - c0
                u1, s1 = user_system(pids)
                return {
                    "user": round(scale * (u1 - u0) / units, places),
                    "system": round(scale * (s1 - s0) / units, places),
                    "cpu": round(scale * cpu / units, places),
                    "cpu_s": round(cpu, 3),
                }, figures

            # 1. Nothing watches: the figures.
            cpu, figures = measured(seconds)
            out["unit"] = unit
            for what in ("user", "system", "cpu"):
                out[f"{what}_per_{unit}"] = cpu[what]
            out["load"] = figures
            out["cpu_s"] = cpu["cpu_s"]
            # 2. perf: which part of the process the CPU time is spent in.
            if perf:
                data = workdir / "perf.data"
                window = max(2, min(seconds, 5))
                pids = ",".join(str(p) for p in descendants(pid))
                rec = subprocess.Popen(
                    [perf, "record", "-q", "-F", "999", "-o", str(data), "-p", pids,
                     "--", "sleep", str(window + 0.5)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                load(window)
                _, err = rec.communicate(timeout=60)
                report = subprocess.run(
                    [perf, "report", "-i", str(data), "--stdio", "--no-children",
                     "--sort", "dso"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                out["perf"] = perf_parts(report.stdout, cpu["cpu"])
                if not out["perf"]:
                    out["perf_error"] = (err + report.stderr)[-300:]
            # 3. py-spy: which functions.
            raw = workdir / "pyspy.txt"
            if py_spy:
                spy = subprocess.Popen(
                    [py_spy, "record", "--native", "--subprocesses", "--rate", "250",
                     "--format", "raw", "--duration", str(seconds + 1),
                     "-o", str(raw), "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                time.sleep(0.5)  # py-spy attaches
                sampled, _ = measured(seconds)
                out[f"sampled_cpu_per_{unit}"] = sampled["cpu"]
                spy.wait(timeout=60)
                out["profile"] = top_functions(raw.read_text() if raw.exists() else "", top)
                if spy.returncode:
                    out["py_spy_error"] = (spy.stderr.read() if spy.stderr else "")[-300:]
            if strace:
                table = workdir / "strace.txt"
                # Every process (a master and its workers): -f follows only children to come.
                traced = [a for p in descendants(pid) for a in ("-p", str(p))]
                st = subprocess.Popen(
                    ["strace", "-c", "-f", "-o", str(table), *traced],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)
                traced_units, _ = load(3)
                st.send_signal(2)
                st.wait(timeout=30)
                out["strace"] = strace_table(table.read_text(), traced_units)[:top]
                out["strace_units"] = round(traced_units, 3)
        finally:
            b.stop_forwarder(proc)
            b.stop_upstream()
    return out


def take(specs: tuple[Spec, ...], seconds: int, say: Callable[[str], None]) -> dict[str, dict]:
    """The profiles of ``specs``, by label; one that fails is kept as its error, not raised.
    The caller has built the benchmark's venv (``ensure_bench_venv``), where py-spy is."""
    out: dict[str, dict] = {}
    for spec in specs:
        say(f"profile: {spec.label}")
        try:
            out[spec.label] = profile(spec, seconds=seconds, py_spy=str(PY_SPY), top=40)
        except Exception as exc:
            say(f"profile {spec.label}: FAILED {exc!r}")
            out[spec.label] = {"command": spec.command(seconds), "error": repr(exc)}
    return out


def problems(profiles: dict[str, dict]) -> list[str]:
    """What ``--check`` fails on: a profile not taken, one whose load had errors or moved
    nothing, a HandyProxy one py-spy took no samples of, or one perf or strace saw nothing of."""
    out = []
    for label, prof in profiles.items():
        load = prof.get("load") or {}
        if prof.get("error"):
            out.append(f"profile {label}: {prof['error']}")
        elif load.get("errors") or not (load.get("requests") or load.get("bytes")):
            out.append(f"profile {label}: load {load}")
        elif prof.get("tool") == "handyproxy" and not (prof.get("profile") or {}).get("samples"):
            out.append(f"profile {label}: py-spy took no samples ({prof.get('py_spy_error')})")
        elif not prof.get("perf"):
            out.append(f"profile {label}: perf sorted nothing ({prof.get('perf_error')})")
        elif not prof.get("strace"):
            out.append(f"profile {label}: strace counted nothing")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--py-spy", default=str(PY_SPY), help="py-spy executable ('': no sampling)")
    p.add_argument("--tool", choices=("handyproxy", "redsocks"), default="handyproxy")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--flags", default="", help="extra HandyProxy flags, e.g. '-sniff-timeout 1s'")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--perf", default="perf", help="perf executable ('': no perf window)")
    p.add_argument("--tls", action="store_true", help="TLS tunnels (wrk over https, named)")
    p.add_argument("--bulk", action="store_true", help="one iperf3 stream each way, not wrk")
    p.add_argument("--source", type=Path, help="run the handyproxy package of this checkout")
    args = p.parse_args(argv)
    if args.py_spy == str(PY_SPY):
        ensure_bench_venv()
    spec = Spec(
        "command line",
        tool=args.tool,
        flags=args.flags,
        log_level=args.log_level,
        tls=args.tls,
        bulk=args.bulk,
    )
    out = profile(
        spec,
        seconds=args.seconds,
        py_spy=args.py_spy or None,
        top=args.top,
        strace=not args.no_strace,
        connections=args.connections,
        source=args.source,
        perf=args.perf or None,
    )
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
