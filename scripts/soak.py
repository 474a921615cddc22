#!/usr/bin/env python3
"""Soak: minutes of mixed traffic through the forwarder on the namespace lab, then proof that
nothing leaked.

    .venv/bin/python scripts/soak.py                  # as root: the full 10-minute soak
    .venv/bin/python scripts/soak.py --duration 30    # the CI smoke run
    .venv/bin/python scripts/soak.py --relay copy --json soak.json

Why a script and not a test: ten minutes does not fit the CI budget, and an operator may want to
soak a candidate build for an hour. CI runs it for 30 s (tests/reliability/test_soak_smoke.py).

The lab: client → router (handyproxy, REDIRECT) → upstream (handyproxy.lab.connect_proxy, an
honest CONNECT proxy that passes resets on) → origin (handyproxy.lab.origin: reproducible
downloads), started with the test kit (tests/kit). The forwarder gets a NOTIFY_SOCKET of our
own, so the tunnel count it reports to systemd (``STATUS=N tunnels open``) can be read and
checked against the kernel's socket count.

Traffic (``--clients`` workers, each picking at random, in the client namespace):
  short      small download (1-64 KiB), must arrive intact, clean end
  long       0.5-3 MiB at 2 MiB/s, intact, clean end
  half-close request then SHUT_WR at once; the whole answer must still arrive
  reset      start a download, read a little, close with RST
  origin-rst the origin resets mid-body; the client must see a reset, never a clean end
  idle       connect, send a request line, say nothing more for a while, then close
Any download that ends cleanly but short, or with wrong bytes, is counted as ``corrupt``.

Pass criteria, checked after the traffic stops and the forwarder is quiet:
  - no corrupt transfer, and the forwarder process still runs;
  - the reported tunnel count is 0 and the kernel holds no established socket in the router
    namespace, so no tunnel leaked; during the run the two counts agree (sampled);
  - socket descriptors are back at the idle baseline;
  - resident memory at the end is within ``--rss-slack`` (default 25 %, at least 8 MiB) of what it
    was after the warm-up (the first fifth of the run), i.e. no growth with traffic.
Exit status 0 on pass, 1 on failure; a JSON summary goes to stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test kit
sys.path.insert(0, str(REPO))

from handyproxy.lab.netns import ORIGIN_V4 as ORIGIN  # noqa: E402
from handyproxy.lab.netns import ORIGIN_V6 as ORIGIN6  # noqa: E402
from handyproxy.lab.origin import payload  # noqa: E402
from handyproxy.relay import RELAYS  # noqa: E402
from handyproxy.sockets import reset_socket  # noqa: E402

KINDS = {"short": 30, "long": 10, "half-close": 20, "reset": 15, "origin-rst": 10, "idle": 15}
#: Every tunnel ends within this after the traffic stops (idle timeout 2 s, half-close 5 s,
#: the forwarder's one-second tick).
QUIET_WITHIN = 15.0


# --- traffic generator (runs inside the client namespace) --------------------------------------


async def download(
    host: str,
    size: int,
    seed: int,
    *,
    rate: int = 0,
    half_close: bool = False,
    reset_at: int = -1,
    abort_after: int = -1,
) -> str:
    """One HTTP/1.0 download from the lab's origin; returns an outcome name."""
    reader, writer = await asyncio.open_connection(host, 80)
    local = writer.get_extra_info("sockname")
    query = f"size={size}&seed={seed}" + (f"&rate={rate}" if rate else "")
    if reset_at >= 0:
        query += f"&reset={reset_at}"
    writer.write(f"GET /dl?{query} HTTP/1.0\r\nHost: origin.test\r\n\r\n".encode())
    if half_close:
        writer.write_eof()
    body = bytearray()
    head = b""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        while chunk := await reader.read(65536):
            body += chunk
            if 0 <= abort_after <= len(body):
                reset_socket(writer.get_extra_info("socket"))
                writer.transport.abort()
                return "reset-sent"
    except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
        writer.transport.abort()
        if isinstance(exc, asyncio.IncompleteReadError) and not head:
            print(
                f"corrupt: clean end before the header, size={size} half_close={half_close}",
                file=sys.stderr,
                flush=True,
            )
            return "corrupt"  # a clean end before even the header
        expected = payload(seed, size)
        if not expected.startswith(bytes(body)):
            return "corrupt"
        if reset_at >= 0:
            return "reset-seen"
        print(
            f"unexpected-reset: client-port={local[1]} size={size} got={len(body)}",
            file=sys.stderr,
            flush=True,
        )
        return "unexpected-reset"
    writer.close()
    if bytes(body) != payload(seed, size):
        print(
            f"corrupt: size={size} got={len(body)} half_close={half_close} host={host}",
            file=sys.stderr,
            flush=True,
        )
        return "corrupt"  # a clean end with missing or wrong bytes: silent data loss
    return "ok" if reset_at < 0 else "corrupt"


