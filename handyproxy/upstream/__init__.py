"""Everything about upstream proxies, in one place.

- ``spec``: what the configuration says (addresses, groups, credentials files), parsed once.
- ``dial``: reaching one: resolving, Happy Eyeballs, the CONNECT exchange under one deadline.
- ``health``: one upstream at run time (addresses, up or down, counters).
- ``pool``: the ``UpstreamSet`` a worker asks for tunnels: groups, policy, retries, probes.

A tunnel calls ``UpstreamSet.open(host, port, group)`` and gets an ``Opened`` (the socket and
the origin bytes that came with the reply) or a ``ConnectError(reason, status)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from handyproxy.upstream.spec import (
    DEFAULT_GROUP,
    DEFAULT_PORT,
    POLICIES,
    Credentials,
    SpecError,
    UpstreamSpec,
)

if TYPE_CHECKING:
    from handyproxy.connect import ConnectError
    from handyproxy.upstream.health import Upstream
    from handyproxy.upstream.pool import Opened, UpstreamSet

# The run-time half (asyncio, the dialer) is imported on first use: the configuration parser and
# the role's filters, which run in a new Ansible worker for every task, need only `spec`.
_LAZY = {
    "ConnectError": "handyproxy.connect",
    "Upstream": "handyproxy.upstream.health",
    "Opened": "handyproxy.upstream.pool",
    "UpstreamSet": "handyproxy.upstream.pool",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PORT",
    "POLICIES",
    "ConnectError",
    "Credentials",
    "Opened",
    "SpecError",
    "Upstream",
    "UpstreamSet",
    "UpstreamSpec",
]
