"""Hostname sniffers: pure functions from the first client bytes to a name.

Each returns the name, ``None`` when the bytes cannot carry one (so the caller falls back to the
original IP), or ``MORE`` when the bytes so far are a valid prefix and more would decide. They do
no I/O, so the caller owns timeouts and byte limits, and fuzzing them is cheap.

Each comes as an incremental parser (``feed(chunk)``) that keeps where it got to, so a client
dribbling its first bytes one per segment costs work linear in the bytes, not quadratic, and as
a function of the whole buffer (a fresh parser fed once) for everything else. ``work`` counts
the bytes a parser has looked at, so tests can prove linearity without a clock.
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


class Sniffer:
    """An incremental sniffer: ``feed`` each chunk as it arrives; the answer for all so far.

    Once the answer is a name or None it is final, and later chunks are not looked at.
    """

    __slots__ = ("result", "work")

    def __init__(self) -> None:
        self.result: str | _More | None = MORE
        self.work = 0  # bytes examined (scanned, matched or copied), for the linearity tests

    def feed(self, chunk: bytes) -> str | _More | None:
        if self.result is MORE:
            self.result = self._feed(chunk)
        return self.result

    def _feed(self, chunk: bytes) -> str | _More | None:
        raise NotImplementedError
