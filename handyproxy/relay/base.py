"""What every relay shares: how a tunnel ended, byte counts, and the quiet-time timers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Protocol


class Registration(Protocol):
    """The set-up's poll registration of the upstream socket (``upstream.dial.UpstreamPoll``)."""

    def hand_over(self, reader: Callable[[], None] | None) -> None:
        """Give it to the relay: ``reader`` takes it over in place, None drops it."""


class RelayBase:
    """What every relay shares: how it ended, and the quiet-time timers judged by byte counts."""

    __slots__ = ("end", "extra_down", "extra_up", "last_activity", "on_done", "quiet_since")

    def __init__(self, on_done: Callable[[RelayBase], None], now: float) -> None:
        self.on_done: Callable[[RelayBase], None] | None = on_done
        self.end: str | None = None
        self.last_activity = -1
        self.quiet_since = now
        self.extra_up = 0
        self.extra_down = 0

    bytes_up: int
    bytes_down: int
    half_closed: bool
    #: An ended direction still owes its peer bytes (held here, or unacknowledged in the
    #: kernel): the peer is slow, not gone, and a reset now would cut what it was sent.
    delivering: bool

    async def start(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        registration: Registration | None,
        client_registration: Registration | None = None,
    ) -> None:
        """Take over both connected sockets; from here the relay's callbacks carry the tunnel.

        ``registration`` (the upstream socket's) and ``client_registration`` (the client's,
        left by sniffing) are poll registrations still held by the set-up, None when there is
        none; the relay must call their ``hand_over()`` before it polls either socket.
        """
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        """End the tunnel with a reset on both sides, recording ``reason`` unless one is set."""
        raise NotImplementedError

    def finish(self) -> None:
        """Report the end to the tunnel, once, and let go of it.

        The tunnel holds its relay and ``on_done`` is the tunnel's method: keeping it would make
        every ended tunnel a reference cycle, freed only by the cyclic garbage collector, whose
        passes stall every other tunnel of the process. Each relay also unlinks its own halves
        when it closes, so an ended tunnel is freed by reference counting alone.
        """
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self)

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this relay cannot run on this kernel, or None when it can."""
        return None

    @classmethod
    def descriptors_in_use(cls) -> int:
        """Descriptors this relay kind holds beyond the tunnels' own sockets (pipes)."""
        return 0

    def seed(self, up: int, down: int) -> None:
        """Count bytes delivered before the relay took over (sniffed, or early from the origin)."""
        self.extra_up += up
        self.extra_down += down

    def check_timers(self, now: float, idle_timeout: float, half_close_timeout: float) -> None:
        """Called about once a second by the server; ends tunnels that went quiet too long.

        Activity is judged from the byte counters, so the hot path never reads a clock.
        """
        activity = self.bytes_up + self.bytes_down
        if activity != self.last_activity:
            self.last_activity = activity
            self.quiet_since = now
            return
        quiet = now - self.quiet_since
        if half_close_timeout > 0 and self.half_closed and quiet >= half_close_timeout:
            if self.delivering:  # the half-close counts from when the last byte is through
                self.quiet_since = now
                return
            self.abort("half-close-timeout")
        elif idle_timeout > 0 and quiet >= idle_timeout:
            self.abort("idle-timeout")
