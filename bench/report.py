"""Turn one benchmark result (the JSON ``run.py`` writes) into ``docs/benchmarks.md``.

Kept apart from the measuring so a table can be re-rendered without rerunning:
``python -m bench.report docs/benchmarks.json > docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def handy_rows(tools: dict) -> dict[str, dict]:
    """HandyProxy's plain rows (IPv4 client, no variant): the ones ``best`` picks among."""
    return {
        n: t
        for n, t in tools.items()
        if n.startswith("handyproxy") and "error" not in t and not is_extra(t)
    }


def is_extra(t: dict) -> bool:
    """A variant (sniffing, logging, metrics) or IPv6-client row, with its own target rows."""
    return t.get("family", 4) != 4 or "bulk" not in t.get("figures", ["bulk"])


def measured(tools: dict, figure: str) -> list[tuple[str, dict]]:
    """The rows that measured ``figure`` (a variant row measures only tunnels per second)."""
    return [(n, t) for n, t in tools.items() if figure in t.get("figures", [figure]) or figure in t]


def best(rows: dict[str, dict], keys: tuple[str, ...], lower: bool = False) -> tuple[str, Any]:
    vals = [(n, get(t, *keys)) for n, t in rows.items() if get(t, *keys) is not None]
    if not vals:
        return "n/a", None
    pick = min(vals, key=lambda v: v[1]) if lower else max(vals, key=lambda v: v[1])
    return pick


def ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def added(lat: dict | None, base: dict | None, key: str) -> float | None:
    """The paired figure (baseline timed in step) when there is one, else a difference."""
    if lat and lat.get("added_" + key) is not None:
        return lat["added_" + key]
    if not lat or not base or lat.get(key) is None or base.get(key) is None:
        return None
    return round(lat[key] - base[key], 1)


def run_profile(res: dict, tool: str, tls: bool = False, bulk: bool = False) -> dict:
    """This run's profile of ``tool`` for that load, with no flags when there is one, or {}."""
    found = [
        prof
        for prof in (res.get("profiles") or {}).values()
        if (prof.get("tool"), prof.get("tls"), prof.get("bulk")) == (tool, tls, bulk)
        and not prof.get("error")
    ]
    found.sort(key=lambda p: bool(p.get("flags")) or p.get("log_level", "warning") != "warning")
    return found[0] if found else {}


def split_reason(res: dict, tls: bool = False, bulk: bool = False) -> str:
    """Why CPU per tunnel (per GiB) is what it is, from this run's profiles: where perf found
    HandyProxy's time against redsocks', part by part, and the system calls each made."""
    mine, ref = run_profile(res, "handyproxy", tls, bulk), run_profile(res, "redsocks", tls, bulk)
    if not mine or not ref:
        return "no profile of this load in this run (see 'Where the CPU goes')"
    unit, digits, sfx = ("GiB", 3, " s") if bulk else ("tunnel", 0, " us")

    def calls(prof: dict) -> str:
        return fmt(sum(r["per_tunnel"] for r in prof.get("strace") or []), 0 if bulk else 1)

    def parts(prof: dict) -> str:
        return ", ".join(
            f"{r['part']} {fmt(r.get('per_unit'), digits)}{sfx}"
            for r in prof.get("perf") or []
            if r.get("pct", 0) >= 1
        )

    named = " ".join(["HandyProxy", mine.get("flags") or ""]).strip()
    kernel = ratio(_part(mine, "kernel"), _part(ref, "kernel"))
    text = (
        f"this run's profile, per {unit} (perf, over the unsampled CPU): {named} "
        f"{fmt(_per(mine, 'cpu'), digits)}{sfx}: {parts(mine) or 'no perf samples'}; redsocks "
        f"{fmt(_per(ref, 'cpu'), digits)}{sfx}: {parts(ref) or 'no perf samples'}; system calls "
        f"{calls(mine)} vs {calls(ref)}. Kernel time {kernel} redsocks'. "
    )
    if bulk:
        return text + (
            "Both move the bytes with splice(2); HandyProxy's interpreter time is a Python "
            "callback per wake-up"
        )
    return text + (
        "What HandyProxy spends beyond redsocks is the interpreter running the set-up, spread "
        "with no single hot spot (see 'Where the CPU goes')"
    )


def _part(prof: dict, name: str) -> float | None:
    """One part's CPU per unit in a profile's perf split (None when perf saw none of it)."""
    return next((r.get("per_unit") for r in prof.get("perf") or [] if r["part"] == name), None)


