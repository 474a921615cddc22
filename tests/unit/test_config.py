"""Go durations and Config validation, by example.

The original's duration flags are Go ``time.Duration`` strings, so the table below is what an
operator's existing unit file may already hold; every error must name the setting at fault.
"""

from __future__ import annotations

import dataclasses

import pytest

from handyproxy import config
from handyproxy.config import Config, ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("3m", 180.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("-1s", -1.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("0s", 0.0),
        ("30s", 30.0),
        ("+5s", 5.0),
        ("1h2m3s", 3723.0),
        ("2h45m", 9900.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("100ns", 100e-9),
        ("1s500ms", 1.5),
    ],
)
def test_parse_duration_reads_go_syntax(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "text",
    ["", " ", "3", "1x", "s", "-", "+", "1.5.5s", "1 s", "1S", "ms", "1m30", "1d", "--1s", "s1"],
)
def test_parse_duration_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_parse_duration_says_a_bare_number_needs_a_unit() -> None:
    with pytest.raises(ValueError, match="missing unit"):
        config.parse_duration("3")


def test_parse_duration_refuses_durations_beyond_go_int64_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        config.parse_duration("3000000h")
    assert config.parse_duration("2000000h") == 2000000 * 3600.0


def test_parse_duration_refuses_non_strings() -> None:
    with pytest.raises(ValueError):
        config.parse_duration(30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (180.0, "3m0s"),
        (0.5, "500ms"),
        (90.0, "1m30s"),
        (0.0, "0s"),
        (-1.0, "-1s"),
        (5400, "1h30m0s"),
    ],
)
def test_format_duration_prints_like_go(seconds: float, text: str) -> None:
    assert config.format_duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("-1", -1.0), ("0", 0.0), ("5", 5.0), ("2s", 2.0), ("500ms", 0.5), (-1, -1.0)],
)
def test_sniff_timeout_also_takes_the_originals_bare_seconds(value: object, seconds: float) -> None:
    assert config.parse_sniff_timeout(value) == seconds  # type: ignore[arg-type]


def test_default_config_matches_the_original() -> None:
    cfg = Config()
    assert cfg.local_port == 8443
    assert cfg.upstream_proxy == "localhost:3128"
    assert [(s.host, s.port) for s in cfg.upstreams] == [("localhost", 3128)]
    assert cfg.dial_timeout == 180.0
    assert cfg.sniff_timeout == -1.0
    assert cfg.sniff_max_bytes == 8192
    assert not cfg.sniffing
    assert cfg.validate() is cfg


def test_sniff_timeout_zero_means_one_second_and_sniffing_on() -> None:
    cfg = Config(sniff_timeout=0.0)
    assert cfg.sniffing
    assert cfg.effective_sniff_timeout == 1.0
    assert Config(sniff_timeout=2.5).effective_sniff_timeout == 2.5


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"local_port": 65536}, "local-port"),
        ({"local_port": -1}, "local-port"),
        ({"local_port": True}, "local-port"),
        ({"listen_address": "not-an-ip"}, "listen-address"),
        ({"upstream_proxy": ""}, "upstream-proxy"),
        ({"upstream_proxy": "proxy:0"}, "upstream-proxy"),
        ({"upstream_proxy": "proxy:65536"}, "upstream-proxy"),
        ({"upstream_proxy": "bad_host!:3128"}, "upstream-proxy"),
        ({"dial_timeout": 0.0}, "dial-timeout"),
        ({"dial_timeout": -1.0}, "dial-timeout"),
        ({"sniff_timeout": float("nan")}, "sniff-timeout"),
        ({"sniff_max_bytes": 0}, "sniff-max-bytes"),
        ({"sniff_ports": (443, 0)}, "sniff-ports"),
        ({"idle_timeout": -1.0}, "idle-timeout"),
        ({"half_close_timeout": -0.5}, "half-close-timeout"),
        ({"max_connections": -1}, "max-connections"),
        ({"max_client_connections": -1}, "max-client-connections"),
        ({"drain_timeout": -1.0}, "drain-timeout"),
        ({"workers": 0}, "workers"),
        ({"log_format": "xml"}, "log-format"),
        ({"log_level": "verbose"}, "log-level"),
    ],
)
def test_validate_names_the_field_at_fault(changes: dict[str, object], field: str) -> None:
    cfg = dataclasses.replace(Config(), **changes)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.reason


def test_option_names_are_the_dataclass_fields_with_dashes() -> None:
    names = config.option_names()
    assert names[:6] == [
        "local-port",
        "listen-address",
        "upstream-proxy",
        "dial-timeout",
        "sniff-timeout",
        "sniff-max-bytes",
    ]
    assert all("_" not in name for name in names)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("local-port", "8043", 8043),
        ("local-port", 8043, 8043),
        ("dial-timeout", "10s", 10.0),
        ("dial-timeout", 0, 0.0),
        ("sniff-ports", "443, 80", (443, 80)),
        ("sniff-ports", [443, 80], (443, 80)),
        ("log-format", "json", "json"),
    ],
)
def test_convert_turns_flag_and_toml_values_into_field_types(
    name: str, value: object, expected: object
) -> None:
    assert config.convert(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("local-port", "80a"),
        ("local-port", True),
        ("local-port", 1.5),
        ("dial-timeout", 30),
        ("sniff-ports", "443,https"),
        ("log-format", 1),
    ],
)
def test_convert_refuses_values_of_the_wrong_type(name: str, value: object) -> None:
    with pytest.raises(ValueError):
        config.convert(name, value)


def test_build_takes_dashed_names_and_validates() -> None:
    cfg = config.build({"local-port": 8043, "upstream-proxy": "proxy.local:3128"})
    assert (cfg.local_port, cfg.upstreams[0].name) == (8043, "proxy.local:3128")
    with pytest.raises(ConfigError, match=r"^local-port: "):
        config.build({"local-port": 99999})
