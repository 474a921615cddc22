"""The metrics on the real path: scraped while tunnels are open and after, with one process
and with two workers, the counters add up to what the access records say."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from kit.client import Client
from kit.forwarder import DOWN_UPSTREAM, Forwarder
from kit.origins import INDEX, ORIGIN_NAME
from kit.scrape import Samples, address, fetch, parse, wait_samples

from handyproxy.lab.netns import PROXY_PORT, ROUTER_CLIENT_V4, Lab

pytestmark = pytest.mark.integration

SLOW = 6  # downloads open at once while the load is scraped
SLOW_SIZE = 300_000
SLOW_RATE = 100_000  # bytes per second: each lasts about 3 s
FAST = 20
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def start_downloads(lab: Lab, count: int) -> list[subprocess.Popen[bytes]]:
    url = f"http://{ORIGIN_NAME}/dl?size={SLOW_SIZE}&rate={SLOW_RATE}"
    argv = ["curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{size_download}", url]
    return [lab.popen("client", argv, stdout=subprocess.PIPE) for _ in range(count)]


def expected_figures(fwd: Forwarder) -> dict[str, object]:
    records = fwd.records()
    proxied = [r for r in records if r["status"] == "200"]
    return {
        "ends": Counter(r["end"] for r in records),
        "refused": Counter(r["reason"] for r in records if r["end"] == "refused"),
        "up": sum(int(r["up"]) for r in records),
        "down": sum(int(r["down"]) for r in records),
        "upstreams": Counter(r["upstream"] for r in proxied),
        "connects": len(proxied),
        "sniffed": sum(r["target"] == f"{ORIGIN_NAME}:80" for r in records),
    }


def scraped_figures(s: Samples) -> dict[str, object]:
    directions = s.by("handyproxy_bytes_total", "direction")
    sniffs = s.by("handyproxy_sniff_results_total", "result")
    return {
        "ends": Counter(
            {k: int(v) for k, v in s.by("handyproxy_tunnels_total", "end").items() if v}
        ),
        "refused": Counter(
            {k: int(v) for k, v in s.by("handyproxy_refused_total", "reason").items() if v}
        ),
        "up": int(directions["up"]),
        "down": int(directions["down"]),
        "upstreams": Counter(
            {
                k: int(v)
                for k, v in s.by("handyproxy_upstream_tunnels_total", "upstream").items()
                if v
            }
        ),
        "connects": int(s.get("handyproxy_connect_duration_seconds_count")),
        "sniffed": int(sniffs["http"]),
    }


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])
def test_scraped_counters_add_up_to_the_access_records(
    lab: Lab, client: Client, start_origin, start_upstream, start_handyproxy, workers: int
):
    start_origin("http")
    squid = start_upstream("squid")
    fwd = start_handyproxy(workers=workers, metrics_address="127.0.0.1:0", sniff_timeout="1s")

    downloads = start_downloads(lab, SLOW)
    try:
        during = wait_samples(
            lab,
            fwd,
            lambda s: (
                s.get("handyproxy_tunnels_open") == SLOW
                and s.by("handyproxy_bytes_total", "direction")["down"] > 0
            ),
            f"{SLOW} tunnels open and bytes flowing",
        )
        assert during.get("handyproxy_tunnels_total", end="eof") < SLOW  # scraped under load
        for _ in range(FAST):
            result, out = client.curl(f"http://{ORIGIN_NAME}/index.html")
            assert result.returncode == 0, result.stderr
            assert out.read_text() == INDEX
        client.expect_refused(4, fwd.port, "router", REQUEST)  # not redirected
        client.expect_refused(4, PROXY_PORT, "upstream", REQUEST)  # an upstream's port
        for proc in downloads:
            out, _ = proc.communicate(timeout=30)
            assert (proc.returncode, out) == (0, str(SLOW_SIZE).encode())
    finally:
        for proc in downloads:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    total = SLOW + FAST + 2
    fwd.log.wait_for(r"tunnel end ", count=total)
    expected = expected_figures(fwd)
    assert expected["ends"]["eof"] == SLOW + FAST
    assert sum(expected["refused"].values()) == 2
    assert expected["upstreams"] == {squid.address: SLOW + FAST}
    after = wait_samples(
        lab,
        fwd,
        lambda s: scraped_figures(s) == expected and s.get("handyproxy_tunnels_open") == 0,
        f"figures equal to the records: {expected}",
    )
    assert after.get("handyproxy_workers") == workers
    assert after.get("handyproxy_upstream_up", upstream=squid.address) == 1
    assert after.get("process_open_fds") > 0
    assert after.get("process_cpu_seconds_total") > 0


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])
def test_a_dead_upstream_shows_down_with_each_failure_counted(
    lab: Lab, client: Client, start_handyproxy, workers: int
):
    fwd = start_handyproxy(
        workers=workers, upstream_proxy=DOWN_UPSTREAM, metrics_address="127.0.0.1:0"
    )
    attempts = 5
    for _ in range(attempts):
        client.expect_reset(4, 80)
    fwd.log.wait_for(r"tunnel end .*end=connect-failed", count=attempts)
    assert all(r["upstream"] == DOWN_UPSTREAM for r in fwd.records())

    def figures(s: Samples) -> bool:
        failures = s.sum("handyproxy_upstream_failures_total", upstream=DOWN_UPSTREAM)
        return (
            failures == attempts
            and s.get(
                "handyproxy_upstream_failures_total", upstream=DOWN_UPSTREAM, reason="refused"
            )
            == attempts
            and s.get("handyproxy_tunnels_total", end="connect-failed") == attempts
            and s.get("handyproxy_upstream_up", upstream=DOWN_UPSTREAM) == 0
            and s.get("handyproxy_connect_duration_seconds_count") == 0
        )

    # With two workers, up is 0 once every worker has seen a failure, or the one that did
    # not yet is told by its probes: livemin shows 0 as soon as any worker marked it down.
    wait_samples(lab, fwd, figures, f"{attempts} failures and the upstream down")


def test_the_exporter_answers_a_scraper_on_another_host_when_bound_there(
    lab: Lab, start_handyproxy
):
    fwd = start_handyproxy(metrics_address=f"{ROUTER_CLIENT_V4}:0")
    host, port = address(fwd)
    assert host == ROUTER_CLIENT_V4
    text = lab.call_in("client", lambda: fetch(f"http://{host}:{port}/metrics"))
    assert parse(text).get("handyproxy_tunnels_open") == 0
