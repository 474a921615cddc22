"""Hostname sniffers: pure functions from the first client bytes to a name.

Each returns the name, ``None`` when the bytes cannot carry one (so the caller falls back to the
original IP), or ``MORE`` when the bytes so far are a valid prefix and more would decide. They do
no I/O and keep no state, so the caller owns timeouts and byte limits, and fuzzing them is cheap.
"""

from __future__ import annotations

from typing import Final

from handyproxy.address import valid_hostname


class _More:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MORE"


MORE: Final = _More()


def valid_name(raw: bytes) -> str | None:
    """A DNS name usable in CONNECT, lower-cased; None for IP literals and anything odd.

    IP literals, in every spelling a resolver accepts, are refused on purpose: the original
    destination IP is already known and a client-supplied address must not replace it.
    """
    try:
        text = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    if not valid_hostname(text):
        return None
    return text[:-1] if text.endswith(".") else text
