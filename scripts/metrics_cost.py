"""What metrics cost a tunnel.

In process: the hooks a tunnel calls (sniffed, connected, ended) with metrics on (prometheus-client
in multiprocess mode, writing its mmap files) and off, and the once-a-second tick per open tunnel.
With ``--lab ROUNDS`` (root): the forwarder's CPU per tunnel on the benchmark's path (bench.run's
lab, tinyproxy upstream, wrk with one tunnel per request), with and without -metrics-address, in
interleaved rounds; the median of each is printed.

    .venv/bin/python scripts/metrics_cost.py [--tunnels 200000] [--lab 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ from a checkout

from handyproxy import config, metrics
from handyproxy.tunnel import Hub
from handyproxy.upstream import UpstreamSet


class Tunnel:
    """What the hooks read of a tunnel: its relay's byte counts."""

    def __init__(self) -> None:
        self.relay = SimpleNamespace(bytes_up=517, bytes_down=4096)


def per_tunnel(record: object, tunnels: list[Tunnel]) -> float:
    """CPU microseconds per tunnel for the three hooks a proxied, sniffed tunnel calls."""
    sniffed, connected, ended = record.sniffed, record.connected, record.ended  # type: ignore[attr-defined]
    first = b"\x16\x03\x01"
    start = time.process_time()
    for tunnel in tunnels:
        sniffed(first, "origin.test")
        connected(0.0042)
        ended(tunnel, "eof", None)
    return (time.process_time() - start) / len(tunnels) * 1e6


def per_open_tunnel_tick(record: metrics.Recorder, hub: Hub, rounds: int) -> float:
    start = time.process_time()
    for _ in range(rounds):
        record.tick(hub)
    return (time.process_time() - start) / rounds / max(1, len(hub.tunnels)) * 1e6


def on_the_lab(rounds: int) -> None:
    """CPU per tunnel of the whole forwarder, metrics off and on, on the benchmark's path."""
    from bench import run as bench
    from bench.tools import HandyProxy, cpu_seconds
    from handyproxy.lab import netns

    @dataclass
    class WithMetrics(HandyProxy):
        def argv(self) -> list[str]:
            return [*super().argv(), "-metrics-address", "127.0.0.1:0"]

    args = bench.parse_args(["--quick", "--rounds", str(rounds)])
    args.connect_concurrency = [16]
    with tempfile.TemporaryDirectory(prefix="hpmetrics-") as tmp, netns.Lab(prefix=None) as lab:
        os.chmod(tmp, 0o755)
        b = bench.Bench(lab, args, Path(tmp))
        b.setup()
        up = f"{bench.UPSTREAM_IP}:{bench.PROXY_PORT}"
        paths = [
            bench.Subject(
                name, forwarder=cls(name=name, upstream=up, port=b.port(), workdir=b.workdir)
            )
            for name, cls in (("off", HandyProxy), ("on", WithMetrics))
        ]
        for path in paths:
            path.start(b)
        b.start_upstream("tinyproxy")

        def once(path: bench.Subject) -> dict:
            c0 = cpu_seconds(path.pids())
            r = b.wrk(16, args.connect_seconds)
            r["us_per_tunnel"] = (cpu_seconds(path.pids()) - c0) / max(1, r["requests"]) * 1e6
            return r

        b.rounds(paths, "connect", once)
        for path in paths:
            path.stop(b)
        b.stop_upstream()
    for path in paths:
        runs = path.raw["connect"]
        us = [round(r["us_per_tunnel"]) for r in runs]
        rps = [round(r["rps"]) for r in runs]
        errors = sum(r["errors"] for r in runs)
        print(
            f"forwarder CPU per tunnel, metrics {path.name}: median {statistics.median(us)} us "
            f"(rounds {us}; tunnels/s {rps}; errors {errors})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=200_000)
    parser.add_argument("--open", type=int, default=10_000, help="open tunnels for the tick")
    parser.add_argument("--lab", type=int, default=0, metavar="ROUNDS", help="also on the lab")
    args = parser.parse_args()
    tunnels = [Tunnel() for _ in range(args.tunnels)]
    with tempfile.TemporaryDirectory() as runtime:
        os.environ["RUNTIME_DIRECTORY"] = runtime  # where prepare() makes its directory
        cfg = config.build({"metrics-address": "127.0.0.1:0"})
        hub = Hub(config=cfg, listen_ports=set(), upstreams=UpstreamSet.from_config(cfg))
        off = per_tunnel(metrics.OFF, tunnels)
        metrics.prepare(cfg)
        metrics.attach(hub)
        on = per_tunnel(metrics.record, tunnels)
        hub.tunnels.update(Tunnel() for _ in range(args.open))
        tick = per_open_tunnel_tick(metrics.record, hub, 20)
        metrics.shutdown()
        del os.environ["RUNTIME_DIRECTORY"]
    print(f"hooks per tunnel, metrics off: {off:.2f} us CPU")
    print(f"hooks per tunnel, metrics on:  {on:.2f} us CPU (+{on - off:.2f} us)")
    print(f"tick per open tunnel per second: {tick:.3f} us CPU ({args.open} open)")
    if args.lab:
        on_the_lab(args.lab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
