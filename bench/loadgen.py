"""Client-side load generators for the benchmark, run inside the client namespace.

* ``latency``: open-loop paced 1 KiB request/response over already-open tunnels at a fixed rate;
  every round trip is timed from the moment its request was written, so a slow forwarder cannot
  hide behind a slower request rate (the rate is fixed, requests pipeline when replies lag).
* ``hold``: open N tunnels, prove each one end to end with a small echo, keep them idle, then on
  command (stdin ``check``) prove them again and (stdin ``close``) close them. The orchestrator
  reads the forwarder's RSS while they are idle.

``--via HOST:PORT`` makes the client speak CONNECT itself to that proxy (the "upstream only"
baseline: the same path minus the transparent forwarder).
Output is one JSON object per line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time

import uvloop

from handyproxy.address import split_hostport

perf = time.perf_counter


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile(limit: int = 262144) -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    except (ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Tunnel(asyncio.Protocol):
    """One client connection; with ``via`` it first asks the proxy for a CONNECT tunnel."""

    def __init__(self, target: str, via: bool, size: int) -> None:
        self.target = target
        self.via = via
        self.size = size
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.received = 0
        self.pending: collections.deque[float] = collections.deque()
        self.samples: list[float] | None = None
        self.measure_from = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.via:
            req = f"CONNECT {self.target} HTTP/1.1\r\nHost: {self.target}\r\n\r\n"
            transport.write(req.encode())  # type: ignore[attr-defined]
        else:
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.ready.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.head.split(b" ", 2)[1:2]
            if status != [b"200"]:
                self.ready.set_exception(ConnectionError(f"CONNECT {status!r}"))
                return
            data = self.head[end + 4 :]
            self.ready.set_result(None)
            if not data:
                return
        self.received += len(data)
        now = perf()
        size = self.size
        while self.received >= size and self.pending:
            self.received -= size
            sent = self.pending.popleft()
            if self.samples is not None and sent >= self.measure_from:
                self.samples.append(now - sent)
        if self.waiter is not None and not self.pending and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, payload: bytes) -> None:
        self.pending.append(perf())
        self.transport.write(payload)  # type: ignore[union-attr]

    async def roundtrip(self, payload: bytes, timeout: float) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        self.send(payload)
        await asyncio.wait_for(self.waiter, timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        err = exc or ConnectionError("closed")
        if not self.ready.done():
            self.ready.set_exception(err)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(err)


async def open_tunnel(args: argparse.Namespace, size: int, via_proxy: str | None = "") -> Tunnel:
    """A tunnel to the target, through ``via_proxy`` with CONNECT when given ("" = ``--via``)."""
    loop = asyncio.get_running_loop()
    proxy = args.via if via_proxy == "" else via_proxy
    via = proxy is not None
    host, port = split_hostport(proxy or args.target)
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: Tunnel(args.target, via, size), host, port),
        args.timeout,
    )
    await asyncio.wait_for(proto.ready, args.timeout)
    return proto


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[idx]


def stats(samples: list[float]) -> dict:
    us = sorted(x * 1e6 for x in samples)
    return {
        "measured": len(us),
        "p50_us": round(percentile(us, 50), 1),
        "p90_us": round(percentile(us, 90), 1),
        "p99_us": round(percentile(us, 99), 1),
        "p999_us": round(percentile(us, 99.9), 1),
        "max_us": round(us[-1], 1) if us else None,
        "mean_us": round(sum(us) / len(us), 1) if us else None,
    }


async def run_latency(args: argparse.Namespace) -> dict:
    """Pace ``--rate`` requests/s over the tunnels. With ``--paired-via`` a second set of tunnels
    speaks CONNECT to that proxy (the baseline), and the two sets take turns in ``--slice``
    second slots: the load stays at ``--rate`` at every moment, and scheduling noise from other
    work on the machine lands on both sets alike, so the difference of their percentiles is
    what the forwarder adds.
    """
    size = args.size
    payload = b"x" * size
    sets = [await asyncio.gather(*(open_tunnel(args, size) for _ in range(args.tunnels)))]
    if args.paired_via:
        sets.append(
            await asyncio.gather(
                *(open_tunnel(args, size, args.paired_via) for _ in range(args.tunnels))
            )
        )
    for tunnels in sets:  # warm every path once before timing
        for t in tunnels:
            await t.roundtrip(payload, args.timeout)
    samples: list[list[float]] = [[] for _ in sets]
    t0 = perf()
    for tunnels, bucket in zip(sets, samples, strict=True):
        for t in tunnels:
            t.samples = bucket
            t.measure_from = t0 + args.warmup
    end = t0 + args.warmup + args.duration
    sent = 0
    n = args.tunnels
    while True:
        now = perf()
        if now >= end:
            break
        due = int((now - t0) * args.rate)
        while sent < due:
            turn = int(sent / args.rate / args.slice) % len(sets)
            sets[turn][sent % n].send(payload)
            sent += 1
        await asyncio.sleep(0.0005)
    everything = [t for tunnels in sets for t in tunnels]
    deadline = perf() + args.timeout
    while perf() < deadline and any(t.pending for t in everything):
        await asyncio.sleep(0.01)
    out = {
        "mode": "latency",
        "rate": args.rate,
        "sent": sent,
        "achieved_rate": round(sent / (args.warmup + args.duration), 1),
        "lost": sum(len(t.pending) for t in sets[0]),
        "closed": sum(t.closed for t in sets[0]),
        **stats(samples[0]),
    }
    if args.paired_via:
        base = stats(samples[1])
        base["lost"] = sum(len(t.pending) for t in sets[1])
        out["paired"] = base
        for key in ("p50_us", "p99_us", "p999_us"):
            out["added_" + key] = round(out[key] - base[key], 1)
    for t in everything:
        t.transport.close()  # type: ignore[union-attr]
    return out


async def run_hold(args: argparse.Namespace) -> None:
    payload = b"p" * 16
    sem = asyncio.Semaphore(args.concurrency)
    tunnels: list[Tunnel] = []
    errors: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        async with sem:
            try:
                t = await open_tunnel(args, len(payload))
                await t.roundtrip(payload, args.timeout)
                tunnels.append(t)
            except Exception as exc:  # counted, reported, never hidden
                errors[type(exc).__name__ + ":" + str(exc)[:60]] += 1

    t0 = perf()
    jobs = [asyncio.ensure_future(one()) for _ in range(args.count)]
    _, late = await asyncio.wait(jobs, timeout=args.deadline)
    for job in late:  # a bounded run: what is not open by the deadline is an error
        job.cancel()
    if late:
        errors["deadline"] += len(late)
        await asyncio.wait(late)
    emit(
        {
            "phase": "open",
            "established": len(tunnels),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors.most_common(5)),
            "seconds": round(perf() - t0, 2),
        }
    )
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.strip()
        if cmd == "check":
            errors.clear()

            async def ping(t: Tunnel) -> None:
                async with sem:
                    try:
                        await t.roundtrip(payload, args.timeout)
                    except Exception as exc:
                        errors[type(exc).__name__] += 1

            t0 = perf()
            await asyncio.gather(*(ping(t) for t in tunnels))
            emit(
                {
                    "phase": "check",
                    "alive": len(tunnels) - sum(errors.values()),
                    "errors": sum(errors.values()),
                    "error_kinds": dict(errors),
                    "seconds": round(perf() - t0, 2),
                }
            )
        else:  # "close" or EOF: the orchestrator is done with us
            for t in tunnels:
                if t.transport is not None:
                    t.transport.close()
            await asyncio.sleep(0.2)
            emit({"phase": "closed"})
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=["latency", "hold"])
    parser.add_argument("--target", required=True, help="origin HOST:PORT (what the client dials)")
    parser.add_argument("--via", help="speak CONNECT to this proxy HOST:PORT instead")
    parser.add_argument(
        "--paired-via", help="latency: also time a baseline set through this CONNECT proxy"
    )
    parser.add_argument("--slice", type=float, default=0.05, help="latency: paired turn, s")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tunnels", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument(
        "--deadline",
        type=float,
        default=120.0,
        help="hold: seconds to open all tunnels; the rest count as errors",
    )
    args = parser.parse_args(argv)
    raise_nofile()
    if args.mode == "latency":
        emit(uvloop.run(run_latency(args)))
    else:
        uvloop.run(run_hold(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
