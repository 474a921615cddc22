"""SIGTERM while 100 downloads run: each either completes intact within the drain time or is
reset; none ends with a clean close after partial data.

The origin's answers are close-delimited (HTTP/1.0, no Content-Length), so curl itself cannot
tell a complete body from a truncated one: only the forwarder's choice between FIN and RST does.
A truncated body with curl exit status 0 is exactly the silent data loss this test exists to
catch; the sha256 of every body is compared with what the origin sent.
"""

from __future__ import annotations

import hashlib
import signal
import time

import pytest
from kit.client import host_of

from handyproxy.lab.netns import ORIGIN_V4
from handyproxy.lab.origin import payload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOWNLOADS = 100
DRAIN = 4.0
RATE = 200_000  # bytes per second per download
SHORT = 400_000  # 2 s at RATE: finishes inside the drain time
LONG = 3_000_000  # 15 s at RATE: cannot finish, must be reset
CURL_RECV_ERROR = 56  # "Failure in receiving network data" (a reset)
CURL_PARTIAL = 18  # "Partial file" (would need a length; listed for completeness)


def download_plan() -> list[tuple[int, str, int]]:
    """(index, host, size): even downloads are short, odd ones long; every 4th over IPv6."""
    plan = []
    for i in range(DOWNLOADS):
        host = host_of(6 if i % 4 == 3 else 4)
        plan.append((i, host, SHORT if i % 2 == 0 else LONG))
    return plan


def test_sigterm_drains_or_resets_100_downloads_and_never_truncates_cleanly(
    lab, start_upstream, start_origin, start_handyproxy, tmp_path
):
    start_upstream("builtin")
    origin = start_origin("http")
    fwd = start_handyproxy("-drain-timeout", f"{DRAIN:g}s")
    baseline = fwd.fd_count()
    ours = rf"/dl\?size=\d+&seed=\d+&rate={RATE}"  # this test's downloads, by their URL
    script = ["set -u", f"cd {tmp_path}"]
    for i, host, size in download_plan():
        url = f"http://{host}/dl?size={size}&seed={i}&rate={RATE}"
        script.append(
            f"(curl -sS -g -o body.{i} --max-time 60 '{url}' 2>err.{i}; echo $? >rc.{i}) &"
        )
    script.append("wait")
    clients = lab.popen("client", ["bash", "-c", "\n".join(script)])
    try:
        origin.log.wait_for(f'"GET {ours} ', timeout=30, count=DOWNLOADS)  # all started
        running = DOWNLOADS - len(origin.log.matching(f"download end .* target={ours} "))
        assert running >= DOWNLOADS // 2  # every long one, at least
        assert fwd.fd_count() >= baseline + 2 * running
        fwd.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        fwd.log.wait_for("stopping", timeout=5)
        # The listener is gone at once: a new client is refused, not queued.
        with pytest.raises(ConnectionRefusedError):
            lab.connect("client", ORIGIN_V4, 80, timeout=3).close()
        status = fwd.proc.wait(DRAIN + 10)
        took = time.monotonic() - stopped_at
        assert clients.wait(60) == 0
    finally:
        lab.stop(clients)
    assert status == 0
    assert DRAIN - 0.5 <= took <= DRAIN + 3, f"exited {took:.1f}s after SIGTERM"

    outcomes = {"complete": 0, "reset": 0}
    for i, _host, size in download_plan():
        rc = int((tmp_path / f"rc.{i}").read_text())
        body = (tmp_path / f"body.{i}").read_bytes() if (tmp_path / f"body.{i}").exists() else b""
        expected = payload(i, size)
        if rc == 0:
            assert len(body) == size, (
                f"download {i}: curl saw a clean end after {len(body)} of {size} bytes"
            )
            assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
            outcomes["complete"] += 1
        else:
            err = (tmp_path / f"err.{i}").read_text()
            assert rc in (CURL_RECV_ERROR, CURL_PARTIAL), f"download {i}: curl {rc}: {err}"
            assert expected.startswith(body), f"download {i}: received bytes differ"
            outcomes["reset"] += 1
    # The short downloads had time to finish; the long ones did not.
    assert outcomes == {"complete": DOWNLOADS // 2, "reset": DOWNLOADS // 2}, outcomes
    stopped = fwd.log.wait_for("stopped")[0].string  # its last line: every record is read
    ends = [r["end"] for r in fwd.records()]
    assert ends.count("shutdown") == DOWNLOADS // 2
    assert ends.count("eof") == DOWNLOADS // 2
    assert "reset=50" in stopped
