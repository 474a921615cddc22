"""An upstream that answers badly: every connection ends within its bound (the dial timeout, or
at once when the reply cannot be valid), the client is reset rather than left hanging, the end
is logged, and the process carries on with its descriptors back at their idle count.
"""

from __future__ import annotations

import time

import pytest
from kit.wire import connect_or_reset, recv_until_end

from handyproxy.lab.netns import ORIGIN_V4

pytestmark = pytest.mark.integration

DIAL_TIMEOUT = 3.0

# name, the upstream's options, what the client sees, access-record end, the longest it may take
BAD_REPLIES = [
    ("endless", {"mode": "endless", "delay": 0.1}, "reset", "connect-failed", DIAL_TIMEOUT + 1.5),
    ("stall", {"mode": "stall"}, "reset", "connect-failed", DIAL_TIMEOUT + 1.5),
    ("oversized", {"mode": "oversized", "size": 64 * 1024}, "reset", "connect-failed", 1.5),
    ("garbage", {"mode": "garbage", "size": 4096}, "reset", "connect-failed", 1.5),
    ("refuse", {"reply_status": 403}, "reset", "connect-failed", 1.5),
    ("reset-after-200", {"mode": "reset-after-200"}, "reset", "upstream-reset", 1.5),
]


@pytest.mark.parametrize(
    ("name", "opts", "client_sees", "end", "bound"), BAD_REPLIES, ids=[m[0] for m in BAD_REPLIES]
)
def test_bad_upstream_reply_resets_client_within_bound(
    lab, start_upstream, start_handyproxy, name, opts, client_sees, end, bound
):
    upstream = start_upstream("builtin", **opts)
    fwd = start_handyproxy("-dial-timeout", f"{DIAL_TIMEOUT:g}s")
    baseline = fwd.fd_count()
    started = time.monotonic()
    data, how = b"", "reset"  # a fast reset can beat connect() or the first write
    sock = connect_or_reset(lab, "client", ORIGIN_V4, 443)
    if sock is not None:
        try:
            sock.sendall(b"client hello")
        except ConnectionResetError:
            pass
        else:
            data, how = recv_until_end(sock, timeout=DIAL_TIMEOUT + 5)
        sock.close()
    elapsed = time.monotonic() - started
    assert (how, data) == (client_sees, b"")
    assert elapsed <= bound, f"{name}: took {elapsed:.2f}s"
    record = fwd.wait_record()
    assert record["end"] == end
    if end == "connect-failed":
        assert record["up"] == "0"  # nothing reached a tunnel that never opened
    upstream.wait_event("connect")
    assert fwd.wait_fds(baseline) == baseline
    assert fwd.alive()


def test_reply_sent_byte_by_byte_within_timeout_opens_the_tunnel(
    lab, start_upstream, start_handyproxy
):
    start_upstream("builtin", mode="drip", delay=0.03)  # 39 bytes: about 1.2 s
    fwd = start_handyproxy("-dial-timeout", f"{DIAL_TIMEOUT:g}s")
    baseline = fwd.fd_count()
    sock = lab.connect("client", ORIGIN_V4, 22)
    sock.sendall(b"ping")
    sock.settimeout(DIAL_TIMEOUT + 2)
    assert sock.recv(100) == b"ping"
    sock.close()
    record = fwd.wait_record()
    assert (record["status"], record["end"]) == ("200", "eof")
    assert fwd.wait_fds(baseline) == baseline


def test_reply_dripping_past_the_dial_timeout_resets_client(lab, start_upstream, start_handyproxy):
    start_upstream("builtin", mode="drip", delay=0.5)  # 39 bytes: about 20 s
    fwd = start_handyproxy("-dial-timeout", "2s")
    started = time.monotonic()
    sock = lab.connect("client", ORIGIN_V4, 22)
    data, how = recv_until_end(sock, timeout=10)
    sock.close()
    assert (how, data) == ("reset", b"")
    assert time.monotonic() - started <= 3.5
    assert fwd.wait_record()["end"] == "connect-failed"


def test_upstream_200_then_close_ends_the_tunnel_promptly(lab, start_upstream, start_handyproxy):
    """The origin closed at once: the client gets the FIN now, not at a timeout."""
    start_upstream("builtin", mode="close-after-200")
    fwd = start_handyproxy("-dial-timeout", f"{DIAL_TIMEOUT:g}s", "-half-close-timeout", "20s")
    baseline = fwd.fd_count()
    started = time.monotonic()
    sock = lab.connect("client", ORIGIN_V4, 25)
    data, how = recv_until_end(sock, timeout=10)
    took = time.monotonic() - started
    assert (how, data) == ("eof", b"")
    assert took <= 1.5, f"EOF from the upstream reached the client after {took:.2f}s"
    sock.close()
    record = fwd.wait_record(timeout=25)
    assert record["status"] == "200"
    assert record["end"] == "eof"
    assert fwd.wait_fds(baseline) == baseline


def test_many_bad_replies_in_parallel_leave_the_process_serving(
    lab, start_upstream, start_handyproxy
):
    """50 garbage replies at once, then an honest upstream: the same process serves it."""
    start_upstream("builtin", mode="garbage", size=100)
    fwd = start_handyproxy("-dial-timeout", f"{DIAL_TIMEOUT:g}s")
    socks = [connect_or_reset(lab, "client", ORIGIN_V4, 443) for _ in range(50)]
    for sock in socks:
        if sock is None:
            continue  # reset before connect() even returned
        _, how = recv_until_end(sock, timeout=5)
        sock.close()
        assert how == "reset"
    start_upstream("builtin", mode="echo")  # takes the garbage one's place
    sock = lab.connect("client", ORIGIN_V4, 443)
    sock.sendall(b"still here?")
    sock.settimeout(5)
    assert sock.recv(100) == b"still here?"
    sock.close()
    assert fwd.alive()
    fwd.log.wait_for("end=connect-failed", count=50)  # the records may trail the resets
    ends = [r["end"] for r in fwd.records()]
    assert ends.count("connect-failed") == 50
