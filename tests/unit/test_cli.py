"""The command line: the original's flags unchanged, a TOML file under them, one-line errors.

Scripts and unit files written for the Go original call ``handyproxy -local-port 8043
-upstream-proxy proxy.local:3128``; these tests hold the Python forwarder to that, and to the
documented error shape ``handyproxy: -FLAG: REASON`` with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from handyproxy import __version__, cli, log
from handyproxy.config import Config
from handyproxy.supervisor import master
from handyproxy.upstream import UpstreamSpec

SERVER_RAN = 99


def first_upstream(cfg: Config) -> tuple[str, int]:
    return cfg.upstreams[0].host, cfg.upstreams[0].port


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cli.main`` with flags that parse would start a real listener; stand in for it."""
    monkeypatch.setattr(master, "run", lambda cfg, argv: SERVER_RAN)
    monkeypatch.setattr(log, "setup", lambda *args, **kwargs: None)


ORIGINAL_FLAGS = [
    ("local-port", "8043", "local_port", 8043),
    ("upstream-proxy", "proxy.local:3129", "upstream_proxy", (UpstreamSpec("proxy.local", 3129),)),
    ("dial-timeout", "10s", "dial_timeout", 10.0),
    ("sniff-timeout", "0", "sniff_timeout", 0.0),
    ("sniff-max-bytes", "4096", "sniff_max_bytes", 4096),
]

ADDED_FLAGS = [
    ("listen-address", "::1", "listen_address", "::1"),
    ("idle-timeout", "5m", "idle_timeout", 300.0),
    ("half-close-timeout", "30s", "half_close_timeout", 30.0),
    ("max-connections", "100", "max_connections", 100),
    ("max-client-connections", "10", "max_client_connections", 10),
    ("drain-timeout", "1m30s", "drain_timeout", 90.0),
    ("sniff-ports", "443,80", "sniff_ports", (443, 80)),
    ("workers", "2", "workers", 2),
    ("log-format", "json", "log_format", "json"),
    ("log-level", "debug", "log_level", "debug"),
]


def test_no_flags_gives_the_originals_defaults() -> None:
    cfg = cli.parse_args([])
    assert cfg.local_port == 8443
    assert cfg.upstream_proxy == "localhost:3128"
    assert cfg.dial_timeout == 180.0
    assert cfg.sniff_timeout == -1.0
    assert cfg.sniff_max_bytes == 8192
    assert cfg == Config()


@pytest.mark.parametrize("dashes", ["-", "--"])
@pytest.mark.parametrize(("flag", "value", "attr", "expected"), ORIGINAL_FLAGS + ADDED_FLAGS)
def test_every_flag_works_with_one_or_two_dashes_and_a_separate_value(
    dashes: str, flag: str, value: str, attr: str, expected: object
) -> None:
    cfg = cli.parse_args([dashes + flag, value])
    assert getattr(cfg, attr) == expected


@pytest.mark.parametrize("dashes", ["-", "--"])
@pytest.mark.parametrize(("flag", "value", "attr", "expected"), ORIGINAL_FLAGS + ADDED_FLAGS)
def test_every_flag_works_as_flag_equals_value(
    dashes: str, flag: str, value: str, attr: str, expected: object
) -> None:
    cfg = cli.parse_args([f"{dashes}{flag}={value}"])
    assert getattr(cfg, attr) == expected


def test_the_originals_example_command_line_parses() -> None:
    cfg = cli.parse_args(["-local-port", "8043", "-upstream-proxy", "proxy.local:3128"])
    assert cfg.local_port == 8043
    assert first_upstream(cfg) == ("proxy.local", 3128)


def test_sniff_timeout_minus_one_as_separate_value_is_not_taken_for_a_flag() -> None:
    cfg = cli.parse_args(["-sniff-timeout", "-1", "-local-port", "1"])
    assert cfg.sniff_timeout == -1.0
    assert not cfg.sniffing
    assert cfg.local_port == 1


def test_a_value_may_contain_an_equals_sign_after_the_first() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-log-format=a=b"])
    assert info.value.flag == "-log-format"


def test_the_last_of_a_repeated_flag_wins_as_in_go() -> None:
    assert cli.parse_args(["-local-port", "1", "-local-port=2"]).local_port == 2