async def idle(host: str, seconds: float) -> str:
    _reader, writer = await asyncio.open_connection(host, 80)
    writer.write(b"GET /dl?size=1")  # an unfinished request line
    await asyncio.sleep(seconds)
    writer.close()
    return "idle-done"


async def worker(
    deadline: float, rng: random.Random, counts: dict[str, int], only: list[str]
) -> None:
    kinds = only or list(KINDS)
    weights = [KINDS[k] for k in kinds]
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        host = ORIGIN6 if rng.random() < 0.3 else ORIGIN
        seed = rng.randrange(1 << 30)
        try:
            if kind == "short":
                result = await download(host, rng.randint(1, 64 * 1024), seed)
            elif kind == "long":
                result = await download(
                    host, rng.randint(512 * 1024, 3 * 1024 * 1024), seed, rate=2 * 1024 * 1024
                )
            elif kind == "half-close":
                result = await download(host, rng.randint(1, 512 * 1024), seed, half_close=True)
            elif kind == "reset":
                result = await download(
                    host,
                    4 * 1024 * 1024,
                    seed,
                    rate=4 * 1024 * 1024,
                    abort_after=rng.randint(1, 256 * 1024),
                )
            elif kind == "origin-rst":
                size = rng.randint(64 * 1024, 1024 * 1024)
                result = await download(host, size, seed, reset_at=rng.randint(0, size - 1))
            else:
                result = await idle(host, rng.uniform(0.1, 3.0))
        except OSError as exc:
            # Only the kinds that break connections on purpose may see errors.
            expected = kind in ("reset", "origin-rst", "idle")
            result = ("error-" if expected else "unexpected-error-") + type(exc).__name__
        counts[f"{kind}:{result}"] = counts.get(f"{kind}:{result}", 0) + 1


