"""Per-destination rules: every kind of condition, first-match order, and clear errors.

The rules decide where a connection goes (an upstream group, straight to its destination, or a
reset); a wrong parse would send traffic somewhere the operator never meant, so every spelling
is checked against what it must mean.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from handyproxy import cli, config
from handyproxy.rules import UNDECIDED, Rule, RuleSet, parse_rule, parse_rules

UPSTREAMS = [
    "-upstream-proxy",
    "cntlm.local:3128",
    "-sniff-timeout",
    "1s",
]


def ruleset(*texts: str) -> RuleSet:
    return RuleSet(parse_rules(list(texts)))


@pytest.mark.parametrize(
    ("text", "ip", "port", "name", "matches"),
    [
        ("dst=10.0.0.0/8 direct", "10.1.2.3", 443, None, True),
        ("dst=10.0.0.0/8 direct", "11.1.2.3", 443, None, False),
        ("dst=10.1.2.3 direct", "10.1.2.3", 1, None, True),  # a bare address is a /32
        ("dst=10.1.2.3 direct", "10.1.2.4", 1, None, False),
        ("dst=2001:db8::/32 direct", "2001:db8:1::5", 22, None, True),
        ("dst=2001:db8::/32 direct", "10.0.0.1", 22, None, False),  # other family: no match
        ("dst=10.0.0.0/8,192.168.0.0/16 direct", "192.168.7.7", 80, None, True),
        ("port=22 direct", "198.18.0.2", 22, None, True),
        ("port=22 direct", "198.18.0.2", 23, None, False),
        ("port=8000-8099 direct", "198.18.0.2", 8099, None, True),
        ("port=8000-8099 direct", "198.18.0.2", 8100, None, False),
        ("port=22,8000-8099 direct", "198.18.0.2", 8000, None, True),
        ("name=intranet.example direct", "198.18.0.2", 443, "intranet.example", True),
        ("name=intranet.example direct", "198.18.0.2", 443, "a.intranet.example", False),
        ("name=.corp.example direct", "198.18.0.2", 443, "corp.example", True),
        ("name=.corp.example direct", "198.18.0.2", 443, "a.b.corp.example", True),
        ("name=.corp.example direct", "198.18.0.2", 443, "notcorp.example", False),
        ("name=.corp.example direct", "198.18.0.2", 443, None, False),  # nothing sniffed
        ("name=Intranet.Example. direct", "198.18.0.2", 443, "intranet.example", True),
        ("dst=10.0.0.0/8 port=443 direct", "10.0.0.1", 443, None, True),
        ("dst=10.0.0.0/8 port=443 direct", "10.0.0.1", 80, None, False),  # all must hold
        ("dst=10.0.0.0/8 port=443 name=a.example direct", "10.0.0.1", 443, "b.example", False),
        ("direct", "203.0.113.9", 1, None, True),  # no condition: matches everything
    ],
)
def test_each_condition_kind_matches_what_it_says(
    text: str, ip: str, port: int, name: str | None, matches: bool
) -> None:
    found = ruleset(text).decide(ip, port, name)
    assert (found is not None) == matches


def test_the_first_matching_rule_wins_and_later_ones_are_not_asked() -> None:
    rules = ruleset(
        "dst=10.0.0.0/8 port=25 reject",
        "dst=10.0.0.0/8 direct",
        "port=25 proxy:mail",
        "proxy:other",
    )
    assert rules.decide("10.0.0.1", 25, None) == (1, rules.rules[0])
    assert rules.decide("10.0.0.1", 443, None) == (2, rules.rules[1])
    assert rules.decide("198.18.0.2", 25, None) == (3, rules.rules[2])
    assert rules.decide("198.18.0.2", 80, None) == (4, rules.rules[3])


def test_no_match_means_none_the_default_proxy() -> None:
    rules = ruleset("dst=10.0.0.0/8 direct")
    assert rules.decide("198.18.0.2", 443, "origin.test") is None
    assert rules.before_sniffing("198.18.0.2", 443) is None
    assert not RuleSet()


def test_before_sniffing_decides_unless_a_name_rule_could_match_first() -> None:
    rules = ruleset("port=25 reject", "name=.corp.example direct", "dst=10.0.0.0/8 direct")
    assert rules.before_sniffing("198.18.0.2", 25) == (1, rules.rules[0])  # no need to sniff
    assert rules.before_sniffing("10.0.0.1", 443) is UNDECIDED  # rule 2 may come first
    assert rules.decide("10.0.0.1", 443, "www.corp.example") == (2, rules.rules[1])
    assert rules.decide("10.0.0.1", 443, None) == (3, rules.rules[2])
    only_address = ruleset("dst=10.0.0.0/8 direct")
    assert only_address.before_sniffing("10.0.0.1", 443) == (1, only_address.rules[0])
    assert not only_address.uses_names and rules.uses_names


@pytest.mark.parametrize(
    "text",
    [
        "dst=10.0.0.0/8,fd00::/8 port=22,8000-8099 name=a.example,.corp.example direct",
        "port=25 reject",
        "proxy",
        "name=.partner.example proxy:partners",
    ],
)
def test_a_rule_prints_back_as_its_flag_spelling(text: str) -> None:
    rule = parse_rule(text)
    assert str(rule) == text
    assert parse_rule(str(rule)) == rule


def test_toml_tables_and_strings_mean_the_same(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'sniff-timeout = "1s"\n'
        "[[upstream-proxy]]\n"
        'address = "cntlm.local:3128"\n'
        "[[upstream-proxy]]\n"
        'address = "squid.local"\n'
        'group = "partners"\n'
        "[[rule]]\n"
        'dst = ["10.0.0.0/8", "fd00::/8"]\n'
        'port = [22, "8000-8099"]\n'
        'name = ".corp.example"\n'
        'action = "direct"\n'
        "[[rule]]\n"
        'name = ".partner.example"\n'
        'action = "proxy"\n'
        'group = "partners"\n'
        "[[rule]]\n"
        "port = 25\n"
        'action = "reject"\n'
    )
    cfg = cli.parse_args(["-config", str(path)])
    assert cfg.rules == parse_rules(
        [
            "dst=10.0.0.0/8,fd00::/8 port=22,8000-8099 name=.corp.example direct",
            "name=.partner.example proxy:partners",
            "port=25 reject",
        ]
    )


def test_rule_flags_repeat_and_keep_their_order() -> None:
    cfg = cli.parse_args([*UPSTREAMS, "-rule", "port=25 reject", "-rule=dst=10.0.0.0/8 direct"])
    assert [str(r) for r in cfg.rules] == ["port=25 reject", "dst=10.0.0.0/8 direct"]
    assert config.display("rule", cfg.rule) == "port=25 reject; dst=10.0.0.0/8 direct"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("dst=10.0.0.0/8", "exactly one action"),
        ("dst=10.0.0.0/8 direct reject", "exactly one action"),
        ("dst=10.0.0.0/8 forward", "not one of proxy, direct, reject"),
        ("direct:grp", "only proxy takes a group"),
        ("proxy:a.b", "not a name"),
        ("dst=10.0.0.1/8 direct", "has host bits set"),
        ("dst=not-an-ip direct", "dst"),
        ("port=0 direct", "not within 1-65535"),
        ("port=70000 direct", "not within 1-65535"),
        ("port=9-8 direct", "low to high"),
        ("port=http direct", "not a port or a range"),
        ("port=\u0663 direct", "not a port or a range"),  # Arabic-Indic digit three
        ("name=10.0.0.1 direct", "IP addresses go in dst="),
        ("name=0x7f.1 direct", "IP addresses go in dst="),
        ("name=bad_name! direct", "not a host name"),
        ("name= direct", "name= has no value"),
        ("host=a.example direct", "unknown condition 'host'"),
        ("port=1 port=2 direct", "given twice"),
    ],
)
def test_bad_rules_name_the_flag_the_rule_and_why(text: str, reason: str) -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args([*UPSTREAMS, "-rule", text])
    assert info.value.flag == "-rule"
    assert "rule 1: " in info.value.reason
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ('dst = "10.0.0.0/8"', "action is missing"),
        ('action = "reject"\ngroup = "x"', "group is only for action proxy"),
        ('action = "direct"\nvia = "x"', "unknown key 'via'"),
        ("action = 1", "action must be a string"),
        ('action = "direct"\nport = true', "not a port"),
        ('action = "direct"\ndst = []', "dst has no value"),
        ('action = "direct"\nname = 5', "not a host name"),
    ],
)
def test_bad_rule_tables_name_the_rule(tmp_path: Path, table: str, reason: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'upstream-proxy = "cntlm.local"\n[[rule]]\naction = "proxy"\n[[rule]]\n{table}\n'
    )
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-config", str(path)])
    assert info.value.flag == f"{path}: rule"
    assert "rule 2: " in info.value.reason
    assert reason in info.value.reason


def test_a_group_no_upstream_is_in_is_refused() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args([*UPSTREAMS, "-rule", "port=443 proxy:partners"])
    assert info.value.flag == "-rule"
    assert "no upstream is in group 'partners'" in info.value.reason


def test_a_name_rule_needs_sniffing() -> None:
    with pytest.raises(cli.UsageError) as info:
        cli.parse_args(["-rule", "name=.corp.example direct"])
    assert info.value.flag == "-rule"
    assert "needs sniffing" in info.value.reason


def test_rules_are_frozen_values() -> None:
    rule = parse_rule("dst=10.0.0.0/8 direct")
    assert rule == Rule(networks=(ipaddress.ip_network("10.0.0.0/8"),), action="direct")
    assert hash(rule) == hash(parse_rule("dst=10.0.0.0/8 direct"))