def targets(res: dict) -> list[dict]:
    tools = res.get("tools", {})
    hp = handy_rows(tools)
    rs, pp = tools.get("redsocks", {}), tools.get("pproxy", {})
    base = get(res, "baseline", "upstream_only", "latency")
    out = []

    def row(target: str, name: str, value: str, met: bool | None, why: str = "") -> None:
        out.append({"target": target, "handyproxy": name, "value": value, "met": met, "note": why})

    direct = get(res, "baseline", "direct") or {}

    def spread(t: dict, direction: str) -> str:
        rounds = get(t, "bulk", direction, "gbps_rounds") or []
        return f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "n/a"

    for direction in ("up", "down"):
        n, v = best(hp, ("bulk", direction, "gbps"))
        ref = get(rs, "bulk", direction, "gbps")
        row(
            f"throughput {direction} >= 1.1x redsocks",
            n,
            f"{fmt(v, 3)} vs {fmt(ref, 3)} Gbit/s ({ratio(v, ref)})",
            None if v is None or ref is None else v >= 1.1 * ref,
            f"rounds: {spread(hp.get(n, {}), direction)} vs {spread(rs, direction)} Gbit/s; "
            f"upstream at {fmt(get(hp.get(n, {}), 'bulk', direction, 'upstream_cpu_pct'), 0)} % "
            "of a core; client, forwarder, upstream and origin share the 2 cores",
        )
        refp = get(pp, "bulk", direction, "gbps")
        cpu_gap = ratio(
            get(pp, "bulk", "cpu_s_per_gib"), get(hp.get(n, {}), "bulk", "cpu_s_per_gib")
        )
        row(
            f"throughput {direction} >= 3x pproxy",
            n,
            f"{fmt(v, 3)} vs {fmt(refp, 3)} Gbit/s ({ratio(v, refp)})",
            None if v is None or refp is None else v >= 3 * refp,
            "each one-stream path gets only the CPU time the shared 2 cores leave it, and the "
            "upstream proxy copies every byte through user space for every tool, so the "
            "throughput gap compresses; the 3x shows as CPU per GiB "
            f"({cpu_gap} less than pproxy)",
        )
    n, v = best(hp, ("bulk", "cpu_s_per_gib"), lower=True)
    ref = get(rs, "bulk", "cpu_s_per_gib")
    row(
        "CPU s/GiB <= 0.9x redsocks",
        n,
        f"{fmt(v, 3)} vs {fmt(ref, 3)} ({ratio(v, ref)})",
        None if v is None or ref is None else v <= 0.9 * ref,
        split_reason(res, bulk=True),
    )
    refp = get(pp, "bulk", "cpu_s_per_gib")
    row(
        "CPU s/GiB <= pproxy / 3",
        n,
        f"{fmt(v, 3)} vs {fmt(refp, 3)} ({ratio(refp, v)} less)",
        None if v is None or refp is None else v * 3 <= refp,
    )
    n, v = best(hp, ("connect", "best_rps"))
    ref = get(rs, "connect", "best_rps")
    row(
        "new tunnels/s >= redsocks (zero errors)",
        n,
        f"{fmt(v, 0)} vs {fmt(ref, 0)}/s",
        None if not v or not ref else v >= ref,
        f"forwarder CPU per tunnel {fmt(get(hp.get(n, {}), 'connect', 'cpu_us_per_tunnel'), 0)}"
        f" us vs redsocks {fmt(get(rs, 'connect', 'cpu_us_per_tunnel'), 0)} us, on 2 cores "
        "shared with the load generator, the upstream and the origin; " + split_reason(res),
    )
    for name, t in tools.items():
        if not name.startswith("handyproxy") or "error" in t:
            continue
        for figure, label in (("connect", "HTTP"), ("connect_tls", "TLS")):
            mine, ref = get(t, figure, "cpu_us_per_tunnel"), get(rs, figure, "cpu_us_per_tunnel")
            if mine is None or (not is_extra(t) and figure == "connect"):
                continue
            rate, ref_rate = get(t, figure, "best_rps"), get(rs, figure, "best_rps")
            row(
                f"CPU per new tunnel <= redsocks' ({label})",
                name,
                f"{fmt(mine, 0)} vs {fmt(ref, 0)} us; {fmt(rate, 0)} vs {fmt(ref_rate, 0)} "
                f"tunnels/s ({ratio(rate, ref_rate)})",
                None if ref is None else mine <= ref,
                split_reason(res, tls=figure == "connect_tls"),
            )
    lat_best = None
    for name, t in hp.items():
        a = added(t.get("latency"), base, "p99_us")
        if a is not None and (lat_best is None or a < lat_best[1]):
            lat_best = (name, a)
    if lat_best:
        lat = get(hp.get(lat_best[0], {}), "latency") or {}
        paired = "added_p99_us" in lat
        noisy = not paired and (get(direct, "latency", "p99_us") or 0) > 1000
        row(
            f"p99 added latency < 1 ms at {get(res, 'settings', 'rate')} req/s",
            lat_best[0],
            f"{fmt(lat_best[1], 0)} us (p99 {fmt(lat.get('p99_us'), 0)} vs paired baseline "
            f"{fmt(lat.get('paired_p99_us'), 0)} us)",
            None if noisy else lat_best[1] < 1000,
            f"redsocks (C) adds {fmt(added(rs.get('latency'), base, 'p99_us'), 0)} us at p99 "
            f"and pproxy {fmt(added(pp.get('latency'), base, 'p99_us'), 0)} us in the same "
            "run: every forwarder is one more process on the path that must get one of the 2 "
            "shared cores while client, upstream and origin are busy at 5,000 req/s (the "
            "direct path, with no such process, has p99 "
            f"{fmt(get(direct, 'latency', 'p99_us'), 0)} us)",
        )
    for name, t in tools.items():
        if t.get("family", 4) != 6 or "error" in t:
            continue
        a = added(t.get("latency"), base, "p99_us")
        row(
            f"p99 added latency < 1 ms (IPv6 client) at {get(res, 'settings', 'rate')} req/s",
            name,
            f"{fmt(a, 0)} us",
            None if a is None else a < 1000,
            "as for IPv4: waiting for one of the 2 shared cores",
        )
        for direction in ("up", "down"):
            v, ref = get(t, "bulk", direction, "gbps"), get(rs, "bulk", direction, "gbps")
            row(
                f"IPv6 throughput {direction} >= 1.1x redsocks (IPv4; redsocks has no IPv6)",
                name,
                f"{fmt(v, 3)} vs {fmt(ref, 3)} Gbit/s ({ratio(v, ref)})",
                None if v is None or ref is None else v >= 1.1 * ref,
                "one stream on 2 shared cores",
            )
        v, errs = get(t, "memory", "kib_per_tunnel"), get(t, "memory", "errors")
        row(
            "RSS per idle tunnel <= 8 KiB (IPv6 client)",
            name,
            f"{fmt(v)} KiB, {fmt(errs)} errors",
            None if v is None else v <= 8 and errs == 0,
        )
    key = "memory_big" if any("memory_big" in t for t in hp.values()) else "memory"
    n, v = best(hp, (key, "kib_per_tunnel"), lower=True)
    errs = get(hp.get(n, {}), key, "errors")
    row(
        f"RSS per idle tunnel <= 8 KiB (N={fmt(get(hp.get(n, {}), key, 'n'))})",
        n,
        f"{fmt(v)} KiB, {fmt(errs)} errors",
        None if v is None else v <= 8 and errs == 0,
        "N = 10,000 needs more than the 20,000 descriptors one process may have here",
    )
    conc = res.get("concurrency")
    if conc:
        ok = conc.get("errors") == 0 and conc.get("established") == conc.get("n")
        row(
            f"{fmt(conc.get('n'))} concurrent tunnels without an error",
            f"handyproxy -workers {get(res, 'settings', 'concurrent_workers')}",
            f"{fmt(conc.get('established'))} established, {fmt(conc.get('errors'))} errors, "
            f"{fmt(conc.get('kib_per_tunnel'))} KiB/tunnel",
            ok,
            f"errors: {conc.get('error_kinds') or conc.get('error')}",
        )
    return out


