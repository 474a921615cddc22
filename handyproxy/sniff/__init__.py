"""Hostname sniffers: pure functions from the first client bytes to a name.

Each returns the name, ``None`` when the bytes cannot carry one (so the caller falls back to the
original IP), or ``MORE`` when the bytes so far are a valid prefix and more would decide. They do
no I/O and keep no state, so the caller owns timeouts and byte limits, and fuzzing them is cheap.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final


class _More:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MORE"


MORE: Final = _More()

_LABEL = re.compile(rb"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def valid_name(raw: bytes) -> str | None:
    """A DNS name usable in CONNECT, lower-cased; None for IP literals and anything odd.

    IP literals are refused on purpose: the original destination IP is already known and a
    client-supplied address must not replace it.
    """
    name = raw[:-1] if raw.endswith(b".") else raw
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(b".")):
        return None
    text = name.decode("ascii").lower()
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    if text.replace(".", "").isdigit():
        return None
    return text
