"""Proxy-Authorization: Basic against a real squid with basic_ncsa_auth: the right password opens
the tunnel, a wrong one resets the client and is logged with the scheme squid asked for, and the
password appears nowhere in the forwarder's output. The file may come the way systemd's
LoadCredential= delivers it: a name under $CREDENTIALS_DIRECTORY.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from kit.client import Client
from kit.origins import INDEX

from handyproxy.lab.netns import ORIGIN_V4

pytestmark = pytest.mark.integration

PORT = 3150
USER, PASSWORD = "alice", "Right-Pa55:word"
WRONG = "Wrong-Pa55:word"


def secret_file(tmp_path: Path, password: str, name: str = "upstream") -> Path:
    path = tmp_path / name
    path.write_text(f"{USER}:{password}\n")
    path.chmod(0o400)
    return path


def assert_no_secret(text: str, password: str) -> None:
    token = base64.b64encode(f"{USER}:{password}".encode()).decode()
    assert password not in text
    assert token not in text


def test_the_right_password_opens_the_tunnel(
    tmp_path: Path, client: Client, start_origin, start_upstream, start_handyproxy
):
    start_origin("http")
    squid = start_upstream("squid", port=PORT, users={USER: PASSWORD})
    forwarder = start_handyproxy(
        upstream_proxy=squid.address, upstream_credentials_file=secret_file(tmp_path, PASSWORD)
    )
    result, out = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == INDEX
    assert "status=200 " in forwarder.access(f"upstream={squid.address} ")
    squid.log.wait_for(rf" CONNECT {ORIGIN_V4}:80 {USER} ", 10)
    assert_no_secret(forwarder.log.text(), PASSWORD)


def test_without_credentials_squid_asks_and_the_log_says_for_which_scheme(
    client: Client, start_upstream, start_handyproxy
):
    squid = start_upstream("squid", port=PORT, users={USER: PASSWORD})
    forwarder = start_handyproxy(upstream_proxy=squid.address)
    client.expect_reset(4, 80, b"GET / HTTP/1.1\r\n\r\n")
    record = forwarder.access("status=407 ")
    assert "end=connect-failed" in record
    assert "scheme Basic" in record
    assert "no credentials configured" in record


def test_a_wrong_password_resets_the_client_and_stays_out_of_the_log(
    tmp_path: Path, client: Client, start_upstream, start_handyproxy
):
    squid = start_upstream("squid", port=PORT, users={USER: PASSWORD})
    forwarder = start_handyproxy(
        upstream_proxy=squid.address, upstream_credentials_file=secret_file(tmp_path, WRONG),
        log_level="debug",
    )  # fmt: skip
    elapsed = client.expect_reset(4, 80, b"GET / HTTP/1.1\r\n\r\n")
    assert elapsed < 2.0
    record = forwarder.access("status=407 ")
    assert "end=connect-failed" in record
    assert 'reason="upstream wants proxy authentication (scheme Basic); credentials refused"' in (
        record
    )
    squid.log.wait_for(r"TCP_DENIED/407 ", 10)
    assert_no_secret(forwarder.log.text(), WRONG)
    assert forwarder.proc.poll() is None  # a refusal ends one connection, never the process


def test_a_credential_name_is_found_under_credentials_directory(
    tmp_path: Path, client: Client, start_origin, start_upstream, start_handyproxy
):
    """What systemd's LoadCredential=upstream:/etc/handyproxy/secret hands the service."""
    start_origin("http")
    squid = start_upstream("squid", port=PORT, users={USER: PASSWORD})
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret_file(creds, PASSWORD, name="upstream")
    forwarder = start_handyproxy(
        upstream_proxy=squid.address, upstream_credentials_file="upstream",
        env={"CREDENTIALS_DIRECTORY": str(creds)},
    )  # fmt: skip
    result, _ = client.curl(f"http://{ORIGIN_V4}/index.html", 4)
    assert result.returncode == 0, result.stderr
    assert "status=200 " in forwarder.access(f"upstream={squid.address} ")
    assert str(creds) not in " ".join(forwarder.argv)  # the command line names no path
