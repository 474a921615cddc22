"""The upstream list and its credentials as the configuration gives them.

A single ``-upstream-proxy host:port`` must mean exactly what it always did; lists, repeats and
TOML tables add upstreams and per-upstream settings. Credentials come only from files, and no
error message, repr or log line may carry the password.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from handyproxy import cli, config
from handyproxy.config import Config, ConfigError
from handyproxy.connect import basic_authorization
from handyproxy.upstream import DEFAULT_GROUP, UpstreamSpec
from handyproxy.upstream import spec as upstream_spec

SECRET = "s3cr3t-Pa55:with-colon"


def names(cfg: Config) -> list[str]:
    return [s.name for s in cfg.upstreams]


def test_a_single_upstream_is_what_it_always_was() -> None:
    cfg = cli.parse_args(["-upstream-proxy", "proxy.local:3129"])
    assert cfg.upstreams == (UpstreamSpec("proxy.local", 3129),)
    assert cfg.upstreams[0].group == DEFAULT_GROUP
    assert cfg.upstreams[0].credentials is None
    assert names(cli.parse_args(["-upstream-proxy", "proxy.local"])) == ["proxy.local:3128"]
    assert names(Config()) == ["localhost:3128"]


def test_a_comma_list_and_repeated_flags_add_up_in_order() -> None:
    cfg = cli.parse_args(
        ["-upstream-proxy", "a.local:3128, b.local", "--upstream-proxy=[2001:db8::7]:8080"]
    )
    assert names(cfg) == ["a.local:3128", "b.local:3128", "[2001:db8::7]:8080"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('upstream-proxy = "a.local:1"', ["a.local:1"]),
        ('upstream-proxy = "a.local:1,b.local:2"', ["a.local:1", "b.local:2"]),
        ('upstream-proxy = ["a.local:1", "b.local:2"]', ["a.local:1", "b.local:2"]),
        (
            '[[upstream-proxy]]\naddress = "a.local:1"\n[[upstream-proxy]]\naddress = "b.local"\n',
            ["a.local:1", "b.local:3128"],
        ),
        ('upstream-proxy = ["a.local:1", {address = "b.local:2"}]', ["a.local:1", "b.local:2"]),
    ],
)
def test_toml_takes_a_string_an_array_or_tables(
    tmp_path: Path, toml: str, expected: list[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    assert names(cli.parse_args(["-config", str(path)])) == expected


def test_flags_replace_the_toml_list_rather_than_extend_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('upstream-proxy = ["a.local:1", "b.local:2"]\n')
    cfg = cli.parse_args(["-config", str(path), "-upstream-proxy", "c.local:3"])
    assert names(cfg) == ["c.local:3"]


def test_a_table_sets_group_and_credentials_file(tmp_path: Path) -> None:
    creds = tmp_path / "partner"
    creds.write_text(f"alice:{SECRET}\n")
    path = tmp_path / "c.toml"
    path.write_text(
        "[[upstream-proxy]]\n"
        'address = "cntlm.local:3128"\n'
        "[[upstream-proxy]]\n"
        'address = "squid.partner.example:8080"\n'
        'group = "partners"\n'
        f'credentials_file = "{creds}"\n'
        "[[rule]]\n"
        'dst = "10.0.0.0/8"\n'
        'action = "proxy"\n'
        'group = "partners"\n'
    )
    cfg = cli.parse_args(["-config", str(path)])
    first, second = cfg.upstreams
    assert (first.group, first.credentials) == (DEFAULT_GROUP, None)
    assert second.group == "partners"
    assert second.credentials is not None
    assert second.credentials.user == "alice"
    assert second.credentials.authorization == basic_authorization("alice", SECRET)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty address"),
        ("a.local:3128,,b.local", "empty entry"),
        ("a.local:3128,a.local:3128", "listed twice"),
        ("a.local,a.local:3128", "listed twice"),
        ("user:pw@proxy.local:3128", "credentials do not belong"),
        ("proxy.local:\u0663\u0661\u0662\u0668", "not a number"),  # Arabic-Indic 3128
        ("proxy.local:\uff13\uff11\uff12\uff18", "not a number"),  # full-width 3128
        ("proxy.local:0", "not a number from 1 to 65535"),
        ("2001:db8::7", "brackets"),
    ],
)
def test_bad_upstream_lists_name_the_flag_and_why(value: str, reason: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-upstream-proxy", value])
    assert info.value.flag == "-upstream-proxy"
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("upstream-proxy = []", "at least one"),
        ("upstream-proxy = 3128", "expected host:port"),
        ("upstream-proxy = [3128]", "expected host:port or a table"),
        ('[[upstream-proxy]]\ngroup = "x"', "entry 1: address is missing"),
        ('[[upstream-proxy]]\naddress = "a.local"\nweight = "2"', "unknown key 'weight'"),
        ('[[upstream-proxy]]\naddress = "a.local"\ngroup = 2', "group must be a string"),
        ('[[upstream-proxy]]\naddress = "a.local"\ngroup = "a.b"', "not a name"),
        ('[[upstream-proxy]]\naddress = "a.local"\ngroup = "x"', "no upstream is in group"),
    ],
)
def test_bad_toml_upstreams_name_the_key_and_why(tmp_path: Path, toml: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-config", str(path)])
    assert info.value.flag.endswith("upstream-proxy")
    assert reason in info.value.reason


def test_config_built_directly_from_a_string_is_parsed_the_same_way() -> None:
    cfg = Config(upstream_proxy="a.local:1,b.local:2").validate()
    assert names(cfg) == ["a.local:1", "b.local:2"]
    with pytest.raises(ConfigError) as info:
        Config(upstream_proxy="a.local:1,").validate()
    assert info.value.field == "upstream-proxy"


# Credentials files


def write_creds(tmp_path: Path, data: bytes | str, name: str = "creds") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "content",
    [f"alice:{SECRET}", f"alice:{SECRET}\n", f"alice:{SECRET}\r\n", f"\nalice:{SECRET}\n\n"],
)
def test_credentials_file_holds_one_user_password_line(tmp_path: Path, content: str) -> None:
    path = write_creds(tmp_path, content)
    cfg = cli.parse_args(["-upstream-credentials-file", str(path)])
    (spec,) = cfg.upstreams
    assert spec.credentials is not None
    assert spec.credentials.user == "alice"
    assert spec.credentials.authorization == basic_authorization("alice", SECRET)


def test_the_secret_is_in_no_repr(tmp_path: Path) -> None:
    path = write_creds(tmp_path, f"alice:{SECRET}\n")
    cfg = cli.parse_args(["-upstream-credentials-file", str(path)])
    shown = repr(cfg) + repr(cfg.upstreams) + repr(cfg.upstreams[0].credentials)
    assert SECRET not in shown
    assert basic_authorization("alice", SECRET).decode() not in shown
    assert "password=<hidden>" in repr(cfg.upstreams[0].credentials)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "found no line"),
        ("\n\n", "found no line"),
        (f"alice:{SECRET}\nbob:{SECRET}\n", "found 2 lines"),
        ("alice" + SECRET.replace(":", "") + "\n", "has no ':'"),
        (f":{SECRET}\n", "user name before ':' is empty"),
        ("alice:\n", "password after ':' is empty"),
        (f"alice:{SECRET}\x00\n", "password holds a control character"),
        (f"al\x1bice:{SECRET}\n", "user name holds a control character"),
        (b"alice:\xff" + SECRET.encode(), "not UTF-8"),
        ("x" * 5000, "larger than 4096 bytes"),
    ],
)
def test_bad_credentials_files_name_field_and_file_never_the_secret(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    path = write_creds(tmp_path, content)
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-upstream-credentials-file", str(path)])
    assert info.value.flag == "-upstream-credentials-file"
    assert str(path) in info.value.reason
    assert reason in info.value.reason
    assert SECRET not in str(info.value)
    assert "alice" not in str(info.value)


def test_missing_unreadable_and_odd_files_are_named(tmp_path: Path) -> None:
    cases = {
        str(tmp_path / "absent"): "No such file",
        str(tmp_path): "not a regular file",
    }
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases[str(fifo)] = "not a regular file"  # and it must not hang waiting for a writer
    for path, reason in cases.items():
        with pytest.raises(cli.UsageError) as info:
            cli.parse_args(["-upstream-credentials-file", path])
        assert info.value.flag == "-upstream-credentials-file"
        assert reason in info.value.reason, path


def test_a_relative_name_is_looked_up_under_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd's LoadCredential=upstream:/root/only/file hands the unit a private copy."""
    write_creds(tmp_path, f"alice:{SECRET}\n", name="upstream")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")
    cfg = cli.parse_args(["-upstream-credentials-file", "upstream"])
    assert cfg.upstreams[0].credentials is not None
    assert cfg.upstreams[0].credentials.source == str(tmp_path / "upstream")
    absolute = write_creds(tmp_path, f"bob:{SECRET}\n", name="elsewhere")
    cfg = cli.parse_args(["-upstream-credentials-file", str(absolute)])
    assert cfg.upstreams[0].credentials.user == "bob"  # type: ignore[union-attr]