async def traffic(duration: float, clients: int, seed: int, only: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    deadline = time.monotonic() + duration
    rngs = [random.Random(seed + i) for i in range(clients)]
    await asyncio.gather(*(worker(deadline, rng, counts, only) for rng in rngs))
    return counts


def traffic_main(args: argparse.Namespace) -> int:
    counts = asyncio.run(traffic(args.duration, args.clients, args.seed, args.kinds))
    print(json.dumps(counts), flush=True)
    return 0


# --- the soak (runs in the root namespace, drives the lab) --------------------------------------


def established(lab: Any, ns: str) -> int:
    out = lab.run(ns, ["ss", "-Htn", "state", "established"], capture_output=True, text=True)
    return len(out.stdout.splitlines())


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from kit import forwarder, origins, upstreams
    from kit.notify import NotifySocket
    from kit.waiting import wait_until

    from handyproxy.lab.netns import Lab

    result: dict[str, Any] = {"duration": args.duration, "relay": args.relay, "failures": []}
    fail = result["failures"].append
    with NotifySocket() as status, tempfile.TemporaryDirectory() as www, Lab() as lab:
        upstreams.launch(lab, "builtin", quiet=True)
        origins.launch(lab, "http", Path(www), quiet=True)  # only /dl is asked for
        fwd = forwarder.launch(
            lab,
            "-relay",
            args.relay,
            "-idle-timeout",
            "2s",
            "-half-close-timeout",
            "5s",
            env=status.env,
        )
        status.messages.wait_for("^READY=1$")
        lab.redirect(fwd.port)
        base_sockets = fwd.fd_count()
        base_rss = fwd.rss_kib()
        gen = lab.popen(
            "client",
            [
                sys.executable,
                __file__,
                "_traffic",
                "--duration",
                str(args.duration),
                "--clients",
                str(args.clients),
                "--seed",
                str(args.seed),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        samples = []
        warm_rss = None
        started = time.monotonic()
        period = min(5.0, max(1.0, args.duration / 20))
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                gen.wait(period)  # a sample every period until the traffic ends
            if gen.poll() is not None:
                break
            elapsed = time.monotonic() - started
            sample = {
                "t": round(elapsed, 1),
                "rss_kib": fwd.rss_kib(),
                "sockets": fwd.fd_count(),
                "reported": status.open_tunnels(),
                "kernel_established": established(lab, "router"),
            }
            samples.append(sample)
            if warm_rss is None and elapsed >= args.duration / 5:
                warm_rss = sample["rss_kib"]
            if not fwd.alive():
                fail("the forwarder died during the soak")
                break
            # The forwarder reports tunnels at most once a second and the kernel keeps two
            # sockets per tunnel (minus ones being set up), so compare loosely while busy.
            if sample["reported"] is not None and sample["kernel_established"] > 2 * (
                sample["reported"] + args.clients
            ):
                fail(f"kernel holds more sockets than the reported tunnels explain: {sample}")
        out, err = gen.communicate(timeout=60)
        try:
            counts = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            counts = {}
            fail(f"traffic generator failed: {err[-2000:]}")
        result["generator_stderr"] = err.splitlines()[-50:]
        result["traffic"] = counts
        # Quiet: every tunnel must end; what remains after QUIET_WITHIN is reported below.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: status.open_tunnels() == 0 and established(lab, "router") == 0,
                QUIET_WITHIN,
                interval=0.2,
            )
        end = {
            "rss_kib": fwd.rss_kib(),
            "sockets": fwd.fd_count(),
            "reported": status.open_tunnels(),
            "kernel_established": established(lab, "router"),
        }
        result.update(
            baseline={"rss_kib": base_rss, "sockets": base_sockets},
            warm_rss_kib=warm_rss,
            end=end,
            samples=samples,
            alive=fwd.alive(),
        )
        if not fwd.alive():
            fail("the forwarder is not running at the end")
        if end["reported"] != 0:
            fail(f"the forwarder still reports open tunnels: {status.last_status()!r}")
        if end["kernel_established"] != 0:
            fail(f"{end['kernel_established']} established sockets left in the router namespace")
        if end["sockets"] != base_sockets:
            fail(f"socket descriptors {end['sockets']} != baseline {base_sockets}")
        reference = warm_rss or base_rss
        slack = max(8 * 1024, reference * args.rss_slack)
        if end["rss_kib"] > reference + slack:
            fail(f"RSS grew from {reference} KiB to {end['rss_kib']} KiB")
        corrupt = {k: v for k, v in counts.items() if "corrupt" in k or "unexpected" in k}
        if corrupt:
            fail(f"transfers that lost data or ended wrongly: {corrupt}")
        total = sum(counts.values())
        result["transfers"] = total
        if total < args.duration:  # at least about one per second even on a slow machine
            fail(f"only {total} transfers ran")
        records = fwd.records()
        ends: dict[str, int] = {}
        for record in records:
            key = record.get("end", "?") + (f"/{record['reason']}" if "reason" in record else "")
            ends[key] = ends.get(key, 0) + 1
        result["forwarder_ends"] = ends
        ports = {
            line.split("client-port=")[1].split()[0]
            for line in result["generator_stderr"]
            if "client-port=" in line
        }
        result["unexpected_records"] = [
            r for r in records if r.get("client", "").rsplit(":", 1)[-1] in ports
        ]
        tracebacks = [line for line in fwd.log.lines if "Traceback" in line]
        if tracebacks:
            fail(f"{len(tracebacks)} tracebacks in the forwarder's log")
    result["passed"] = not result["failures"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode", nargs="?", default="soak", choices=["soak", "_traffic"], help=argparse.SUPPRESS
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent traffic workers")
    parser.add_argument("--relay", default="splice", choices=list(RELAYS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--kinds",
        action="append",
        default=[],
        choices=sorted(KINDS),
        help="only this kind of traffic (repeatable; default: the mix)",
    )
    parser.add_argument(
        "--rss-slack",
        type=float,
        default=0.25,
        help="allowed RSS growth after warm-up, as a fraction (default 0.25)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary here")
    args = parser.parse_args(argv)
    if args.mode == "_traffic":
        return traffic_main(args)
    if os.geteuid() != 0:
        print("soak.py needs root (network namespaces)", file=sys.stderr)
        return 2
    result = soak(args)
    summary = {k: v for k, v in result.items() if k != "samples"}
    summary["samples"] = result.get("samples", [])[-3:]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
