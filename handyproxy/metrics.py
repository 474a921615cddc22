"""Prometheus metrics: what the forwarder counts, and the exporter that serves it.

Off unless ``-metrics-address HOST:PORT`` is set; prometheus-client is not even imported then.
When on, the hot path adds one to a few plain integers per tunnel (its end, a refusal's
reason, the sniffing result, the CONNECT set-up's histogram bucket), and each worker's
once-a-second tick hands them to prometheus-client. Figures that already exist as plain
integers (open tunnels, the bytes of open tunnels, the upstreams' health and counters in
``handyproxy.upstream.health``) are copied at the same tick, so the relay and the upstream
code know nothing of this. A scrape therefore sees figures at most a second old.

prometheus-client always runs in its multiprocess mode here, with one process or ``-workers N``:
each process writes its figures to its own mmap files under ``PROMETHEUS_MULTIPROC_DIR`` and
the exporter merges all of them on each scrape. So the figures are the instance's as a whole,
counters of a worker that died stay counted, and a re-executed master (same PID) carries on
with its own file. Gauges are merged as "live" modes: ``livesum`` for open tunnels (the
instance's total), ``livemin`` for ``handyproxy_upstream_up`` (1 only while every live worker
can use the upstream), ``livemax`` for ``handyproxy_build_info`` (during an upgrade both the old
and the new version show 1 until the old workers are gone).

The API for the process that owns the listeners and outlives the workers (today
``server.run`` / ``server.supervise``; the master with a supervisor):

``prepare(cfg, fresh=True)``
    Before any worker is forked and before anything else imports prometheus_client. Points
    ``PROMETHEUS_MULTIPROC_DIR`` at a new empty directory (under ``$RUNTIME_DIRECTORY`` when
    systemd gives one) when ``fresh``; with ``fresh=False`` (the master re-executed itself)
    it keeps the inherited directory, so counters continue, and drops the old image's live
    gauges. A no-op when ``cfg.metrics_address`` is empty, and every other call is then too.
``start_exporter(cfg) -> (host, port)``
    Serves the exposition at ``/metrics`` from a daemon thread (prometheus-client's WSGI
    server): a scrape never runs on an event loop. Raises OSError if it cannot bind.
``worker_started(pid)`` / ``worker_exited(pid)``
    After fork() in the parent, and after reaping the worker: the process figures cover the
    live workers, and a dead worker's live gauges (open tunnels, upstream health) leave the
    merged figures (``mark_process_dead``).
``reloaded(ok)``
    After each reload attempt: ``handyproxy_reloads_total{result="ok"|"failed"}``.
``shutdown(remove=True)``
    When the instance stops: stop serving; ``remove`` deletes the directory (pass False
    before re-executing, the next image goes on with it).

In each process that carries tunnels (``server.Server``): ``attach(hub)`` once it serves, then
``record.tick(hub)`` once a second and once after draining; ``tunnel.py`` calls
``record.ended``, ``record.sniffed`` and ``record.connected``. ``record`` is a do-nothing
object until ``attach``, so those calls cost one attribute lookup while metrics are off.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from handyproxy import __version__
from handyproxy.address import authority, split_hostport
from handyproxy.log import logger
from handyproxy.upstream.dial import FAILURE_KINDS

if TYPE_CHECKING:
    from handyproxy.config import Config
    from handyproxy.tunnel import Hub, Tunnel
    from handyproxy.upstream import Upstream, UpstreamSet

ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The access record's ``end`` values; each gets its series at start, so rates start from 0.
ENDS = (
    "eof",
    "client-reset",
    "upstream-reset",
    "idle-timeout",
    "half-close-timeout",
    "shutdown",
    "connect-failed",
    "refused",
    "error",
)
#: The access record's ``reason`` values for ``end=refused``.
REFUSALS = (
    "not-redirected",
    "loop",
    "upstream-port",
    "proxy-request",
    "rule",
    "connection-cap",
    "client-cap",
)
#: What sniffing found: a TLS SNI, an HTTP Host, or no usable name (the IP is used then).
SNIFF_RESULTS = ("tls", "http", "none")
RELOAD_RESULTS = ("ok", "failed")
#: CONNECT set-up times: a local cNTLM answers in a millisecond, a far proxy in hundreds, and
#: the last buckets reach the default -dial-timeout (3m).
CONNECT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    180.0,
)


class Series:
    """Every metric the forwarder exports (created with ``registry=None``: in multiprocess
    mode the exporter reads the files, not a registry)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, *labels: str) -> Any:
            return Counter(name, doc, labels, registry=None)

        def gauge(name: str, doc: str, mode: str, *labels: str) -> Any:
            return Gauge(name, doc, labels, registry=None, multiprocess_mode=mode)

        self.build_info = gauge(
            "handyproxy_build_info", "Always 1; the version running.", "livemax", "version"
        )
        self.reloads = counter(
            "handyproxy_reloads_total", "Configuration reloads, by result.", "result"
        )
        self.tunnels_open = gauge(
            "handyproxy_tunnels_open", "Tunnels open now (being set up or relaying).", "livesum"
        )
        self.tunnels = counter(
            "handyproxy_tunnels_total",
            "Tunnels ended, by how they ended (the access record's end).",
            "end",
        )
        self.refused = counter(
            "handyproxy_refused_total",
            "Connections refused, by the access record's reason.",
            "reason",
        )
        self.bytes = counter(
            "handyproxy_bytes_total",
            "Bytes relayed: up is client to upstream, down is upstream to client.",
            "direction",
        )
        self.sniffs = counter(
            "handyproxy_sniff_results_total",
            "Hostname sniffing outcomes: tls (SNI), http (Host) or none (the IP is used).",
            "result",
        )
        self.connect_duration = Histogram(
            "handyproxy_connect_duration_seconds",
            "Time from choosing an upstream to its 2xx CONNECT reply, retries included.",
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.direct = counter(
            "handyproxy_direct_tunnels_total", "Tunnels a direct rule opened without a proxy."
        )
        self.retries = counter(
            "handyproxy_upstream_retries_total",
            "CONNECT attempts moved on to the next upstream after one failed.",
        )
        self.upstream_up = gauge(
            "handyproxy_upstream_up",
            "1 while the upstream is usable (in every worker), 0 while marked down.",
            "livemin",
            "upstream",
        )
        self.upstream_open = gauge(
            "handyproxy_upstream_tunnels_open",
            "Tunnels open through the upstream now.",
            "livesum",
            "upstream",
        )
        self.upstream_tunnels = counter(
            "handyproxy_upstream_tunnels_total",
            "Tunnels the upstream accepted (2xx).",
            "upstream",
        )
        self.upstream_refusals = counter(
            "handyproxy_upstream_refusals_total",
            "Non-2xx CONNECT answers (the proxy's decision, not a failure).",
            "upstream",
        )
        self.upstream_failures = counter(
            "handyproxy_upstream_failures_total",
            "CONNECT attempts that got no answer, by why.",
            "upstream",
            "reason",
        )


class _Pending:
    """Counts since the last tick, for one counter child (or one histogram bucket)."""

    __slots__ = ("count", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.count = 0

    def flush(self) -> None:
        if self.count:
            self.value.inc(self.count)
            self.count = 0


class _Follow:
    """Turns a plain integer that only grows into increments of one counter child."""

    __slots__ = ("child", "seen")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.seen = 0

    def sync(self, value: int) -> None:
        if value > self.seen:
            self.child.inc(value - self.seen)
        self.seen = value


class _UpstreamFigures:
    """One Upstream object's series; a new object (a reload changed it) starts from 0 again."""

    __slots__ = ("failures", "name", "open", "refusals", "series", "tunnels", "up")

    def __init__(self, s: Series, name: str) -> None:
        self.series, self.name = s, name
        self.up = s.upstream_up.labels(name)
        self.open = s.upstream_open.labels(name)
        self.tunnels = _Follow(s.upstream_tunnels.labels(name))
        self.refusals = _Follow(s.upstream_refusals.labels(name))
        self.failures = {k: _Follow(s.upstream_failures.labels(name, k)) for k in FAILURE_KINDS}

    def sync(self, up: Upstream) -> None:
        self.up.set(1 if up.up else 0)
        self.open.set(up.tunnels_open)
        self.tunnels.sync(up.tunnels)
        self.refusals.sync(up.refusals)
        for kind, count in up.failures.items():
            follow = self.failures.get(kind)
            if follow is None:
                child = self.series.upstream_failures.labels(self.name, kind)
                follow = self.failures[kind] = _Follow(child)
            follow.sync(count)


class Recorder:
    """The live figures of one process that carries tunnels; the hooks are its methods.

    The hooks only add to plain integers: an increment of prometheus-client's multiprocess
    value (a lock, a getpid() and an mmap write) costs about a microsecond, and measured on
    the benchmark's path four of them per tunnel added about 30 us of CPU, where a dict
    update costs well under one. ``tick`` hands the sums to prometheus-client once a second,
    so a scrape sees a tunnel at most a second late, and a killed worker loses at most its
    last second.
    """

    def __init__(self, series: Series, hub: Hub) -> None:
        self.series = series
        self.ends = {end: _Pending(series.tunnels.labels(end)) for end in ENDS}
        self.refusals = {reason: _Pending(series.refused.labels(reason)) for reason in REFUSALS}
        self.sniffs = {result: _Pending(series.sniffs.labels(result)) for result in SNIFF_RESULTS}
        # The histogram's own per-bucket values (not cumulative; the last is +Inf): filled by
        # count here, where observe() would take a lock and write the file per call.
        histogram = series.connect_duration
        self.connect_buckets = [_Pending(value) for value in histogram._buckets]
        self.connect_sum = histogram._sum
        self.connect_seconds = 0.0
        self.up = _Follow(series.bytes.labels("up"))
        self.down = _Follow(series.bytes.labels("down"))
        #: Bytes of the tunnels that ended; the open ones are summed at each tick.
        self.closed_up = 0
        self.closed_down = 0
        self.pool: UpstreamSet | None = None
        self.direct = _Follow(series.direct)
        self.retries = _Follow(series.retries)
        self.upstreams: dict[Upstream, _UpstreamFigures] = {}
        self.tick(hub)

    # Hot path: called once per tunnel

    def ended(self, tunnel: Tunnel, end: str, reason: str | None) -> None:
        pending = self.ends.get(end)
        if pending is None:  # an end this module does not know yet: its series starts now
            pending = self.ends[end] = _Pending(self.series.tunnels.labels(end))
        pending.count += 1
        if end == "refused" and reason:
            refused = self.refusals.get(reason)
            if refused is None:
                refused = self.refusals[reason] = _Pending(self.series.refused.labels(reason))
            refused.count += 1
        relay = tunnel.relay
        if relay is not None:
            self.closed_up += relay.bytes_up
            self.closed_down += relay.bytes_down

    def sniffed(self, first: bytes, name: str | None) -> None:
        result = "none" if name is None else "tls" if first[:1] == b"\x16" else "http"
        self.sniffs[result].count += 1

    def connected(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le, "less or equal").
        self.connect_buckets[bisect_left(CONNECT_BUCKETS, seconds)].count += 1
        self.connect_seconds += seconds

    # Once a second

    def tick(self, hub: Hub) -> None:
        """Hand the counts to prometheus-client and copy what lives as plain integers."""
        for group in (self.ends, self.refusals, self.sniffs):
            for pending in group.values():
                pending.flush()
        if self.connect_seconds:
            self.connect_sum.inc(self.connect_seconds)
            self.connect_seconds = 0.0
        for pending in self.connect_buckets:
            pending.flush()
        self.series.tunnels_open.set(len(hub.tunnels))
        up, down = self.closed_up, self.closed_down
        for tunnel in hub.tunnels:
            relay = tunnel.relay
            if relay is not None:
                up += relay.bytes_up
                down += relay.bytes_down
        self.up.sync(up)
        self.down.sync(down)
        pool = hub.upstreams
        if pool is None:
            return
        if pool is not self.pool:  # a new set (a reload): its counters start at 0
            self.pool = pool
            self.direct.seen = self.retries.seen = 0
            known = self.upstreams
            self.upstreams = {
                up: known.get(up) or _UpstreamFigures(self.series, up.name) for up in pool.upstreams
            }
        self.direct.sync(pool.direct_tunnels)
        self.retries.sync(pool.retries)
        for upstream, figures in self.upstreams.items():
            figures.sync(upstream)


class _Off:
    """``record`` while metrics are off (or before ``attach``): every hook does nothing."""

    __slots__ = ()

    def ended(self, tunnel: Tunnel, end: str, reason: str | None) -> None:
        pass

    def sniffed(self, first: bytes, name: str | None) -> None:
        pass

    def connected(self, seconds: float) -> None:
        pass

    def tick(self, hub: Hub) -> None:
        pass


OFF = _Off()
#: The hooks of this process: ``OFF``, or a ``Recorder`` once ``attach`` ran.
record: Recorder | _Off = OFF


class _State:
    """What ``prepare`` set up in the master (inherited by forked workers)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()  # the master: it removes the directory when the instance stops
        self.series = Series()
        self.workers: set[int] = set()
        self.reloads = {r: self.series.reloads.labels(r) for r in RELOAD_RESULTS}
        self.httpd: Any = None


_state: _State | None = None


def enabled() -> bool:
    return _state is not None


def prepare(cfg: Config, fresh: bool = True) -> None:
    """Set up multiprocess mode before workers are forked; see the module docstring."""
    global _state
    if not cfg.metrics_address:
        return
    inherited = os.environ.get(ENV, "")
    if fresh or not os.path.isdir(inherited):
        path = tempfile.mkdtemp(
            prefix="handyproxy-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY") or None
        )
        os.environ[ENV] = path
    else:  # the same master after execv: it goes on with its directory
        path = inherited
    from prometheus_client import multiprocess, values

    # A new value class: it picks the directory up from the environment set above, and keeps
    # no file of an earlier prepare() in this interpreter open.
    values.ValueClass = values.MultiProcessValue()
    if not fresh:  # this PID's old image: its live gauges (its version) go
        multiprocess.mark_process_dead(os.getpid(), path)
    _state = _State(path)
    _state.series.build_info.labels(__version__).set(1)


def start_exporter(cfg: Config) -> tuple[str, int]:
    """Serve ``/metrics`` on ``-metrics-address`` from a daemon thread; returns where."""
    if _state is None:
        raise RuntimeError("metrics.prepare() first")
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    host, port = split_hostport(cfg.metrics_address, kernel_port=True)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=_state.path)
    registry.register(InstanceCollector(_state))
    httpd, _ = start_http_server(port, host, registry=registry)
    _state.httpd = httpd
    port = httpd.server_address[1]
    logger.info(f"metrics on http://{authority(host, port)}/metrics")
    return host, port


def worker_started(pid: int) -> None:
    if _state is not None:
        _state.workers.add(pid)


def worker_exited(pid: int) -> None:
    if _state is None:
        return
    from prometheus_client import multiprocess

    _state.workers.discard(pid)
    multiprocess.mark_process_dead(pid, _state.path)


def reloaded(ok: bool) -> None:
    if _state is not None:
        _state.reloads["ok" if ok else "failed"].inc()


def attach(hub: Hub) -> None:
    """Start recording for this process's tunnels (a no-op while metrics are off)."""
    global record
    state = _state
    if state is None:
        return
    if state.httpd is not None and state.pid != os.getpid():
        # A forked worker: the exporter's listening socket came along; only the master serves.
        state.httpd.socket.close()
        state.httpd = None
    state.series.build_info.labels(__version__).set(1)
    record = Recorder(state.series, hub)


def shutdown(remove: bool = True) -> None:
    """Stop serving and forget the state; ``remove`` deletes the directory (master only)."""
    global _state, record
    state, _state, record = _state, None, OFF
    if state is None:
        return
    if state.httpd is not None:
        state.httpd.shutdown()
        state.httpd.server_close()
    if remove and state.pid == os.getpid():
        shutil.rmtree(state.path, ignore_errors=True)
        if os.environ.get(ENV) == state.path:
            del os.environ[ENV]


def process_figures(pid: int) -> dict[str, float] | None:
    """CPU seconds, memory, descriptors and start time of one process from /proc/PID alone.

    Not prometheus-client's ProcessCollector: it needs /proc/stat for the boot time, which the
    role's unit hides (``ProcSubset=pid``); CLOCK_BOOTTIME gives the same without it.
    """
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as fh:
            parts = fh.read().rsplit(b")", 1)[1].split()
        fds = len(os.listdir(f"{base}/fd"))
        limit = 0.0
        with open(f"{base}/limits", "rb") as fh:
            for line in fh:
                if line.startswith(b"Max open files"):
                    limit = float(line.split()[3])
    except (OSError, IndexError, ValueError):
        return None  # gone meanwhile (a worker that just exited)
    ticks = os.sysconf("SC_CLK_TCK")
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    # Fields after the command: state is [0], so field N of proc(5) is [N - 3].
    return {
        "cpu": (int(parts[11]) + int(parts[12])) / ticks,
        "start": booted + int(parts[19]) / ticks,
        "virtual": float(parts[20]),
        "resident": float(parts[21]) * resource.getpagesize(),
        "fds": float(fds),
        "max_fds": limit,
    }


class InstanceCollector:
    """Figures only the master knows, computed per scrape: the worker count and the
    ``process_*`` figures of the master and its workers together."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = self.state
        yield GaugeMetricFamily(
            "handyproxy_workers",
            "Worker processes running (1 when the forwarder runs as one process).",
            value=len(state.workers) or 1,
        )
        master = process_figures(os.getpid())
        if master is None:
            return
        figures = [master, *filter(None, map(process_figures, sorted(state.workers)))]
        # Workers already reaped count through the kernel's figures for waited-for children.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = sum(f["cpu"] for f in figures) + children.ru_utime + children.ru_stime
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "User and system CPU time of the master and its workers (ended ones too), seconds.",
            value=cpu,
        )
        for name, key, doc in (
            ("resident_memory_bytes", "resident", "Resident memory of the master and workers."),
            ("virtual_memory_bytes", "virtual", "Virtual memory of the master and workers."),
            ("open_fds", "fds", "Open file descriptors of the master and its workers."),
        ):
            yield GaugeMetricFamily(f"process_{name}", doc, value=sum(f[key] for f in figures))
        yield GaugeMetricFamily(
            "process_max_fds",
            "The descriptor limit of one process (the highest among them).",
            value=max(f["max_fds"] for f in figures),
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "When the master started, seconds since the epoch.",
            value=master["start"],
        )
