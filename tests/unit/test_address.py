"""Address rules that guard the loop and the sniffer: regressions found testing the release.

- A sniffed "name" in a numeric form (``0x7f000001``, ``0x7f.1``) is an address to any resolver
  (inet_aton(3) reads it so), so it must count as an IP literal and never replace the original
  destination.
- ``str.isdigit()`` accepts non-ASCII digits; a port must be ASCII digits only.
"""

from __future__ import annotations

import pytest
from kit.wire import tls_client_hello

from handyproxy.address import is_numeric_host, split_hostport, valid_hostname
from handyproxy.sniff import http as sniff_http
from handyproxy.sniff import tls as sniff_tls

NUMERIC_NAMES = [
    "0x7f000001",  # 127.0.0.1 as one hexadecimal number
    "0x7f.1",  # 127.0.0.1, two parts, hexadecimal first
    "0xcb.0.113.2",  # 203.0.113.2, the lab's upstream
    "0XCB.0.0X71.2",
    "017700000001",  # octal
    "2130706433",  # decimal
    "127.1",
    "203.0.113.2",
    "203.0.113.2.",
    "::1",
    "2001:db8::1",
]


@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_every_numeric_spelling_counts_as_an_address(name: str) -> None:
    assert is_numeric_host(name)
    assert not valid_hostname(name)


@pytest.mark.parametrize(
    "name", ["origin.test", "0x7f.example", "a0x7f", "x7f000001", "1.2.3.4.example", "0xg"]
)
def test_names_that_merely_look_numeric_stay_names(name: str) -> None:
    assert not is_numeric_host(name)
    assert valid_hostname(name)


@pytest.mark.parametrize("name", ["0x7f000001", "0x7f.1", "0xcb.0.113.2"])
def test_the_sniffers_fall_back_to_the_ip_for_numeric_names(name: str) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
    assert sniff_http.host_name(request.replace(name.encode(), b"origin.test")) == "origin.test"
    assert sniff_tls.server_name(tls_client_hello("origin.test")) == "origin.test"
    assert sniff_http.host_name(request) is None
    assert sniff_tls.server_name(tls_client_hello(name)) is None


@pytest.mark.parametrize(
    "port",
    ["\u0663\u0661\u0662\u0668", "\uff13\uff11\uff12\uff18", "3\u0661\u0662\u0668", "\u00b2"],
)
def test_a_port_of_non_ascii_digits_is_refused(port: str) -> None:
    assert not port.isascii() and any(c.isdigit() for c in port)
    with pytest.raises(ValueError, match="not a number from 1 to 65535"):
        split_hostport(f"proxy.local:{port}")
    with pytest.raises(ValueError, match="not a number from 1 to 65535"):
        split_hostport(f"[2001:db8::1]:{port}")


def test_ascii_ports_still_parse() -> None:
    assert split_hostport("proxy.local:3128") == ("proxy.local", 3128)
    assert split_hostport("[2001:db8::1]:08080") == ("2001:db8::1", 8080)
