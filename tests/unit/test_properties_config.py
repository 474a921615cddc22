"""Property tests for the settings parsers: durations, flags, TOML files and ``Config.validate``.

Operators type these values by hand and the Ansible role templates them, so any input, however
odd, must end in the parser's own error (exit 2 with a line naming the flag), never a traceback.
"""

from __future__ import annotations

import contextlib
import math
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from handyproxy import address, cli, config

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
GO_MAX_SECONDS = 2**63 / 1e9

# Text that looks like durations, numbers and flag values more often than pure noise does.
duration_alphabet = st.sampled_from([*list("0123456789.+-nsuµmh "), "ms", "us", "٣", "e", "_"])
duration_like = st.lists(duration_alphabet, max_size=24).map("".join)
any_text = st.one_of(duration_like, st.text(max_size=40))


@given(any_text)
def test_parse_duration_returns_finite_seconds_or_raises_value_error(text: str) -> None:
    try:
        seconds = config.parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds)
    assert abs(seconds) <= GO_MAX_SECONDS


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000), st.sampled_from(sorted(UNITS))),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_parse_duration_sums_go_style_parts(parts: list[tuple[int, str]], negative: bool) -> None:
    text = ("-" if negative else "") + "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * UNITS[unit] for n, unit in parts) * (-1 if negative else 1)
    assert config.parse_duration(text) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(
    st.one_of(
        st.text(alphabet="0123456789", min_size=1, max_size=20),
        st.integers(min_value=300, max_value=1000).map(lambda n: "9" * n),
    ),
    st.sampled_from(["", "-", "+"]),
)
def test_sniff_timeout_bare_integer_never_overflows(digits: str, sign: str) -> None:
    """The original accepts ``-sniff-timeout -1``; a huge number must be a usage error."""
    try:
        seconds = config.parse_sniff_timeout(sign + digits)
    except ValueError:
        return
    assert math.isfinite(seconds)


flag_names = st.sampled_from([*config.option_names(), "config", "version", "bogus", ""])
flag_values = st.one_of(
    any_text,
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(alphabet="9", min_size=300, max_size=500),
    st.sampled_from(["[::1]:3128", "[::1", "a:b:c", "host:0", "0", "-1", "1m30s", "text", "json"]),
)


@st.composite
def argv_lists(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        name = draw(flag_names)
        dashes = draw(st.sampled_from(["-", "--"]))
        if name == "config":
            continue  # files are covered below; a random path would read the disk
        if draw(st.booleans()):
            argv.append(f"{dashes}{name}={draw(flag_values)}")
        else:
            argv.append(f"{dashes}{name}")
            if draw(st.booleans()):
                argv.append(draw(flag_values))
    return argv


@given(argv_lists())
@settings(max_examples=300)
def test_parse_args_returns_a_valid_config_or_a_usage_error(argv: list[str]) -> None:
    try:
        cfg = cli.parse_args(argv)
    except cli.UsageError as exc:
        assert exc.flag
        assert exc.reason
        assert "\n" not in str(exc)
        return
    except cli._VersionRequested:
        return
    assert isinstance(cfg, config.Config)
    assert cfg.validate() is cfg


def test_huge_sniff_timeout_flag_is_a_usage_error_not_a_crash() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-sniff-timeout", "9" * 400])
    assert info.value.flag == "-sniff-timeout"


durations = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
)


FIELD_VALUES = {
    "local_port": st.integers(min_value=-(2**40), max_value=2**40),
    "listen_address": st.one_of(st.text(max_size=40), st.ip_addresses().map(str)),
    "upstream_proxy": st.one_of(flag_values, st.text(max_size=60)),
    "dial_timeout": durations,
    "sniff_timeout": durations,
    "sniff_max_bytes": st.integers(min_value=-(2**40), max_value=2**40),
    "sniff_ports": st.lists(st.integers(min_value=-(2**20), max_value=2**20), max_size=3).map(
        tuple
    ),
    "idle_timeout": durations,
    "half_close_timeout": durations,
    "max_connections": st.integers(min_value=-(2**40), max_value=2**40),
    "max_client_connections": st.integers(min_value=-(2**40), max_value=2**40),
    "drain_timeout": durations,
    "workers": st.integers(min_value=-(2**20), max_value=2**20),
    "log_format": st.sampled_from(["text", "json", "xml", ""]),
    "log_level": st.sampled_from(["debug", "info", "warning", "error", "trace"]),
}