def render(res: dict) -> str:
    tools: dict[str, dict] = res.get("tools", {})
    base = res.get("baseline", {})
    direct = base.get("direct", {})
    up_only = get(base, "upstream_only", "latency") or {}
    m, v = res.get("machine", {}), res.get("versions", {})
    s = res.get("settings", {})
    parts = ["# HandyProxy benchmark\n"]
    parts.append(
        "**The figures below come from one run on a shared 2-core machine** (other engineers' "
        "test runs were using it at the same time; the load average is in the machine table). "
        "Read the ratios between tools within the run, not the absolute numbers.\n\n"
    )
    if res.get("quick"):
        parts.append(
            "**Quick run** (`--quick`): short durations, small N; not the reference figures.\n"
        )
    parts.append(
        f"Generated by `{res.get('command')}` on {res.get('started')} in "
        f"{fmt(res.get('seconds'), 0)} s. Raw figures: `benchmarks.json` next to this file.\n\n"
        "Topology (`handyproxy.lab.Lab`): client 198.51.100.2 → router 198.51.100.1 (runs the "
        "forwarder under test; nft `redirect to :PORT` in prerouting) → upstream CONNECT proxy "
        "203.0.113.2:3128 → origin 198.18.0.2 (iperf3 server, uvloop echo and HTTP servers). "
        "Every forwarder runs on the same path in the same run, with per-connection logging "
        "off (HandyProxy `-log-level warning`, redsocks `log_info = off`, pproxy without "
        "`-v`). All forwarders are started at once on their own ports and the REDIRECT rule "
        "is switched between them; each figure is taken in "
        f"{s.get('rounds')} interleaved round(s) (every path once per round) and the median "
        "is shown, so background load that drifts during the run hits every tool alike. "
        f"Every program of the run has nice {s.get('nice')}.\n\n"
        "Baselines: **direct** = the kernel routes client → router → upstream → origin (routes "
        "added only for this row; no forwarder, no proxy). **upstream only** = the client "
        "itself sends CONNECT to the upstream proxy (the same path minus the transparent "
        "forwarder); added latency is measured against it, so it is what the forwarder adds.\n"
    )
    parts.append("\n## Machine and versions\n\n")
    parts.append(
        table(
            ["item", "value"],
            [
                ["CPU", f"{m.get('nproc')} x {m.get('cpu')}"],
                ["kernel", m.get("kernel")],
                ["OS", m.get("os")],
                ["memory", m.get("memory")],
                [
                    "load average at start / end (1, 5, 15 min)",
                    f"{' '.join(m.get('load_before', []))} / {' '.join(m.get('load_after', []))}",
                ],
                ["open files per process (hard limit)", fmt(m.get("nofile_hard_limit"))],
                *[[k, val] for k, val in v.items()],
                [
                    "upstream proxy per figure",
                    ", ".join(
                        f"{fig}: {name}"
                        for fig, name in (get(res, "upstream", "per_figure") or {}).items()
                    ),
                ],
            ],
        )
    )
    sel = get(res, "upstream_selection", "candidates") or {}
    if sel:
        chosen = get(res, "upstream_selection", "chosen") or {}
        parts.append(
            "\n## Upstream proxy choice\n\nEach candidate (`squid:2` = squid SMP with "
            "2 workers; `builtin` = `python -m handyproxy.lab.connect_proxy`) behind "
            "redsocks (a fixed C forwarder): one iperf3 stream for 3 s, wrk (32 "
            "connections, one tunnel per request) for 3 s, and the latency probe for "
            "2 s. No candidate wins all three, so each figure uses the one that limits "
            "it least, judged by the upstream's own CPU cost (per GiB, per tunnel; "
            "steadier than rates on a loaded machine) and, for latency, the lowest "
            "p50: bulk throughput, CPU per GiB and memory "
            f"**{chosen.get('bulk')}**, tunnels per second **{chosen.get('connect')}**, "
            f"latency **{chosen.get('latency')}**. CPU per GiB and memory per tunnel "
            "are per forwarder process and do not depend on the upstream.\n\n"
        )
        parts.append(
            table(
                [
                    "upstream",
                    "version",
                    "Gbit/s",
                    "upstream CPU s/GiB",
                    "tunnels/s",
                    "upstream CPU us/tunnel",
                    "latency p50 / p99 us",
                    "errors",
                ],
                [
                    [
                        n,
                        r.get("version", "-"),
                        fmt(r.get("gbps"), 3),
                        fmt(r.get("upstream_cpu_s_per_gib"), 3),
                        fmt(r.get("connect_rps"), 0),
                        fmt(r.get("upstream_cpu_us_per_tunnel"), 0),
                        f"{fmt(r.get('latency_p50_us'), 0)} / {fmt(r.get('latency_p99_us'), 0)}",
                        fmt(r.get("connect_errors", r.get("error"))),
                    ]
                    for n, r in sel.items()
                ],
            )
        )

    rs, pp = tools.get("redsocks", {}), tools.get("pproxy", {})
    rows = []
    for name, t in [("direct (no forwarder)", direct), *measured(tools, "bulk")]:
        b = t.get("bulk", {})
        rows.append(
            [
                name,
                fmt(get(b, "up", "gbps"), 3),
                fmt(get(b, "down", "gbps"), 3),
                ratio(get(b, "up", "gbps"), get(rs, "bulk", "up", "gbps")),
                ratio(get(b, "up", "gbps"), get(pp, "bulk", "up", "gbps")),
                f"{fmt(get(b, 'up', 'upstream_cpu_pct'), 0)} / "
                f"{fmt(get(b, 'down', 'upstream_cpu_pct'), 0)}",
                " / ".join(
                    " ".join(fmt(x, 1) for x in get(b, k, "gbps_rounds") or [])
                    for k in ("up", "down")
                ),
                t.get("error", get(b, "up", "error") or ""),
            ]
        )
    parts.append(
        f"\n## Bulk throughput, one tunnel ({s.get('iperf_seconds')} s iperf3 each "
        "way)\n\nup = client → origin, down = origin → client (`-R`). Upstream CPU % "
        "is the upstream proxy's share of one core during the run (100 % = it is "
        "saturated and may be the limit).\n\n"
    )
    parts.append(
        table(
            [
                "path",
                "up Gbit/s",
                "down Gbit/s",
                "up vs redsocks",
                "up vs pproxy",
                "upstream CPU % up/down",
                "rounds up / down",
                "error",
            ],
            rows,
        )
    )

    rows = []
    for name, t in measured(tools, "bulk"):
        b = t.get("bulk", {})
        rows.append(
            [
                name,
                fmt(get(b, "up", "cpu_s_per_gib"), 3),
                fmt(get(b, "down", "cpu_s_per_gib"), 3),
                fmt(b.get("cpu_s_per_gib"), 3),
                ratio(b.get("cpu_s_per_gib"), get(rs, "bulk", "cpu_s_per_gib")),
                ratio(get(pp, "bulk", "cpu_s_per_gib"), b.get("cpu_s_per_gib")),
            ]
        )
    parts.append(
        "\n## CPU seconds per GiB forwarded\n\nutime + stime of all the forwarder's "
        "processes (from /proc/PID/stat) over the two iperf3 runs, divided by the "
        "bytes delivered. Lower is better.\n\n"
    )
    parts.append(table(["forwarder", "up", "down", "both", "vs redsocks", "pproxy / this"], rows))

    for figure in ("connect", "connect_tls"):
        rows = []
        paths = [("direct (no forwarder)", direct), *measured(tools, figure)]
        for name, t in paths:
            if figure not in t and name.startswith("direct"):
                continue
            c = t.get(figure, {})
            runs = "; ".join(
                f"c={r['connections']}: {fmt(r['rps'], 0)}/s"
                + (
                    f" [{' '.join(fmt(x, 0) for x in r.get('rps_rounds', []))}]"
                    if len(r.get("rps_rounds", [])) > 1
                    else ""
                )
                + (f" ({r['errors']} errors {r['error_detail']})" if r["errors"] else "")
                for r in c.get("runs", [])
            )
            rows.append(
                [
                    name,
                    fmt(c.get("best_rps"), 0),
                    fmt(c.get("best_connections")),
                    ratio(c.get("best_rps"), get(rs, figure, "best_rps")),
                    fmt(c.get("cpu_us_per_tunnel"), 0) if name in tools else "-",
                    ratio(c.get("cpu_us_per_tunnel"), get(rs, figure, "cpu_us_per_tunnel"))
                    if name in tools
                    else "-",
                    runs,
                ]
            )
        if figure == "connect":
            parts.append(
                f"\n## New tunnels per second\n\n`wrk -t1 -cC -d{s.get('connect_seconds')}s "
                "-H 'Connection: close'` against the origin's HTTP server: every request is a "
                "new client connection, REDIRECT, CONNECT to the upstream, request, 200 "
                "response, close. The best rate among the runs with zero errors (socket "
                "errors and non-2xx both count). Forwarder CPU per tunnel is utime + stime "
                "of its processes over the runs divided by the requests. Rows with a flag "
                "(`-sniff-timeout 1s`: the Host header is read before the CONNECT; "
                "`-log-level info`: one access record per tunnel, HandyProxy's default; "
                "`-metrics-address`) and the IPv6-client row measure the same thing.\n\n"
            )
        else:
            parts.append(
                "\n## New TLS tunnels per second\n\nThe same over TLS: `wrk` against "
                "`https://bench-origin.test:8443/` (the name resolves to the origin in the "
                "client and upstream namespaces). With `-sniff-timeout 1s` HandyProxy reads "
                "the ClientHello's SNI and sends `CONNECT bench-origin.test:8443`; without it, "
                "and redsocks always, the CONNECT names the original IP. The handshake costs "
                "the client and origin much more than the forwarder, so rates are lower.\n\n"
            )
        parts.append(
            table(
                [
                    "path",
                    "best tunnels/s",
                    "at connections",
                    "vs redsocks",
                    "forwarder CPU us per tunnel",
                    "CPU vs redsocks",
                    "runs (median [rounds])",
                ],
                rows,
            )
        )

    rows = []
    for name, t in [
        ("direct (no forwarder)", direct),
        ("upstream only (client CONNECTs)", {"latency": up_only}),
        *measured(tools, "latency"),
    ]:
        lat = t.get("latency", {})
        rows.append(
            [
                name,
                fmt(lat.get("p50_us"), 0),
                fmt(lat.get("p99_us"), 0),
                fmt(lat.get("p999_us"), 0),
                f"{fmt(lat.get('paired_p50_us'), 0)} / {fmt(lat.get('paired_p99_us'), 0)}"
                if "paired_p50_us" in lat
                else "-",
                fmt(added(lat, up_only, "p50_us"), 0) if name in tools else "-",
                fmt(added(lat, up_only, "p99_us"), 0) if name in tools else "-",
                fmt(lat.get("achieved_rate"), 0),
                fmt(lat.get("lost")) if "lost" in lat else lat.get("error", ""),
            ]
        )
    parts.append(
        f"\n## Added latency, 1 KiB request/response at {s.get('rate')} req/s\n\n"
        f"50 tunnels opened first, then an open-loop paced client sends "
        f"{s.get('rate')} requests/s for {s.get('latency_seconds')} s (after 1 s "
        "warm-up) round-robin over them; each round trip is timed from its write to "
        "the last byte of its echo. For each forwarder the same client also holds 50 "
        "baseline tunnels on which it speaks CONNECT to the upstream itself (the same path "
        "minus the forwarder); the two sets take turns in 50 ms slots, so the load is "
        "5,000 req/s at every moment and both see the same background noise. *added* is the "
        "forwarder's percentile minus that paired baseline's, per round, median over "
        "rounds. Timing both at the same moments keeps scheduling noise from other work on "
        "the machine out of the difference. The *direct* and *upstream only* rows are the "
        "baselines measured alone. Microseconds.\n\n"
    )
    parts.append(
        table(
            [
                "path",
                "p50 us",
                "p99 us",
                "p99.9 us",
                "paired baseline p50 / p99 us",
                "added p50 us",
                "added p99 us",
                "achieved req/s",
                "lost",
            ],
            rows,
        )
    )

    rows = []
    for name, t in tools.items():
        for key in ("memory", "memory_big"):
            mm = t.get(key)
            if not mm:
                continue
            rows.append(
                [
                    name,
                    fmt(mm.get("n")),
                    fmt(mm.get("established")),
                    fmt(mm.get("errors"))
                    + (f" {mm['error_kinds']}" if mm.get("error_kinds") else ""),
                    fmt(mm.get("rss_before_kib")),
                    fmt(mm.get("rss_after_kib")),
                    fmt(mm.get("kib_per_tunnel")),
                    fmt(mm.get("processes")),
                    fmt(mm.get("open_seconds")),
                ]
            )
    parts.append(
        f"\n## Memory per idle tunnel (N = {fmt(s.get('idle_n'))} for every tool, "
        f"{fmt(s.get('idle_n_big'))} for HandyProxy)\n\n"
        "RSS summed over the forwarder's processes, read from /proc before and while N "
        "tunnels are open and idle (each one proven with a 16-byte echo, and proven "
        "again before closing). KiB per tunnel = growth / N. The issue asks for "
        "N = 10,000; a one-process forwarder needs two sockets per tunnel and this "
        "machine caps every process at 20,000 open files (hard limit; CAP_SYS_RESOURCE "
        "is not available to raise it). redsocks keeps two splice pipes per tunnel (six "
        "descriptors), so it holds at most about 3,300 tunnels here: every tool is "
        "measured at the common N, HandyProxy also at 9,000 in one process, and the "
        "20,000-tunnel run below gives its figure at 20,000. Pipe buffers are kernel "
        "memory and do not show in RSS.\n\n"
    )
    parts.append(
        table(
            [
                "forwarder",
                "N",
                "established",
                "errors",
                "RSS before KiB",
                "RSS after KiB",
                "KiB per tunnel",
                "processes",
                "open s",
            ],
            rows,
        )
    )

    conc = res.get("concurrency")
    if conc:
        parts.append(
            f"\n## {fmt(conc.get('n'))} concurrent tunnels\n\nAll opened at once "
            "(100 connects in flight per client process), each proven with an echo, "
            "held, proven again, closed. The 20,000-file limit per process means "
            "40,000 sockets need several forwarder processes (`-workers`) and an SMP "
            "upstream; redsocks and pproxy are single processes and cannot hold more "
            "than about 9,990 tunnels on this machine, so they are not run here.\n\n"
        )
        parts.append(
            table(
                [
                    "forwarder",
                    "upstream",
                    "established",
                    "errors",
                    "alive at check",
                    "KiB per tunnel",
                    "open s",
                    "error kinds",
                ],
                [
                    [
                        f"`{conc.get('forwarder', '').split(' -m ')[-1]}`",
                        conc.get("upstream"),
                        fmt(conc.get("established")),
                        fmt(conc.get("errors", conc.get("error"))),
                        fmt(conc.get("alive_after_check")),
                        fmt(conc.get("kib_per_tunnel")),
                        fmt(conc.get("open_seconds")),
                        conc.get("error_kinds", ""),
                    ]
                ],
            )
        )
        if conc.get("tcp_counters"):
            parts.append(
                "\nTCP counters that moved during the run (nstat, per namespace): "
                + "; ".join(f"{ns}: {vals}" for ns, vals in conc["tcp_counters"].items() if vals)
                + "\n"
            )

    parts.append(profile_section(res.get("profiles") or {}, res.get("profiles_earlier") or {}))
    parts.append("\n## Targets (issue 11)\n\n")
    parts.append(
        "Ratios are taken within this run. *Best HandyProxy row* is the best of the "
        "HandyProxy configurations measured (shown so the choice is visible). The "
        "reason column is filled for every target not met or not measurable.\n\n"
    )
    parts.append(
        table(
            ["target", "best HandyProxy row", "measured", "met", "reason"],
            [
                [
                    t["target"],
                    t["handyproxy"],
                    t["value"],
                    {True: "yes", False: "**no**", None: "not measurable"}[t["met"]],
                    t["note"] if t["met"] is not True else "",
                ]
                for t in targets(res)
            ],
        )
    )
    notes = res.get("notes")
    if notes:
        parts.append("\n## Notes\n\n" + notes + "\n")
    parts.append("\n## Per-tool command lines\n\n")
    for name, t in tools.items():
        parts.append(f"- {name} ({t.get('version', '?')}): `{t.get('argv', t.get('error'))}`\n")
    for name, u in (get(res, "upstream", "used") or {}).items():
        parts.append(f"- upstream {name} ({u.get('version')}): `{u.get('argv')}`\n")
    return "".join(parts)


