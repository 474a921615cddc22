"""Listener sockets: what accepted client sockets inherit from them."""

from __future__ import annotations

import socket

import pytest

from handyproxy.config import Config
from handyproxy.server import make_listeners
from handyproxy.sockets import KEEPALIVE_COUNT, KEEPALIVE_IDLE, KEEPALIVE_INTERVAL

OPTIONS = {
    "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    "TCP_KEEPIDLE": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
    "TCP_KEEPINTVL": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
    "TCP_KEEPCNT": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
}


@pytest.mark.parametrize(
    ("listen", "connect_to"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("", "127.0.0.1"), ("", "::1")],
    ids=["ipv4", "ipv6", "dual-stack-v4", "dual-stack-v6"],
)
def test_accepted_sockets_inherit_nodelay_and_keepalive(listen: str, connect_to: str) -> None:
    """The tunnel does not set these per client socket: accept must copy them from the listener."""
    (listener,) = make_listeners(Config(local_port=0, listen_address=listen))
    with listener:
        listener.setblocking(True)
        port = listener.getsockname()[1]
        with socket.create_connection((connect_to, port), timeout=5):
            conn, _ = listener.accept()
            with conn:
                got = {name: conn.getsockopt(lvl, opt) for name, (lvl, opt, _) in OPTIONS.items()}
    assert got == {name: want for name, (_, _, want) in OPTIONS.items()}