def test_without_credentials_directory_a_relative_name_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-upstream-credentials-file", "upstream"])
    assert "$CREDENTIALS_DIRECTORY" in info.value.reason
    write_creds(tmp_path, f"alice:{SECRET}\n", name="upstream")
    assert cli.parse_args(["-upstream-credentials-file", "upstream"]).upstreams[0].credentials


def test_per_upstream_file_overrides_the_global_one_and_empty_means_none(tmp_path: Path) -> None:
    glob = write_creds(tmp_path, f"global:{SECRET}\n", name="global")
    own = write_creds(tmp_path, f"own:{SECRET}\n", name="own")
    path = tmp_path / "c.toml"
    path.write_text(
        f'upstream-credentials-file = "{glob}"\n'
        'upstream-proxy = ["a.local:1", {address = "b.local:2", credentials-file = "'
        + str(own)
        + '"}, {address = "c.local:3", credentials-file = ""}]\n'
    )
    a, b, c = cli.parse_args(["-config", str(path)]).upstreams
    assert a.credentials is not None and a.credentials.user == "global"
    assert b.credentials is not None and b.credentials.user == "own"
    assert c.credentials is None


def test_a_bad_per_upstream_file_names_the_upstream_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'upstream-proxy = [{{address = "b.local:2", credentials-file = "{tmp_path}/nope"}}]\n'
    )
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-config", str(path)])
    assert info.value.flag == f"{path}: upstream-proxy"
    assert "b.local:2: credentials-file: " in info.value.reason


