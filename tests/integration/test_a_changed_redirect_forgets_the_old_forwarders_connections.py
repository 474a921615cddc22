"""The lab's REDIRECT and the router's connection tracking: a client port that one forwarder
reset (a reply-side RST leaves the router's conntrack entry in CLOSE, still mapped to that
forwarder's port, for 10 s) is reused to reach the next forwarder on another port. A SYN that
matched such an entry kept the old mapping and was refused; the lab now forgets the entries
of the old port when the redirect changes or goes."""

from __future__ import annotations

import socket

import pytest
from kit.forwarder import DOWN_UPSTREAM
from kit.wire import expect_reset, recv_until_end

from handyproxy.lab.netns import CLIENT_V4, ORIGIN_V4, Lab

pytestmark = pytest.mark.integration

REQUEST = b"GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"


def connect_from(lab: Lab, port: int) -> socket.socket:
    """A connection to the origin's port 80 from this client port."""
    sock = lab.socket("client")
    sock.settimeout(5.0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((CLIENT_V4, port))
        sock.connect((ORIGIN_V4, 80))
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.mark.parametrize("change", ["replaced", "removed-then-added"])
def test_a_client_port_the_old_forwarder_reset_reaches_the_next_one(
    lab: Lab, start_origin, start_upstream, start_handyproxy, change: str
):
    start_origin("http")
    start_upstream("builtin")
    first = start_handyproxy(upstream_proxy=DOWN_UPSTREAM)
    probe = lab.socket("client")
    probe.bind((CLIENT_V4, 0))
    port = probe.getsockname()[1]
    probe.close()
    # The first forwarder cannot dial: it resets the client, often before connect() returns.
    try:
        sock = connect_from(lab, port)
    except ConnectionResetError:
        pass
    else:
        with sock:
            expect_reset(sock, REQUEST)
    first.access(f"client={CLIENT_V4}:{port} ", "end=connect-failed")
    lab.stop(first.proc)
    if change == "removed-then-added":
        lab.unredirect()
    second = start_handyproxy()  # its own port; the redirect now points there
    assert second.port != first.port

    with connect_from(lab, port) as sock:
        sock.sendall(REQUEST)
        reply, end = recv_until_end(sock)

    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert end == "eof"
    assert f"client={CLIENT_V4}:{port} " in second.access(f"client={CLIENT_V4}:{port} ")