def test_valid_flags_reach_the_server_with_the_parsed_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Config] = []
    monkeypatch.setattr(master, "run", lambda cfg, argv: seen.append(cfg) or 0)
    assert cli.main(["-local-port", "8043"]) == 0
    assert [cfg.local_port for cfg in seen] == [8043]


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_prints_and_exits_zero(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == f"handyproxy {__version__}\n"
    assert err == ""


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_prints_every_flag_and_exits_zero(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([flag]) == 0
    out = capsys.readouterr().out
    for name, *_ in ORIGINAL_FLAGS + ADDED_FLAGS:
        assert f"-{name}" in out
    assert "-config" in out
    assert "-version" in out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["-local-port", "x"], "-local-port"),
        (["-local-port", "70000"], "-local-port"),
        (["--local-port=-5"], "-local-port"),
        (["-local-port="], "-local-port"),
        (["-local-port"], "-local-port"),
        (["-upstream-proxy", "proxy.local:http"], "-upstream-proxy"),
        (["-upstream-proxy", "proxy.local:0"], "-upstream-proxy"),
        (["-upstream-proxy", "[2001:db8::1"], "-upstream-proxy"),
        (["-upstream-proxy", ""], "-upstream-proxy"),
        (["-dial-timeout", "3"], "-dial-timeout"),
        (["-dial-timeout", "0s"], "-dial-timeout"),
        (["--dial-timeout=forever"], "-dial-timeout"),
        (["-sniff-timeout", "1x"], "-sniff-timeout"),
        (["-sniff-max-bytes", "0"], "-sniff-max-bytes"),
        (["-sniff-max-bytes", "8k"], "-sniff-max-bytes"),
        (["-idle-timeout", "-1s"], "-idle-timeout"),
        (["-listen-address", "localhost"], "-listen-address"),
        (["-log-format", "xml"], "-log-format"),
        (["-workers", "0"], "-workers"),
        (["-no-such-flag", "1"], "-no-such-flag"),
        (["--no-such-flag=1"], "-no-such-flag"),
        (["stray"], "stray"),
        (["-config"], "-config"),
        (["-sniff-timeout", "9" * 400], "-sniff-timeout"),
        (["-sniff-timeout", "1e400s"], "-sniff-timeout"),
        (["-dial-timeout", "1e3s"], "-dial-timeout"),
        (["-dial-timeout", "\u0663s"], "-dial-timeout"),  # Arabic-Indic digit: Go says no
        (["-local-port", "\u0663"], "-local-port"),
        (["-sniff-ports", "443,x"], "-sniff-ports"),
        (["-sniff-ports", "0"], "-sniff-ports"),
        (["-max-connections", "-1"], "-max-connections"),
        (["-log-level", "loud"], "-log-level"),
        (["--"], "--"),
        (["-"], "-"),
    ],
)
def test_a_bad_value_exits_2_with_one_stderr_line_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {flag}: ")
    assert len(lines[0]) > len(f"handyproxy: {flag}: ")


def test_usage_error_carries_flag_and_reason() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-local-port", "x"])
    assert info.value.flag == "-local-port"
    assert "whole number" in info.value.reason


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "handyproxy.toml"
    path.write_text(text)
    return str(path)


def test_toml_config_sets_values_with_dash_or_underscore_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'local-port = 8043\nupstream_proxy = "proxy.local:3129"\ndial-timeout = "10s"\n'
        "sniff-timeout = 0\nsniff-ports = [443, 80]\nidle_timeout = 0\n",
    )
    cfg = cli.parse_args(["-config", path])
    assert cfg.local_port == 8043
    assert first_upstream(cfg) == ("proxy.local", 3129)
    assert cfg.dial_timeout == 10.0
    assert cfg.sniff_timeout == 0.0
    assert cfg.sniff_ports == (443, 80)
    assert cfg.idle_timeout == 0.0
    assert cfg.sniff_max_bytes == 8192  # untouched keys keep their defaults


@pytest.mark.parametrize("order", ["config-first", "config-last"])
def test_flags_win_over_the_toml_file_wherever_they_stand(tmp_path: Path, order: str) -> None:
    path = write(tmp_path, 'local-port = 8043\nlog-format = "json"\n')
    flags = ["-local-port", "9000"]
    argv = ["--config", path, *flags] if order == "config-first" else [*flags, f"-config={path}"]
    cfg = cli.parse_args(argv)
    assert cfg.local_port == 9000
    assert cfg.log_format == "json"


def test_unknown_toml_key_is_named_with_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "local-port = 8043\nlocal-prot = 8044\n")
    assert cli.main(["-config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {path}: local-prot: ")
    assert "unknown" in lines[0]


def test_bad_toml_value_is_named_with_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'dial-timeout = "3"\n')
    assert cli.main(["-config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {path}: dial-timeout: ")


def test_out_of_range_toml_value_is_blamed_on_the_file_not_a_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "local-port = 70000\n")
    assert cli.main(["-config", path]) == 2
    assert capsys.readouterr().err.startswith(f"handyproxy: {path}: local-port: ")


def test_out_of_range_flag_next_to_a_config_file_is_blamed_on_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "local-port = 8043\n")
    assert cli.main(["-config", path, "-local-port", "70000"]) == 2
    assert capsys.readouterr().err.startswith("handyproxy: -local-port: ")


