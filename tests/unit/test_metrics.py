"""handyproxy.metrics in one process: the option, multiprocess files, the exporter over HTTP
(parsed by prometheus-client's parser), what the hooks count, worker exits and re-exec."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kit.scrape import Samples, fetch, parse

from handyproxy import __version__, config, metrics
from handyproxy.config import Config, ConfigError
from handyproxy.tunnel import Hub
from handyproxy.upstream import UpstreamSet

UPSTREAMS = "127.0.0.1:3128,127.0.0.1:3129"  # never dialled: the tests only read counters


# Python 3.12+ warns about fork() beside the exporter's thread; the forwarder forks workers the
# same way (the child only closes the exporter's socket and never touches the thread's state).
FORK_BESIDE_THREAD = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def make_config(**values: object) -> Config:
    return config.build({"metrics-address": "127.0.0.1:0", "upstream-proxy": UPSTREAMS, **values})


@pytest.fixture
def exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, str]]:
    """Metrics prepared in this process under a RUNTIME_DIRECTORY of the test's, served on a
    port the kernel picked; shut down after the test."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.delenv(metrics.ENV, raising=False)
    cfg = make_config()
    metrics.prepare(cfg)
    host, port = metrics.start_exporter(cfg)
    try:
        yield cfg, f"http://{host}:{port}/metrics"
    finally:
        metrics.shutdown()


def scrape(url: str) -> Samples:
    return parse(fetch(url))


def relay(up: int, down: int) -> SimpleNamespace:
    return SimpleNamespace(bytes_up=up, bytes_down=down)


class FakeTunnel:
    """What the recorder reads of a tunnel: its relay's byte counts (hashable, as in a set)."""

    def __init__(self, relay: SimpleNamespace | None) -> None:
        self.relay = relay


def tunnel(up: int = 0, down: int = 0, with_relay: bool = True) -> FakeTunnel:
    return FakeTunnel(relay(up, down) if with_relay else None)


def make_hub(cfg: Config) -> Hub:
    return Hub(config=cfg, listen_ports=set(), upstreams=UpstreamSet.from_config(cfg))


# The option


