"""Everything about upstream proxies, in one place.

- ``spec``: what the configuration says (addresses, groups, credentials files), parsed once.
- ``dial``: reaching one: resolving, Happy Eyeballs, the CONNECT exchange under one deadline.
- ``health``: one upstream at run time (addresses, up or down, counters).
- ``pool``: the ``UpstreamSet`` a worker asks for tunnels: groups, policy, retries, probes.

A tunnel calls ``UpstreamSet.open(host, port, group)`` and gets an ``Opened`` (the socket and
the origin bytes that came with the reply) or a ``ConnectError(reason, status)``.
"""

from handyproxy.connect import ConnectError
from handyproxy.upstream.health import Upstream
from handyproxy.upstream.pool import Opened, UpstreamSet
from handyproxy.upstream.spec import (
    DEFAULT_GROUP,
    DEFAULT_PORT,
    POLICIES,
    Credentials,
    SpecError,
    UpstreamSpec,
)

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