def _per(prof: dict, what: str) -> float | None:
    """``what`` (user, system, cpu) per unit of a profile, in its unit (us per tunnel, s per
    GiB)."""
    return prof.get(f"{what}_per_{prof.get('unit', 'tunnel')}")


def profile_section(profiles: dict, earlier: dict) -> str:
    """Where a forwarder's CPU goes (``bench.profile``): this run's profiles, then earlier ones."""
    if not profiles and not earlier:
        return ""
    out = [
        "\n## Where the CPU goes\n\n"
        "Taken by this run after the figures above, each on a fresh lab (`bench.profile`, the "
        "command is given with each): one forwarder under `wrk -c32 -H 'Connection: close'` "
        "(one tunnel per request; tinyproxy upstream) or one iperf3 stream up, then down "
        "(squid upstream), driven through four windows with one observer each, because every "
        "observer costs the watched process something. (1) Nothing watches: the CPU figures, "
        "utime + stime of the forwarder's processes split into user and system time. (2) "
        "`perf record` (timer samples of every thread, kernel included; it never stops the "
        "process): the share of the time in each part of the process, *per tunnel* (or per "
        "GiB) = that share of window 1's CPU. (3) `py-spy record --native` (Python and C "
        "frames, 250 Hz; HandyProxy only): the functions. *own* = samples whose innermost frame "
        "is that function; a libc entry (`splice`, `send`, `connect`) is time in the kernel, "
        "including the loopback TCP work of the namespaces that the call triggers. py-spy "
        "pauses the process to read its stacks, so its window's CPU (given as *sampled*) is "
        "not a figure. (4) `strace -c -f`: the system calls.\n"
    ]
    out += _profiles(profiles)
    if profiles:
        out.append(PROFILE_READING)
    if earlier:
        out.append(
            "\n## Before and after: main at 8cf7475 against this checkout\n\n"
            "Taken in turns on this machine before the run above (`bench.profile --source DIR`, "
            "each checkout's own `handyproxy`; the note says how many and their spread).\n"
        )
        out += _profiles(earlier, level="###")
    return "".join(out)


