"""Copying bytes both ways between the client and the upstream, with flow control.

Protocols rather than streams: each chunk is written to the other side from the read callback,
with no task, no await and no intermediate buffer per tunnel. Memory stays bounded because a
side whose write buffer passes HIGH_WATER pauses reading on the other side until it drains.

Ending is explicit about FIN versus RST: EOF on one side becomes a half-close on the other and the
other direction keeps flowing; an error or reset on one side resets the other, so a client never
mistakes a broken transfer for a complete one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from handyproxy.relay.base import Registration, RelayBase
from handyproxy.sockets import keep_socket, reset_after_fin, reset_socket, unacked

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


def reset_transport(transport: asyncio.BaseTransport) -> None:
    reset_socket(transport.get_extra_info("socket"))
    transport.abort()


def close_transport(transport: asyncio.BaseTransport) -> None:
    """A graceful close: the armed reset is taken off first (see handyproxy.sockets)."""
    keep_socket(transport.get_extra_info("socket"))
    transport.close()


def _owes(transport: asyncio.Transport | None) -> bool:
    """Bytes written to ``transport`` that have not reached its peer yet."""
    if transport is None:
        return False
    return transport.get_write_buffer_size() > 0 or unacked(transport.get_extra_info("socket")) > 0


def _gone(half: Half) -> bool:
    """The peer behind ``half`` sent its FIN and was then reset (see handyproxy.sockets)."""
    if half.peer.eof:  # our own FIN went to it: CLOSE is then an ordinary end
        return False
    return reset_after_fin(half.transport.get_extra_info("socket"))


class Half(asyncio.Protocol):
    """One socket of a tunnel: what it reads goes to ``peer``, what it writes comes from it."""

    __slots__ = (
        "closed",
        "early",
        "eof",
        "held",
        "name",
        "peer",
        "reading_paused",
        "received",
        "relay",
        "transport",
    )

    def __init__(self, relay: CopyRelay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: Half = None  # type: ignore[assignment]
        self.received = 0
        self.eof = False
        self.closed = False
        self.reading_paused = False
        self.early: list[bytes] = []  # read while held, before the peer could take it
        self.held = False

    # Protocol interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.held:
            self.early.append(data)
            return
        try:
            self.peer.transport.write(data)
        except (RuntimeError, OSError):
            self.relay.fail(self.peer, "error")

    def eof_received(self) -> bool:
        self.eof = True
        if not self.held:
            self.relay.half_eof(self)
        return True  # keep our write side open: the other direction may still be flowing

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.half_lost(self, exc)

    # Flow control, idempotent so any caller may use it

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()


class CopyRelay(RelayBase):
    """Copying relay: two protocol halves; ``on_done`` runs once both sockets closed."""

    __slots__ = ("client", "upstream")

    def __init__(self, on_done: Callable[[RelayBase], None], now: float) -> None:
        super().__init__(on_done, now)
        self.client = Half(self, "client")
        self.upstream = Half(self, "upstream")
        self.client.peer = self.upstream
        self.upstream.peer = self.client

    async def start(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        registration: Registration | None,
        client_registration: Registration | None = None,
    ) -> None:
        """Wrap both sockets in transports; the upstream waits until the client side exists."""
        for reg in (registration, client_registration):
            if reg is not None:
                reg.hand_over(None)  # a transport must find the socket unregistered
        up = self.upstream
        up.held = True  # until the client side exists, keep what arrives, in order
        await loop.create_connection(lambda: up, sock=upstream)
        await loop.connect_accepted_socket(lambda: self.client, client)
        for chunk in up.early:
            self.client.transport.write(chunk)
        up.early.clear()
        up.held = False
        if up.closed:
            self.fail(self.client, self.end or "upstream-reset")
        elif up.eof:
            self.half_eof(up)

    @property
    def bytes_up(self) -> int:
        return self.client.received + self.extra_up

    @property
    def bytes_down(self) -> int:
        return self.upstream.received + self.extra_down

    @property
    def half_closed(self) -> bool:
        return self.client.eof or self.upstream.eof

    @property
    def delivering(self) -> bool:
        return any(
            half.eof and not half.peer.closed and _owes(half.peer.transport)
            for half in (self.client, self.upstream)
        )

    def half_eof(self, half: Half) -> None:
        """``half`` sent its FIN: pass it on; the tunnel ends when both have, or when ``half``
        was reset after its FIN (every byte it sent is here, but it takes no more)."""
        peer = half.peer
        if not peer.closed:
            peer.transport.write_eof()  # sent once the peer's write buffer has drained
        if (peer.eof and not peer.held) or _gone(half):  # a held peer owes bytes; start() ends it
            self.end = self.end or "eof"
            for h in (half, peer):
                if not h.closed:
                    close_transport(h.transport)

    def half_lost(self, half: Half, exc: Exception | None) -> None:
        peer = half.peer
        if exc is not None:
            self.end = self.end or f"{half.name}-reset"
            if not peer.closed and peer.transport is not None:
                reset_transport(peer.transport)
        elif not peer.closed and peer.transport is not None:
            self.end = self.end or "eof"
            if self.end == "eof":
                close_transport(peer.transport)
            else:  # lost after fail() aborted it: the peer's armed reset must stay armed
                peer.transport.close()
        if peer.closed:
            # Both transports are gone, so no callback can reach the halves: unlink them from
            # each other and from the relay (see RelayBase.finish).
            half.relay = peer.relay = half.peer = peer.peer = None  # type: ignore[assignment]
            self.finish()

    def fail(self, half: Half, reason: str) -> None:
        """End the tunnel with RST on both sides, recording ``reason`` unless one is set."""
        self.end = self.end or reason
        for h in (half, half.peer):
            if not h.closed and h.transport is not None:
                reset_transport(h.transport)

    def abort(self, reason: str) -> None:
        self.fail(self.client, reason)
