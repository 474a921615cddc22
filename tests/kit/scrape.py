"""Reading a forwarder's Prometheus metrics the way Prometheus does: an HTTP GET of /metrics,
the text parsed by prometheus-client's own parser (a format error fails the test)."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from handyproxy.address import authority
from handyproxy.lab.netns import Lab
from kit.forwarder import Forwarder
from kit.waiting import wait_until

#: The line the forwarder logs once its exporter serves.
SERVING = r"metrics on http://(\S+):(\d+)/metrics"


class Samples:
    """One scrape: every sample by name and labels, and the families' types."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def names(self) -> set[str]:
        return {name for name, _ in self.values}

    def get(self, name: str, **labels: str) -> float:
        """The value of the one sample with exactly these labels; KeyError if there is none."""
        return self.values[(name, frozenset(labels.items()))]

    def sum(self, name: str, **labels: str) -> float:
        """The sum over every sample of ``name`` that has (at least) these labels."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)

    def by(self, name: str, label: str) -> dict[str, float]:
        """``{label value: sample value}`` for a metric with one label."""
        return {dict(ls)[label]: v for (n, ls), v in self.values.items() if n == name and dict(ls)}


def parse(text: str) -> Samples:
    return Samples(text)


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        assert reply.status == 200, reply.status
        assert reply.headers["Content-Type"].startswith("text/plain"), reply.headers
        return reply.read().decode()


def address(fwd: Forwarder, timeout: float = 10.0) -> tuple[str, int]:
    """Where the forwarder's exporter listens, from its log line."""
    match = fwd.log.wait_for(SERVING, timeout)[0]
    host = match.group(1)
    return host.strip("[]"), int(match.group(2))


def scrape(lab: Lab, fwd: Forwarder, ns: str = "router") -> Samples:
    """GET /metrics from inside the forwarder's namespace and parse it."""
    host, port = address(fwd)
    url = f"http://{authority(host, port)}/metrics"
    return parse(lab.call_in(ns, lambda: fetch(url)))


def wait_samples(
    lab: Lab,
    fwd: Forwarder,
    condition: Callable[[Samples], bool],
    what: str,
    timeout: float = 10.0,
) -> Samples:
    """Scrape until ``condition`` holds (figures of open tunnels and upstreams are copied once
    a second); returns that scrape."""
    last: list[Samples] = []

    def check() -> Samples | None:
        samples = scrape(lab, fwd)
        last[:] = [samples]
        return samples if condition(samples) else None

    try:
        return wait_until(check, timeout, what, interval=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nlast scrape:\n{last[0].text if last else '-'}") from None