@st.composite
def typed_configs(draw: st.DrawFn) -> config.Config:
    """Configs whose fields have the annotated types: defaults with one to three fields changed.

    Changing a few fields at a time keeps most examples valid elsewhere, so a bad value in one
    field is not hidden behind an earlier, unrelated ConfigError.
    """
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3))
    return config.Config(**{name: draw(FIELD_VALUES[name]) for name in names})


@given(typed_configs())
@settings(max_examples=300)
def test_validate_accepts_only_usable_configs(cfg: config.Config) -> None:
    try:
        assert cfg.validate() is cfg
    except config.ConfigError as exc:
        assert exc.field in config.option_names()
        assert exc.reason
        return
    assert 0 <= cfg.local_port <= 65535
    host, port = cfg.upstreams[0].host, cfg.upstreams[0].port
    assert host and 1 <= port <= 65535
    for name in (
        "dial_timeout",
        "sniff_timeout",
        "idle_timeout",
        "half_close_timeout",
        "drain_timeout",
    ):
        seconds = getattr(cfg, name)
        # Every timeout ends up in a loop timer; a non-finite or astronomically large value
        # would overflow it at the first connection instead of failing at start.
        assert math.isfinite(seconds), name
        assert abs(seconds) <= 1e10, name
    assert cfg.dial_timeout > 0
    assert all(1 <= p <= 65535 for p in cfg.sniff_ports)
    assert cfg.workers >= 1


toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.floats().map(
        lambda f: (
            "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf") if math.isinf(f) else repr(f)
        )
    ),
    st.text(alphabet=string.printable.replace('"', "").replace("\\", ""), max_size=20).map(
        lambda s: '"' + s.replace("\n", "").replace("\r", "") + '"'
    ),
    st.sampled_from(
        [
            "true",
            "false",
            "[]",
            "[1, 2]",
            '["80", 443]',
            "{}",
            "1979-05-27",
            '"1m30s"',
            '"-1"',
            "-1",
            "0",
            "[1.5]",
        ]
    ),
)
toml_keys = st.sampled_from(
    [*config.option_names(), *(n.replace("-", "_") for n in config.option_names()), "nope"]
)


@given(st.dictionaries(toml_keys, toml_scalars, max_size=5))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_load_toml_gives_values_or_config_error(tmp_path: Path, doc: dict[str, str]) -> None:
    body = "".join(f"{key} = {value}\n" for key, value in doc.items())
    path = tmp_path / "settings.toml"
    path.write_text(body, encoding="utf-8")
    try:
        values = config.load_toml(str(path))
    except config.ConfigError as exc:
        assert exc.reason
        return
    assert set(values) <= set(config.option_names())
    with contextlib.suppress(config.ConfigError):
        config.build(values)


@given(st.binary(max_size=200))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_load_toml_of_arbitrary_bytes_raises_only_config_error(tmp_path: Path, blob: bytes) -> None:
    assume(blob.strip())
    path = tmp_path / "noise.toml"
    path.write_bytes(blob)
    with contextlib.suppress(config.ConfigError):
        config.load_toml(str(path))


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'upstream-proxy = "\xff"\n')
    with pytest.raises(config.ConfigError):
        config.load_toml(str(path))


@given(st.text(max_size=80), st.one_of(st.none(), st.integers(min_value=0, max_value=70000)))
def test_split_hostport_returns_host_and_port_or_value_error(
    text: str, default: int | None
) -> None:
    try:
        host, port = address.split_hostport(text, default)
    except ValueError:
        return
    assert host
    assert isinstance(port, int)
