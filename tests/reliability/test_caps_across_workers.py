"""``-max-connections`` and ``-max-client-connections`` hold for the instance as a whole with
``-workers 2``: the kernel spreads clients over both workers (SO_REUSEPORT), and a cap counted
per worker would let the extra connections through on the worker holding fewer. Every extra is
reset, and a slot freed in one worker is usable through the other."""

from __future__ import annotations

import pytest
from kit.wire import connect_or_reset, echo_works, recv_until_end

from handyproxy.lab.netns import ORIGIN_V4, ORIGIN_V6, Lab

pytestmark = pytest.mark.integration

CAP = 3
EXTRAS = 8


def refused(lab: Lab, host: str, port: int) -> bool:
    sock = connect_or_reset(lab, "client", host, port)
    if sock is None:
        return True
    with sock:
        return recv_until_end(sock, timeout=5)[1] == "reset"


def served(lab: Lab, host: str, port: int) -> bool:
    sock = connect_or_reset(lab, "client", host, port)
    if sock is None:
        return False
    with sock:
        try:
            return echo_works(sock)
        except ConnectionResetError:
            return False


@pytest.mark.parametrize(
    ("flag", "reason"),
    [("-max-connections", "connection-cap"), ("-max-client-connections", "client-cap")],
)
def test_a_cap_holds_for_both_workers_together(lab, start_upstream, start_handyproxy, flag, reason):
    start_upstream("builtin", mode="echo")
    fwd = start_handyproxy(flag, str(CAP), workers=2)
    held = [lab.connect("client", ORIGIN_V4, 7000 + i) for i in range(CAP)]
    assert all(echo_works(s) for s in held)
    assert all(refused(lab, ORIGIN_V4, 7100 + i) for i in range(EXTRAS))
    fwd.log.wait_for(r"tunnel end .*end=refused", count=EXTRAS)
    refusals = [r for r in fwd.records() if r["end"] == "refused"]
    assert len(refusals) == EXTRAS and {r["reason"] for r in refusals} == {reason}
    if reason == "client-cap":  # another client address has its own budget
        other = lab.connect("client", ORIGIN_V6, 7200)
        assert echo_works(other)
        other.close()
        fwd.wait_record(lambda r: r["end"] == "eof" and r["client"].startswith("["))
    held.pop().close()
    fwd.wait_record(lambda r: r["end"] == "eof" and not r["client"].startswith("["))
    # One slot is free, in whichever worker: held open, the next one is over the cap again.
    again = lab.connect("client", ORIGIN_V4, 7300)
    assert echo_works(again)
    assert not served(lab, ORIGIN_V4, 7301)
    for sock in [*held, again]:
        sock.close()
