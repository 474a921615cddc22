"""Where one tunnel's set-up CPU goes: HandyProxy under wrk, sampled by py-spy, counted by strace.

    sudo .venv/bin/python -m bench.profile --py-spy /tmp/pyspy/bin/py-spy [--flags '...']

Builds the benchmark's lab, starts tinyproxy and one HandyProxy, drives new tunnels with
``wrk -H 'Connection: close'`` (one tunnel per request) and, over the same window, samples the
forwarder with ``py-spy record --native`` (Python and C frames) and, in a second window,
counts its system calls with ``strace -c -f``. Prints JSON: CPU per tunnel, the top functions
by own time and by inclusive time, and the system calls per tunnel. py-spy is not a dependency
of the project: install it into a scratch venv (``python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip
install py-spy``). strace's tracing slows the forwarder, so the CPU figure comes from the
py-spy window (py-spy samples from outside, without stopping the process).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import (
    HTTP_PORT,
    HTTPS_PORT,
    ORIGIN,
    ORIGIN_NAME,
    PROXY_PORT,
    UPSTREAM_IP,
    Bench,
)
from bench.tools import (
    Forwarder,
    HandyProxy,
    Redsocks,
    cpu_seconds,
    descendants,
    parse_wrk,
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


def strace_table(text: str, tunnels: int) -> list[dict]:
    """strace -c's table as calls per tunnel, busiest first."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            rows.append({"syscall": parts[-1], "per_tunnel": round(calls / max(1, tunnels), 2)})
    rows.sort(key=lambda r: -r["per_tunnel"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--py-spy", help="path of the py-spy executable (none: no sampling)")
    p.add_argument("--tool", choices=("handyproxy", "redsocks"), default="handyproxy")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--flags", default="", help="extra HandyProxy flags, e.g. '-sniff-timeout 1s'")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--tls", action="store_true", help="TLS tunnels (wrk over https, named)")
    p.add_argument("--source", type=Path, help="run the handyproxy package of this checkout")
    args = p.parse_args(argv)
    bench_args = argparse.Namespace(nice=0, rate=5000, latency_seconds=3)
    out: dict = {
        "command": "python -m bench.profile "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "flags": args.flags,
        "log_level": args.log_level,
        "tls": args.tls,
    }
    with tempfile.TemporaryDirectory(prefix="hpprof-") as tmp, labmod.Lab(prefix=None) as lab:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        b = Bench(lab, bench_args, workdir)
        if args.source:
            b.env["PYTHONPATH"] = f"{args.source.resolve()}:{b.env['PYTHONPATH']}"
        b.setup()
        b.start_upstream("tinyproxy")
        upstream = f"{UPSTREAM_IP}:{PROXY_PORT}"
        fw: Forwarder
        if args.tool == "redsocks":
            fw = Redsocks(name="redsocks", upstream=upstream, port=b.port(), workdir=workdir)
        else:
            fw = HandyProxy(
                name="handyproxy",
                upstream=upstream,
                port=b.port(),
                workdir=workdir,
                log_level=args.log_level,
            )
            extra = shlex.split(args.flags)
            fw_argv = fw.argv
            fw.argv = lambda: [*fw_argv(), *extra]  # type: ignore[method-assign]
        proc = b.start_forwarder(fw)
        lab.redirect(fw.port, family="ipv4")
        try:
            pid = proc.pid
            url = f"https://{ORIGIN_NAME}:{HTTPS_PORT}/" if args.tls else ""
            b.wrk(args.connections, 2, url)  # warm up
            raw = workdir / "pyspy.txt"
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [args.py_spy, "record", "--native", "--subprocesses", "--rate", "250",
                     "--format", "raw", "--duration", str(args.seconds + 1),
                     "-o", str(raw), "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                time.sleep(0.5)  # py-spy attaches
            c0, (u0, s0) = cpu_seconds(descendants(pid)), user_system(descendants(pid))
            wrk = b.wrk(args.connections, args.seconds, url)
            cpu = cpu_seconds(descendants(pid)) - c0
            u1, s1 = user_system(descendants(pid))
            n = max(1, wrk["requests"])
            out["user_us_per_tunnel"] = round(1e6 * (u1 - u0) / n, 1)
            out["system_us_per_tunnel"] = round(1e6 * (s1 - s0) / n, 1)
            if spy is not None:
                spy.wait(timeout=60)
            out["wrk"] = {k: wrk[k] for k in ("rps", "requests", "errors")}
            out["cpu_s"] = round(cpu, 3)
            out["cpu_us_per_tunnel"] = round(1e6 * cpu / max(1, wrk["requests"]), 1)
            out["profile"] = top_functions(raw.read_text() if raw.exists() else "", args.top)
            if spy is not None and spy.returncode:
                out["py_spy_error"] = (spy.stderr.read() if spy.stderr else "")[-300:]
            if not args.no_strace:
                table = workdir / "strace.txt"
                # Every process (a master and its workers): -f follows only children to come.
                traced = [a for p in descendants(pid) for a in ("-p", str(p))]
                st = subprocess.Popen(
                    ["strace", "-c", "-f", "-o", str(table), *traced],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)
                url = url or f"http://{ORIGIN}:{HTTP_PORT}/"
                argv_wrk = ["wrk", "-t1", f"-c{args.connections}", "-d3s", "-H",
                            "Connection: close", url]  # fmt: skip
                res = parse_wrk(lab.run("client", argv_wrk, capture_output=True, text=True).stdout)
                st.send_signal(2)
                st.wait(timeout=30)
                out["strace"] = strace_table(table.read_text(), res["requests"])[: args.top]
                out["strace_tunnels"] = res["requests"]
        finally:
            b.stop_forwarder(proc)
            b.stop_upstream()
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