def _profiles(profiles: dict, level: str = "###") -> list[str]:
    out = []
    for label, prof in profiles.items():
        cmd = prof.get("command", "")
        if prof.get("error"):
            out.append(f"\n{level} {label}\n\n`{cmd}`: **failed**: {prof['error']}\n")
            continue
        load = prof.get("load") or {}
        if prof.get("unit") == "gib":
            rates = " / ".join(fmt(g, 2) for g in load.get("gbps_up_down", []))
            what = (
                f"{rates} Gbit/s up / down, {fmt(_per(prof, 'cpu'), 3)} s of forwarder CPU per "
                f"GiB ({fmt(_per(prof, 'user'), 3)} s user, {fmt(_per(prof, 'system'), 3)} s "
                "system)"
            )
            unit, sfx = "GiB", " s"
        else:
            what = (
                f"{fmt(load.get('rps'), 0)} tunnels/s, {fmt(_per(prof, 'cpu'), 0)} us of "
                f"forwarder CPU per tunnel ({fmt(_per(prof, 'user'), 0)} us user, "
                f"{fmt(_per(prof, 'system'), 0)} us system)"
            )
            unit, sfx = "tunnel", " us"
        sampled = prof.get(f"sampled_cpu_per_{prof.get('unit')}")
        if sampled is not None:
            what += f"; {fmt(sampled, 3 if unit == 'GiB' else 0)}{sfx} while py-spy sampled"
        out.append(
            f"\n{level} {label}\n\n`{cmd}`: {what}"
            + (f". {prof['note']}" if prof.get("note") else "")
            + "\n\n"
        )
        if prof.get("perf"):
            digits = 3 if unit == "GiB" else 1
            out.append(
                table(
                    [
                        "part of the process (perf)",
                        "share %",
                        f"per {unit}{sfx}",
                    ],
                    [
                        [r["part"], fmt(r["pct"], 1), fmt(r.get("per_unit"), digits)]
                        for r in prof["perf"]
                    ],
                )
                + "\n"
            )
        elif prof.get("perf_error"):
            out.append(f"perf: {prof['perf_error']}\n\n")
        own = get(prof, "profile", "own") or []
        if own:
            out.append(
                table(
                    ["own %", "function"],
                    [[fmt(r["pct"], 1), f"`{r['function']}`"] for r in own[:15]],
                )
            )
            # The frames every sample passes through (start-up, the supervisor, the loop's
            # entry) say nothing; what is left is where the tunnels' work happens.
            roots = ("handyproxy/__main__", "handyproxy/cli.py", "handyproxy/supervisor/")
            py = [
                r
                for r in get(prof, "profile", "inclusive") or []
                if "handyproxy/" in r["function"]
                and not any(root in r["function"] for root in roots)
                and not r["function"].startswith(("main ", "run ", "serve "))
            ][:12]
            if py:
                out.append("\nInclusive, HandyProxy's own functions:\n\n")
                out.append(
                    table(
                        ["inclusive %", "function"],
                        [[fmt(r["pct"], 1), f"`{r['function']}`"] for r in py],
                    )
                )
        if prof.get("strace"):
            total = sum(r["per_tunnel"] for r in prof["strace"])
            digits = 0 if unit == "GiB" else 1
            out.append(f"\nSystem calls per {unit} ({fmt(total, digits)} in all): ")
            out.append(
                ", ".join(f"{r['syscall']} {fmt(r['per_tunnel'], digits)}" for r in prof["strace"])
                + "\n"
            )
    return out


