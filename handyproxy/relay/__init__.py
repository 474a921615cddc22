"""The relays: what copies a tunnel's bytes once both sockets are connected.

One module per implementation (``splice``: zero-copy through kernel pipes; ``copy``: through
user space) and this table from the ``-relay`` name to the class. The table holds import paths
rather than classes so that reading the names (as ``config`` does) imports no relay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from handyproxy.relay.base import RelayBase

RELAYS: dict[str, str] = {
    "splice": "handyproxy.relay.splice:SpliceRelay",
    "copy": "handyproxy.relay.copy:CopyRelay",
}
#: Used when the chosen relay cannot run here.
FALLBACK = "copy"


def load(name: str) -> type[RelayBase]:
    """The relay class for a ``-relay`` name (one of RELAYS)."""
    module, _, attr = RELAYS[name].partition(":")
    cls: type[RelayBase] = getattr(importlib.import_module(module), attr)
    return cls


def choose(name: str) -> tuple[type[RelayBase], str | None]:
    """The relay to run for ``name`` and, when it had to fall back, why."""
    cls = load(name)
    why = cls.unavailable()
    if why is None:
        return cls, None
    return load(FALLBACK), why
