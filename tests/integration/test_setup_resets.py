"""Ordinary resets during set-up are one access record each, never a traceback: a client that
resets while it is being sniffed ends ``client-reset``, an upstream that answers 200 and then
resets while the sniffed bytes are replayed ends ``upstream-reset``. Any client could otherwise
flood the journal."""

from __future__ import annotations

import pytest
from kit.wire import expect_reset, reset_close, tls_client_hello

from handyproxy.lab.netns import ORIGIN_V4, Lab

pytestmark = pytest.mark.integration

CLIENTS = 20


def test_clients_resetting_while_sniffed_give_one_record_each(
    lab: Lab, start_upstream, start_handyproxy
):
    start_upstream("builtin", mode="echo")
    fwd = start_handyproxy(sniff_timeout="5s", workers=2)
    before = len(fwd.log.lines)
    partial = tls_client_hello("origin.test")[:40]  # a name is not in there yet: it waits
    for _ in range(CLIENTS):
        sock = lab.connect("client", ORIGIN_V4, 443)
        sock.sendall(partial)
        reset_close(sock)
    fwd.log.wait_for(r"tunnel end .*end=client-reset", count=CLIENTS)
    added = fwd.log.lines[before:]
    assert not [line for line in added if "Traceback" in line or " ERROR " in line]
    assert len(added) == CLIENTS  # the records and nothing else


def test_an_upstream_resetting_during_the_replay_ends_upstream_reset(
    lab: Lab, start_upstream, start_handyproxy
):
    start_upstream("builtin", mode="reset-after-200", port=3132)
    fwd = start_handyproxy(sniff_timeout="2s", upstream_proxy="203.0.113.2:3132")
    before = len(fwd.log.lines)
    for _ in range(CLIENTS):
        sock = lab.connect("client", ORIGIN_V4, 80)
        expect_reset(sock, b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n" + b"x" * 4000)
        sock.close()
    fwd.log.wait_for(r"tunnel end .*target=origin\.test:80 .*end=upstream-reset", count=CLIENTS)
    added = fwd.log.lines[before:]
    assert not [line for line in added if "Traceback" in line or " ERROR " in line]
    assert len(added) == CLIENTS
