"""Property tests for the hostname sniffers (TLS SNI and HTTP Host) and the CONNECT request.

The sniffers read bytes chosen by whoever is behind the firewall, so they must never raise, never
give different answers for the same bytes delivered in different pieces, and never return
anything that could smuggle a header, an address or a port into the CONNECT request.
"""

from __future__ import annotations

import ipaddress
import re
import struct

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from handyproxy import address, connect
from handyproxy.sniff import MORE, http, tls

SNIFFERS = {"tls": tls.server_name, "http": http.host_name}
NAME_RE = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")

label = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,20}[A-Za-z0-9])?", fullmatch=True)
dns_names = (
    st.lists(label, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda n: len(n) <= 253 and not n.replace(".", "").isdigit())
    # "0x0", "0x7f.1": addresses in a resolver's eyes, refused on purpose (test_address.py)
    .filter(lambda n: not address.is_numeric_host(n))
)


def check_answer(answer: object) -> None:
    """A sniffer answer is MORE, None, or a lower-case DNS name that is not an IP literal."""
    if answer is MORE or answer is None:
        return
    assert isinstance(answer, str)
    assert NAME_RE.fullmatch(answer.rstrip(".")), answer
    assert len(answer) <= 254
    assert answer == answer.lower()
    try:
        ipaddress.ip_address(answer)
    except ValueError:
        pass
    else:
        raise AssertionError(f"IP literal {answer!r} returned as a name")


# --- TLS ---------------------------------------------------------------------------------------


def client_hello(name: bytes, *, padding: int = 0, extra_ext_first: bool = False) -> bytes:
    """A ClientHello handshake message carrying SNI ``name`` (no record layer)."""
    sni = struct.pack("!BH", 0, len(name)) + name
    sni_ext = struct.pack("!HH", 0, len(sni) + 2) + struct.pack("!H", len(sni)) + sni
    exts = [sni_ext]
    if padding:
        exts.append(struct.pack("!HH", 21, padding) + b"\0" * padding)  # padding extension
    if extra_ext_first:
        exts.insert(0, struct.pack("!HH", 43, 3) + b"\x02\x03\x04")  # supported_versions
    ext_bytes = b"".join(exts)
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x20"
        + bytes(32)
        + struct.pack("!H", 4)
        + b"\x13\x01\x13\x02"
        + b"\x01\x00"
        + struct.pack("!H", len(ext_bytes))
        + ext_bytes
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int]) -> bytes:
    """Split a handshake message over TLS records of the given payload sizes."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(message)]:
        if pos >= len(message):
            break
        chunk = message[pos : pos + max(1, size)]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
        pos += len(chunk)
    return bytes(out)


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_tls_sniffer_never_raises_on_noise(data: bytes) -> None:
    check_answer(tls.server_name(data))


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_tls_sniffer_never_raises_on_noise_after_a_handshake_header(tail: bytes) -> None:
    """Noise behind a plausible record and hello header reaches the inner length parsing."""
    data = b"\x16\x03\x01" + struct.pack("!H", len(tail) + 4) + b"\x01" + tail[:3] + tail[3:]
    check_answer(tls.server_name(data))


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    """Real hellos with a few bytes overwritten: exercises every length field's bounds."""
    wire = bytearray(records(client_hello(draw(dns_names).encode()), []))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        pos = draw(st.integers(min_value=0, max_value=len(wire) - 1))
        wire[pos] = draw(st.integers(min_value=0, max_value=255))
    cut = draw(st.integers(min_value=0, max_value=len(wire)))
    return bytes(wire[:cut]) if draw(st.booleans()) else bytes(wire)


@given(mutated_hellos())
@settings(max_examples=500)
def test_tls_sniffer_survives_corrupted_length_fields(data: bytes) -> None:
    check_answer(tls.server_name(data))


@given(
    dns_names,
    st.lists(st.integers(min_value=1, max_value=300), max_size=6),
    st.integers(min_value=0, max_value=3000),
    st.booleans(),
    st.binary(max_size=50),
)
@settings(max_examples=300)
def test_tls_sni_is_found_however_the_hello_is_split_into_records(
    name: str, sizes: list[int], padding: int, ext_first: bool, after: bytes
) -> None:
    wire = records(client_hello(name.encode(), padding=padding, extra_ext_first=ext_first), sizes)
    assert tls.server_name(wire + after) == name.lower()


@given(dns_names, st.lists(st.integers(min_value=1, max_value=200), max_size=4), st.data())
@settings(max_examples=200)
def test_tls_every_prefix_of_a_hello_asks_for_more(
    name: str, sizes: list[int], data: st.DataObject
) -> None:
    wire = records(client_hello(name.encode()), sizes)
    cut = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
    assert tls.server_name(wire[:cut]) is MORE


