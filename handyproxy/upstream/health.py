"""One upstream proxy at run time: where it is, whether it works, and what it has done.

Health is passive (consecutive failures of real tunnels mark it down) and active (while down,
probes with back-off bring it back). The figures are plain integers the hot path bumps; the
metrics exporter reads them and nothing here knows about it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from handyproxy.upstream.dial import FAILURE_KINDS, Address, numeric_addresses
from handyproxy.upstream.spec import UpstreamSpec

#: The first probe of a down upstream waits this long; each failed probe doubles the wait,
#: up to ``-upstream-probe-interval``.
PROBE_FIRST = 0.5


def is_numeric(host: str) -> bool:
    """An IP literal needs no resolver; anything else (``0x7f.1`` included) is a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Upstream:
    """One proxy: its spec, its addresses, its health and its counters."""

    __slots__ = (
        "addrs",
        "authorization",
        "down_reason",
        "down_since",
        "downs",
        "fails",
        "failures",
        "group",
        "name",
        "numeric",
        "on_change",
        "probe_delay",
        "probe_failures",
        "probes",
        "refusals",
        "spec",
        "tunnels",
        "tunnels_open",
        "up",
    )

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.group = spec.group
        self.authorization = spec.credentials.authorization if spec.credentials else b""
        self.numeric = is_numeric(spec.host)
        #: Ordered for Happy Eyeballs; replaced as a whole, so a dial in progress keeps its own.
        self.addrs: tuple[Address, ...] = (
            numeric_addresses(spec.host, spec.port) if self.numeric else ()
        )
        self.up = True
        self.down_reason = ""
        self.down_since = 0.0
        self.fails = 0  # consecutive failures; reset by any answer
        self.probe_delay = PROBE_FIRST
        #: Called with (self, reason) when ``up`` flips; set by the UpstreamSet that owns it.
        self.on_change: Callable[[Upstream, str], None] | None = None
        # Figures for metrics: plain counters, never reset.
        self.tunnels = 0  # tunnels opened through it (2xx)
        self.tunnels_open = 0  # of those, open now
        self.refusals = 0  # non-2xx answers: the proxy's own decision, not a failure
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.downs = 0  # times marked down
        self.probes = 0  # probes sent while down
        self.probe_failures = 0

    def __repr__(self) -> str:
        return f"<Upstream {self.name} group={self.group} {'up' if self.up else 'down'}>"

    def failed(self, kind: str, text: str, max_fails: int) -> None:
        """A tunnel could not get an answer from it; enough in a row mark it down."""
        self.failures[kind] = self.failures.get(kind, 0) + 1
        self.fails += 1
        if self.up and self.fails >= max_fails:
            self.set_state(False, text)

    def answered(self) -> None:
        """It answered a CONNECT (any status): it works."""
        self.fails = 0
        if not self.up:
            self.set_state(True, "a tunnel got an answer")

    def set_state(self, up: bool, reason: str) -> None:
        self.up = up
        if not up:
            self.downs += 1
            self.down_reason = reason
            self.probe_delay = PROBE_FIRST
        self.fails = 0
        if self.on_change is not None:
            self.on_change(self, reason)

    def prefer(self, index: int) -> None:
        """Try the address that connected last first next time (RFC 8305 section 4 allows it)."""
        addrs = self.addrs
        if 0 < index < len(addrs):
            self.addrs = (addrs[index], *addrs[:index], *addrs[index + 1 :])