def test_credentials_are_read_again_by_each_new_config(tmp_path: Path) -> None:
    """A reload builds a new Config: a rotated password is picked up, never cached across."""
    path = write_creds(tmp_path, f"alice:{SECRET}\n")
    first = cli.parse_args(["-upstream-credentials-file", str(path)])
    path.write_text("alice:rotated\n")
    second = cli.parse_args(["-upstream-credentials-file", str(path)])
    assert first.upstreams[0].credentials != second.upstreams[0].credentials
    assert second.upstreams[0].credentials.authorization == basic_authorization(  # type: ignore[union-attr]
        "alice", "rotated"
    )


def test_parse_upstreams_is_idempotent() -> None:
    specs = upstream_spec.parse_upstreams("a.local:1,b.local")
    assert upstream_spec.parse_upstreams(specs) == specs
    assert config.display("upstream-proxy", specs) == "a.local:1,b.local:3128"


def test_the_documented_toml_example_is_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/interfaces.md shows the TOML shape; it must parse to what it says."""
    doc = (Path(__file__).parents[2] / "docs" / "interfaces.md").read_text()
    example = doc.split("### Several upstreams", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.toml").write_text(example)
    for name in ("cntlm", "partner"):
        write_creds(tmp_path, f"{name}-user:{SECRET}\n", name=name)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = cli.parse_args(["-config", str(tmp_path / "example.toml")])
    assert [(s.name, s.group, s.credentials.user) for s in cfg.upstreams] == [  # type: ignore[union-attr]
        ("127.0.0.1:3128", "default", "cntlm-user"),
        ("127.0.0.1:3129", "default", "cntlm-user"),
        ("squid.partner.example:8080", "partners", "partner-user"),
    ]
    assert [str(r) for r in cfg.rules] == [
        "dst=10.0.0.0/8,fd00::/8 direct",
        "name=.partner.example proxy:partners",
        "port=25 reject",
    ]