@given(st.binary(max_size=400), st.binary(min_size=1, max_size=100))
@settings(max_examples=500)
def test_tls_answer_once_decided_does_not_change_with_more_bytes(data: bytes, more: bytes) -> None:
    first = tls.server_name(data)
    assume(first is not MORE)
    assert tls.server_name(data + more) == first


def test_tls_ip_literal_in_sni_is_not_used_as_a_name() -> None:
    assert tls.server_name(records(client_hello(b"203.0.113.9"), [])) is None


def test_tls_sni_with_control_bytes_is_refused() -> None:
    assert tls.server_name(records(client_hello(b"a.test\r\nX-Evil: 1"), [])) is None


# --- HTTP --------------------------------------------------------------------------------------

header_name = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
header_value = st.from_regex(r"[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?", fullmatch=True)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[bytes, str, int]:
    """A request with a Host header among others; returns (bytes, name, end of Host line)."""
    name = draw(dns_names)
    port = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=65535)))
    host_value = name if port is None else f"{name}:{port}"
    host_key = draw(st.sampled_from(["Host", "host", "HOST"]))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    others = draw(st.lists(st.tuples(header_name, header_value), max_size=4))
    where = draw(st.integers(min_value=0, max_value=len(others)))
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "M-SEARCH"]))
    lines = [f"{method} /{draw(header_value).replace(' ', '')} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in others[:where]]
    lines.append(f"{host_key}:{draw(st.sampled_from(['', ' ', '  ']))}{host_value}")
    host_end = len(eol.join(lines).encode()) + len(eol)
    lines += [f"{k}: {v}" for k, v in others[where:]]
    return (eol.join(lines) + eol + eol).encode(), name, host_end


@given(http_requests(), st.binary(max_size=40))
@settings(max_examples=150)
def test_http_host_name_is_found_and_its_port_ignored(
    request: tuple[bytes, str, int], body: bytes
) -> None:
    wire, name, _ = request
    assert http.host_name(wire + body) == name.lower()


@given(http_requests(), st.data())
@settings(max_examples=150)
def test_http_every_prefix_before_the_host_line_ends_asks_for_more(
    request: tuple[bytes, str, int], data: st.DataObject
) -> None:
    wire, _, host_end = request
    cut = data.draw(st.integers(min_value=0, max_value=host_end - 1))
    assert http.host_name(wire[:cut]) is MORE


@given(st.binary(max_size=400))
@settings(max_examples=500)
def test_http_sniffer_never_raises_on_noise(data: bytes) -> None:
    check_answer(http.host_name(data))


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_http_sniffer_never_raises_on_request_like_text(text: str) -> None:
    data = ("GET / HTTP/1.1\r\n" + text).encode("utf-8", "surrogatepass")
    check_answer(http.host_name(data))


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=100))
@settings(max_examples=500)
def test_http_answer_once_decided_does_not_change_with_more_bytes(data: bytes, more: bytes) -> None:
    for prefix in (data, b"GET / HTTP/1.1\r\n" + data):
        first = http.host_name(prefix)
        if first is not MORE:
            assert http.host_name(prefix + more) == first


def test_http_host_ip_literal_is_not_used_as_a_name() -> None:
    assert http.host_name(b"GET / HTTP/1.1\r\nHost: 203.0.113.2:3128\r\n\r\n") is None
    assert http.host_name(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:22\r\n\r\n") is None


# --- CONNECT request from sniffed names ----------------------------------------------------------


@given(st.sampled_from(sorted(SNIFFERS)), st.binary(max_size=300), st.integers(1, 65535))
@settings(max_examples=500)
def test_no_sniffed_bytes_can_add_a_header_or_change_the_port(
    which: str, data: bytes, port: int
) -> None:
    """Whatever a client sends, the CONNECT request is one well-formed request to ``port``."""
    prefix = b"GET / HTTP/1.1\r\nHost: " if which == "http" else b""
    name = SNIFFERS[which](prefix + data)
    if not isinstance(name, str):
        return
    request = connect.build_request(name, port)
    lines = request.split(b"\r\n")
    assert lines[0] == f"CONNECT {name}:{port} HTTP/1.1".encode()
    assert lines[1] == f"Host: {name}:{port}".encode()
    assert request.endswith(b"\r\n\r\n")
    assert request.count(b"\r\n\r\n") == 1
    assert b"\n" not in request.replace(b"\r\n", b"")


@given(st.ip_addresses(), st.integers(1, 65535))
def test_connect_request_brackets_ipv6_literals(ip: ipaddress._BaseAddress, port: int) -> None:
    request = connect.build_request(str(ip), port)
    authority = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert request.startswith(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode())


def test_tls_record_header_alone_asks_for_more() -> None:
    """A first segment that ends right after the 5-byte record header is a valid prefix."""
    wire = records(client_hello(b"origin.test"), [])
    for cut in range(len(wire)):
        assert tls.server_name(wire[:cut]) is MORE, cut