PROFILE_READING = """
### What the profiles show, and what was tried

- **Per tunnel, the gap is the interpreter; the kernel's work is no more than redsocks'.** perf
  splits each profile's unsampled CPU by where it ran (the targets above quote this run's
  split): HandyProxy's kernel time per tunnel is at most redsocks' (the same TCP work: accept,
  SO_ORIGINAL_DST, socket, connect, the CONNECT send and reply, splice each way, shutdown,
  close, and the loopback TCP processing of the namespaces that those calls trigger and that is
  charged to whoever makes them), and what it spends beyond redsocks is the Python interpreter
  running the set-up (Tunnel.run, UpstreamSet.open, connect_first, exchange, start_relay) and
  the relay's callbacks. That work is a few hundred bytecode-level steps with no single hot
  spot: no Python function has more than about 2 % of py-spy's samples on its own. redsocks'
  user space (libevent, libc, its own code) is a small fraction of the interpreter's share.
- **Cut, in this issue:** the tunnels' sockets moved from the event loop's registrations to one
  epoll of our own (`handyproxy.readiness`), itself a single reader of the loop: libuv built a
  poll handle per socket (epoll_ctl ADD and DEL and an ioctl to check it, a DEL and re-ADD on
  every change, DELs when dropped); now each change is one epoll_ctl, system calls per HTTP
  tunnel went from about 45.5 to 33.5, the event loop's share from about 12 to 5 us per tunnel,
  and, with the splice relay's reads going back to the loop after a short read (level-triggered
  readiness wakes them again; libuv reported an error once, so reads had to go on to EAGAIN),
  CPU per tunnel fell about 7 % in runs taken in turns (222 to 206 us, mean of four each). An
  ended tunnel was a reference cycle (tunnel, relay, its two directions) freed only by the
  cyclic collector: about 150,000 objects collected per 16,000 tunnels, with passes of up to 11
  ms stalling every tunnel of the worker; relays now let go of the tunnel and their halves when
  they end (nothing left for the collector) and the worker freezes its start-up objects
  (`gc.freeze()`). Pipes grow in tiers (8 of 1 MiB, 32 of 256 KiB per process, the rest the
  kernel's 64 KiB, bounded because the kernel charges pipe sizes to the user): 0.354 to about
  0.30 s of CPU per GiB. Earlier: access records written once per event-loop turn and formatted
  faster; the CONNECT request's constant end cached; sniffing parses each byte once (8 KiB one
  byte per read: 1.22 s of parsing before, 0.004 s now) on one registration and one timer,
  handed to the relay with the upstream's; the sniffed first flight sent at once.
- **Tried and dropped:** accepting with `_accept()` and a plain `socket(fd)` (no measurable
  change); driving the set-up coroutine from future callbacks without a Task (within the noise);
  a 64 KiB short-read bound (a bulk stream took 10 % more system calls per GiB than with reads
  going on to EAGAIN: the bound is 16 KiB, above a request, a reply or a TLS record).
- **Measuring errors found and fixed:** py-spy pauses the process it samples, and profiles used
  to take their CPU figures from the sampled window (about twice the real cost for an HTTP
  tunnel); each profile now measures a window nothing watches, and py-spy's is shown as
  *sampled*. `bench.profile --source DIR` ran the current code (the repository, the working
  directory, is first on `python -m`'s sys.path); the forwarder starts with `python -P`.
- **What parity per tunnel would take:** the per-tunnel path out of the interpreter. What is
  left in it is object work (coroutine frames, futures, timer handles, the relay's objects) and
  a Python call per wake-up per direction; everything else HandyProxy spends per tunnel (kernel,
  libc, event loop) already comes to less than redsocks' whole cost. Bulk: both move bytes with
  splice(2); 1 MiB pipes take a few thousand splice calls per GiB where redsocks' 64 KiB ones
  take about 33,000, which is why HandyProxy's kernel time per GiB is lower. Latency: redsocks
  and HandyProxy add a tail of the same order in each run; at 5,000 req/s on 2 cores shared by
  client, forwarder, upstream and origin the p99 is waiting for a core, as the direct path's own
  p99 shows.
"""


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "docs/benchmarks.json"
    sys.stdout.write(render(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