@pytest.mark.parametrize("text", ["local-port = \n", "[section\n"])
def test_malformed_toml_exits_2_with_one_line(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, text)
    assert cli.main(["-config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {path}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sniff-timeout = []\n", "sniff-timeout"),
        ("sniff-timeout = inf\n", "sniff-timeout"),
        ("sniff-timeout = 1e308\n", "sniff-timeout"),
        ("dial-timeout = 30\n", "dial-timeout"),
        ("local-port = true\n", "local-port"),
        ("local-port = 1.5\n", "local-port"),
        ('log-format = ["json"]\n', "log-format"),
        ("sniff-ports = [443, true]\n", "sniff-ports"),
        ("[server]\nlocal-port = 1\n", "server"),
    ],
)
def test_toml_values_of_the_wrong_type_exit_2_naming_the_key(
    tmp_path: Path, text: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, text)
    assert cli.main(["-config", path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {path}: {key}: ")


def test_toml_file_that_is_not_utf8_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'upstream-proxy = "caf\xe9:3128"\n')
    assert cli.main(["-config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"handyproxy: {path}: ")


def test_missing_config_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "absent.toml")
    assert cli.main(["-config", path]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert path in err


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("proxy.local", "proxy.local", 3128),
        ("proxy.local:8080", "proxy.local", 8080),
        ("localhost:3128", "localhost", 3128),
        ("198.51.100.7", "198.51.100.7", 3128),
        ("198.51.100.7:3129", "198.51.100.7", 3129),
        ("[2001:db8::7]:3129", "2001:db8::7", 3129),
        ("[2001:db8::7]", "2001:db8::7", 3128),
        ("Proxy-1.Example.:3128", "Proxy-1.Example.", 3128),
    ],
)
def test_upstream_proxy_accepts_host_ipv4_and_bracketed_ipv6(
    value: str, host: str, port: int
) -> None:
    assert first_upstream(cli.parse_args(["-upstream-proxy", value])) == (host, port)


@pytest.mark.parametrize(
    "value",
    [
        "2001:db8::7",  # no brackets: is the last group a port or part of the address?
        "2001:db8::7:3128",
        "::1",
    ],
)
def test_upstream_proxy_refuses_a_bare_ipv6_literal(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-upstream-proxy", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("handyproxy: -upstream-proxy: ")
    assert "bracket" in err


@pytest.mark.parametrize(
    "value",
    [
        "proxy.local:",
        ":3128",
        "proxy.local:65536",
        "proxy.local:-1",
        "[proxy.local]:3128",
        "[2001:db8::7]3128",
        "under_score-.bad:3128",
        "-leading.dash:3128",
        "has space:3128",
    ],
)
def test_upstream_proxy_refuses_malformed_addresses(value: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-upstream-proxy", value])
    assert info.value.flag == "-upstream-proxy"


UPSTREAM_FLAGS = [
    ("upstream-policy", "round-robin", "upstream_policy", "round-robin"),
    ("upstream-connect-timeout", "500ms", "upstream_connect_timeout", 0.5),
    ("upstream-max-fails", "3", "upstream_max_fails", 3),
    ("upstream-probe-interval", "30s", "upstream_probe_interval", 30.0),
    ("upstream-probe-target", "origin.test:443", "upstream_probe_target", "origin.test:443"),
]


@pytest.mark.parametrize(("flag", "value", "attr", "expected"), UPSTREAM_FLAGS)
def test_upstream_flags_parse(flag: str, value: str, attr: str, expected: object) -> None:
    assert getattr(cli.parse_args([f"-{flag}={value}"]), attr) == expected
    assert getattr(cli.parse_args([f"--{flag}", value]), attr) == expected


def test_help_lists_the_upstream_flags_with_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["-help"]) == 0
    out = capsys.readouterr().out
    for name, *_ in UPSTREAM_FLAGS:
        assert f"-{name}" in out
    assert "-upstream-credentials-file" in out
    assert "-allow-upstream-ports" in out
    assert "-rule" in out
    assert "(default 'localhost:3128')" in out
    assert "(default 'failover')" in out
    assert "(default '3s')" in out
    assert "(default 'false')" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-allow-upstream-ports"], True),
        (["-allow-upstream-ports", "-local-port", "1"], True),  # a bare boolean takes no value
        (["-allow-upstream-ports=false"], False),
        (["-allow-upstream-ports=1"], True),
        ([], False),
    ],
)
def test_a_boolean_flag_is_go_style(argv: list[str], expected: bool) -> None:
    assert cli.parse_args(argv).allow_upstream_ports is expected


def test_a_boolean_flag_refuses_other_words() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-allow-upstream-ports=yes"])
    assert info.value.flag == "-allow-upstream-ports"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["-upstream-policy", "random"], "-upstream-policy"),
        (["-upstream-connect-timeout", "0s"], "-upstream-connect-timeout"),
        (["-upstream-max-fails", "0"], "-upstream-max-fails"),
        (["-upstream-probe-interval", "-1s"], "-upstream-probe-interval"),
        (["-upstream-probe-target", "origin.test"], "-upstream-probe-target"),  # needs a port
        (["-upstream-probe-target", "origin.test:\u0664\u0664\u0663"], "-upstream-probe-target"),
    ],
)
def test_bad_upstream_settings_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(argv)
    assert info.value.flag == flag