@pytest.mark.parametrize("value", ["127.0.0.1:9464", "[::1]:9464", "localhost:9100", "0.0.0.0:0"])
def test_metrics_address_takes_host_and_port(value: str) -> None:
    assert make_config(**{"metrics-address": value}).metrics_address == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("127.0.0.1", "missing port"),
        ("::1:9464", "put an IPv6 address in brackets"),
        ("127.0.0.1:70000", "not a number from 0 to 65535"),
        ("bad host:9464", "invalid host name"),
    ],
)
def test_a_bad_metrics_address_names_the_option(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(**{"metrics-address": value})
    assert err.value.field == "metrics-address"
    assert why in err.value.reason


def test_metrics_are_off_by_default_and_every_call_is_then_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(metrics.ENV, raising=False)
    cfg = config.build({})
    assert cfg.metrics_address == ""
    metrics.prepare(cfg)
    metrics.attach(make_hub(cfg))
    metrics.reloaded(True)
    metrics.worker_started(1)
    metrics.worker_exited(1)
    assert not metrics.enabled()
    assert metrics.record is metrics.OFF
    assert metrics.ENV not in os.environ
    metrics.shutdown()


# Serving


def test_every_labelled_series_exists_at_zero_before_any_tunnel(exporter) -> None:
    cfg, url = exporter
    metrics.attach(make_hub(cfg))
    samples = scrape(url)
    assert samples.by("handyproxy_tunnels_total", "end") == dict.fromkeys(metrics.ENDS, 0.0)
    assert samples.by("handyproxy_refused_total", "reason") == dict.fromkeys(metrics.REFUSALS, 0)
    assert samples.by("handyproxy_bytes_total", "direction") == {"up": 0.0, "down": 0.0}
    assert samples.by("handyproxy_reloads_total", "result") == {"ok": 0.0, "failed": 0.0}
    assert samples.get("handyproxy_build_info", version=__version__) == 1.0
    for upstream in UPSTREAMS.split(","):
        assert samples.get("handyproxy_upstream_up", upstream=upstream) == 1.0
        assert samples.get("handyproxy_upstream_tunnels_total", upstream=upstream) == 0.0
        assert (
            samples.get("handyproxy_upstream_failures_total", upstream=upstream, reason="timeout")
            == 0.0
        )
    assert samples.get("handyproxy_connect_duration_seconds_count") == 0.0
    assert samples.get("handyproxy_workers") == 1.0
    assert samples.get("process_open_fds") > 0
    assert samples.get("process_cpu_seconds_total") > 0
    assert samples.get("process_resident_memory_bytes") > 1 << 20
    started = samples.get("process_start_time_seconds")
    assert time.time() - 86400 < started < time.time()  # this (pytest) process's start


def test_process_figures_need_only_the_process_own_proc_directory() -> None:
    figures = metrics.process_figures(os.getpid())
    assert figures is not None
    assert figures["fds"] == len(os.listdir("/proc/self/fd"))  # each counts its own listdir
    assert figures["max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert metrics.process_figures(2**22 + 1) is None  # above pid_max: no such process


def test_names_follow_the_prometheus_rules(exporter) -> None:
    cfg, url = exporter
    metrics.attach(make_hub(cfg))
    samples = scrape(url)
    for name, kind in samples.types.items():
        assert name.startswith(("handyproxy_", "process_")), name
        if kind == "counter":
            assert f"{name}_total" in samples.names(), name
        else:
            assert not name.endswith("_total"), name
    labels = {label for _, ls in samples.values for label, _ in ls}
    assert labels <= {"end", "reason", "direction", "result", "upstream", "version", "le"}


def test_the_hooks_count_ends_refusals_sniffing_bytes_and_connect_time(exporter) -> None:
    cfg, url = exporter
    hub = make_hub(cfg)
    metrics.attach(hub)
    record = metrics.record
    open_one = tunnel(up=100, down=2000)
    hub.tunnels.add(open_one)
    record.ended(tunnel(up=5, down=7), "eof", None)
    record.ended(tunnel(up=1, down=0), "client-reset", None)
    record.ended(tunnel(with_relay=False), "refused", "loop")
    record.ended(tunnel(with_relay=False), "refused", "not-redirected")
    record.ended(tunnel(with_relay=False), "a-new-end", None)
    record.sniffed(b"\x16\x03\x01", "origin.test")
    record.sniffed(b"GET / HTTP/1.1\r\n", "origin.test")
    record.sniffed(b"SSH-2.0", None)
    record.connected(0.003)
    record.connected(0.2)
    record.connected(0.005)  # on a bound: in that bucket (le is "less or equal")
    record.tick(hub)

    samples = scrape(url)
    ends = samples.by("handyproxy_tunnels_total", "end")
    assert (ends["eof"], ends["client-reset"], ends["refused"], ends["a-new-end"]) == (1, 1, 2, 1)
    refused = samples.by("handyproxy_refused_total", "reason")
    assert (refused["loop"], refused["not-redirected"], refused["rule"]) == (1, 1, 0)
    assert samples.by("handyproxy_sniff_results_total", "result") == {
        "tls": 1,
        "http": 1,
        "none": 1,
    }
    # The open tunnel's bytes count at the tick, the ended ones' at their end.
    assert samples.by("handyproxy_bytes_total", "direction") == {"up": 106, "down": 2007}
    assert samples.get("handyproxy_tunnels_open") == 1
    assert samples.get("handyproxy_connect_duration_seconds_count") == 3
    assert samples.get("handyproxy_connect_duration_seconds_bucket", le="0.0025") == 0
    assert samples.get("handyproxy_connect_duration_seconds_bucket", le="0.005") == 2
    assert samples.get("handyproxy_connect_duration_seconds_bucket", le="0.1") == 2
    assert samples.get("handyproxy_connect_duration_seconds_bucket", le="0.25") == 3
    assert samples.get("handyproxy_connect_duration_seconds_bucket", le="+Inf") == 3
    assert samples.get("handyproxy_connect_duration_seconds_sum") == pytest.approx(0.208)

    # The open tunnel ends having moved more: nothing is counted twice or lost.
    open_one.relay = relay(150, 2500)
    hub.tunnels.discard(open_one)
    record.ended(open_one, "eof", None)
    record.tick(hub)
    samples = scrape(url)
    assert samples.by("handyproxy_bytes_total", "direction") == {"up": 156, "down": 2507}
    assert samples.get("handyproxy_tunnels_open") == 0


def test_upstream_figures_are_copied_at_each_tick(exporter) -> None:
    cfg, url = exporter
    hub = make_hub(cfg)
    metrics.attach(hub)
    first, second = hub.upstreams.upstreams
    first.tunnels, first.tunnels_open, first.refusals = 7, 2, 1
    first.failed("timeout", "no answer", max_fails=1)  # marks it down
    second.failures["refused"] = 3
    hub.upstreams.retries = 4
    metrics.record.tick(hub)

    samples = scrape(url)
    assert samples.get("handyproxy_upstream_up", upstream=first.name) == 0
    assert samples.get("handyproxy_upstream_up", upstream=second.name) == 1
    assert samples.get("handyproxy_upstream_tunnels_total", upstream=first.name) == 7
    assert samples.get("handyproxy_upstream_tunnels_open", upstream=first.name) == 2
    assert samples.get("handyproxy_upstream_refusals_total", upstream=first.name) == 1
    failures = samples.get(
        "handyproxy_upstream_failures_total", upstream=first.name, reason="timeout"
    )
    assert failures == 1
    refused = samples.get(
        "handyproxy_upstream_failures_total", upstream=second.name, reason="refused"
    )
    assert refused == 3
    assert samples.get("handyproxy_upstream_retries_total") == 4

    # A reload builds a new set; counters of kept upstreams carry on, new objects add to them.
    hub.upstreams = UpstreamSet.from_config(cfg, previous=hub.upstreams)
    first.tunnels = 9
    metrics.record.tick(hub)
    assert scrape(url).get("handyproxy_upstream_tunnels_total", upstream=first.name) == 9
    hub.upstreams = UpstreamSet.from_config(cfg)  # fresh objects: they start from 0
    hub.upstreams.upstreams[0].tunnels = 1
    metrics.record.tick(hub)
    assert scrape(url).get("handyproxy_upstream_tunnels_total", upstream=first.name) == 10


def test_reloads_are_counted_by_result(exporter) -> None:
    _, url = exporter
    metrics.reloaded(True)
    metrics.reloaded(True)
    metrics.reloaded(False)
    assert scrape(url).by("handyproxy_reloads_total", "result") == {"ok": 2, "failed": 1}


# Several processes


@FORK_BESIDE_THREAD
def test_a_dead_workers_counters_stay_and_its_gauges_leave(exporter) -> None:
    cfg, url = exporter
    pid = os.fork()
    if pid == 0:  # the worker: three tunnels open, one ended, then it dies
        code = 1
        try:
            hub = make_hub(cfg)
            metrics.attach(hub)
            hub.tunnels.update(tunnel(up=10, down=10) for _ in range(3))
            metrics.record.ended(tunnel(up=1, down=2), "eof", None)
            metrics.record.tick(hub)
            code = 0
        finally:
            os._exit(code)
    metrics.worker_started(pid)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    samples = scrape(url)
    assert samples.get("handyproxy_tunnels_open") == 3  # not yet marked dead
    assert samples.get("handyproxy_workers") == 1
    metrics.worker_exited(pid)
    samples = scrape(url)
    assert samples.get("handyproxy_tunnels_open") == 0
    assert samples.get("handyproxy_tunnels_total", end="eof") == 1
    assert samples.by("handyproxy_bytes_total", "direction") == {"up": 31, "down": 32}
    # Only that worker had a view of the upstreams: its series go with it.
    assert "handyproxy_upstream_up" not in samples.names()


@FORK_BESIDE_THREAD
def test_the_exporter_socket_is_closed_in_a_forked_worker(exporter) -> None:
    cfg, _ = exporter
    listening = os.readlink(f"/proc/self/fd/{metrics._state.httpd.socket.fileno()}")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: does it still hold the exporter's socket after attach()?
        code = 1
        try:
            os.close(read)
            metrics.attach(make_hub(cfg))
            held = any(
                os.readlink(f"/proc/self/fd/{fd}") == listening
                for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")
            )
            os.write(write, b"held" if held else b"closed")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    reply = os.read(read, 100)
    os.close(read)
    os.waitpid(pid, 0)
    assert reply == b"closed"
    assert os.readlink(f"/proc/self/fd/{metrics._state.httpd.socket.fileno()}") == listening


def test_a_re_executed_master_keeps_its_counters_and_drops_its_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.delenv(metrics.ENV, raising=False)
    cfg = make_config()
    metrics.prepare(cfg)
    path = os.environ[metrics.ENV]
    assert Path(path).parent == tmp_path
    metrics.reloaded(True)
    # The old image had another version; execv() keeps the PID and the environment.
    metrics._state.series.build_info.labels("0.9.0").set(1)
    metrics.shutdown(remove=False)
    assert Path(path).is_dir()

    metrics.prepare(cfg, fresh=False)
    try:
        assert os.environ[metrics.ENV] == path
        host, port = metrics.start_exporter(cfg)
        metrics.reloaded(False)
        samples = scrape(f"http://{host}:{port}/metrics")
        assert samples.by("handyproxy_reloads_total", "result") == {"ok": 1, "failed": 1}
        assert samples.by("handyproxy_build_info", "version") == {__version__: 1}
    finally:
        metrics.shutdown()
    assert not Path(path).exists()
    assert metrics.ENV not in os.environ


def test_a_cold_start_begins_with_an_empty_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"\0" * 16)
    monkeypatch.setenv(metrics.ENV, str(stale))  # left over from a crashed run
    cfg = make_config()
    metrics.prepare(cfg)
    try:
        path = Path(os.environ[metrics.ENV])
        assert path != stale
        assert [p.name for p in path.iterdir() if p.name.startswith("counter_")] == [
            f"counter_{os.getpid()}.db"
        ]
    finally:
        metrics.shutdown()


def test_an_address_in_use_is_an_os_error(exporter) -> None:
    _, url = exporter
    port = url.rsplit(":", 1)[1].split("/")[0]
    taken = config.build({"metrics-address": f"127.0.0.1:{port}", "upstream-proxy": UPSTREAMS})
    with pytest.raises(OSError):
        metrics.start_exporter(taken)
