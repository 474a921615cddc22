"""Tests of the role's filter plugin: the preflight's verdicts and the capture-rule expansion.

The plugin decides what reaches the host (rules, TOML values) and what never does (a bad
inventory), so each check here is one an operator's typo would hit. No Ansible run is needed:
the plugin is plain Python, imported from the role's filter_plugins directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

PLUGIN = Path(__file__).resolve().parent.parent / "filter_plugins" / "handyproxy.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("handyproxy_role_filters", PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


f = _load()


def instance(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "alice",
        "local_port": 8443,
        "upstream_proxy": "127.0.0.1:3128",
        "capture": [{"chain": "prerouting", "interfaces": ["eth1"]}],
    }
    base.update(overrides)
    return base


def errors_for(*instances: dict[str, object], defaults: object = None) -> list[str]:
    return f.preflight_errors(list(instances), defaults or {}, "router1")


def test_sound_inventory_has_no_errors():
    assert errors_for(instance(), instance(name="bob", local_port=8444)) == []


def test_upstream_without_port_names_host_instance_and_field():
    (error,) = errors_for(instance(upstream_proxy="proxy.example"))
    assert error.startswith("host router1: instance 'alice': upstream_proxy: ")
    assert "no port" in error


def test_bare_ipv6_upstream_is_rejected_but_bracketed_one_passes():
    assert errors_for(instance(upstream_proxy="2001:db8::1:3128"))
    assert errors_for(instance(upstream_proxy="[2001:db8::1]:3128")) == []


def test_duplicate_ports_and_names_are_both_reported():
    errors = errors_for(instance(), instance())
    assert any("name: duplicate" in e for e in errors)
    assert any("local_port: 8443 is already used" in e for e in errors)


@pytest.mark.parametrize("value", ["127.0.0.1", "127.0.0.1:0", "::1:9464", "127.0.0.1:x", 9464])
def test_a_bad_metrics_address_names_the_field(value):
    (error,) = errors_for(instance(metrics_address=value))
    assert error.startswith("host router1: instance 'alice': metrics_address: ")


def test_metrics_addresses_pass_and_render_as_toml():
    for value in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464", ""):
        assert errors_for(instance(metrics_address=value)) == []
    assert f.toml_value("127.0.0.1:9464", "metrics_address") == '"127.0.0.1:9464"'


def test_a_metrics_port_may_not_be_taken_twice_on_a_host():
    (clash,) = errors_for(
        instance(metrics_address="127.0.0.1:9464"),
        instance(name="bob", local_port=8444, metrics_address="127.0.0.1:9464"),
    )
    assert clash.startswith("host router1: instance 'bob': metrics_address: port 9464 is already")
    (local,) = errors_for(instance(metrics_address="127.0.0.1:8443"))
    assert "is already the local_port of" in local
    # The same address for every instance through the defaults is a clash too.
    both = [instance(), instance(name="bob", local_port=8444)]
    assert len(errors_for(*both, defaults={"metrics_address": "127.0.0.1:9464"})) == 1


def test_unknown_chain_and_family_are_rejected():
    errors = errors_for(instance(capture=[{"chain": "forward", "family": "ipx"}]))
    assert any("capture[0].chain: 'forward'" in e for e in errors)
    assert any("capture[0].family: 'ipx'" in e for e in errors)


def test_output_rule_with_interfaces_is_rejected():
    (error,) = errors_for(instance(capture=[{"chain": "output", "interfaces": ["eth0"]}]))
    assert "capture[0].interfaces" in error


def test_cidr_with_host_bits_suggests_the_network():
    (error,) = errors_for(instance(capture=[{"chain": "output", "sources": ["10.1.2.3/24"]}]))
    assert "did you mean 10.1.2.0/24?" in error


def test_cidr_of_the_wrong_family_is_rejected():
    rule = {"chain": "output", "family": "ipv4", "exclude": ["2001:db8::/32"]}
    (error,) = errors_for(instance(capture=[rule]))
    assert "capture[0].exclude: 2001:db8::/32 is IPv6" in error


@pytest.mark.parametrize("port", [80, 0, 70000, "8443", True])
def test_local_port_outside_unprivileged_range_is_rejected(port):
    (error,) = errors_for(instance(local_port=port))
    assert "local_port" in error


@pytest.mark.parametrize(
    ("key", "value"),
    [("dial_timeout", "30"), ("dial_timeout", "3 minutes"), ("workers", 0), ("log_format", "xml")],
)
def test_bad_option_values_are_rejected(key, value):
    (error,) = errors_for(instance(**{key: value}))
    assert f"instance 'alice': {key}: " in error


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dial_timeout", "1m30s"),
        ("idle_timeout", "0"),
        ("sniff_timeout", -1),
        ("sniff_ports", [443]),
    ],
)
def test_good_option_values_pass(key, value):
    assert errors_for(instance(**{key: value})) == []


def test_unknown_keys_in_instance_and_defaults_are_rejected():
    errors = errors_for(instance(colour="red"), defaults={"name": "x"})
    assert any("handyproxy_instance_defaults.name: not a forwarder option" in e for e in errors)
    assert any("instance 'alice': colour: unknown field" in e for e in errors)


def test_defaults_apply_unless_the_instance_overrides_them():
    merged = f.merge_instances(
        [instance(), instance(name="bob", log_format="text")], {"log_format": "json"}
    )
    assert [m["log_format"] for m in merged] == ["json", "text"]
    assert merged[0]["capture"][0]["ports"] == [80, 443]
    assert merged[0]["capture"][0]["family"] == "both"


def test_both_family_rule_splits_sources_and_exclusions_by_family():
    rule = {
        "chain": "prerouting",
        "sources": ["198.51.100.0/24", "2001:db8:a::/64"],
        "exclude": ["203.0.113.0/24"],
    }
    rules = f.capture_rules(f.merge_instances([instance(capture=[rule])], {}))
    assert [(r["family"], r["sources"], r["exclude"]) for r in rules] == [
        ("ipv4", ["198.51.100.0/24"], ["203.0.113.0/24"]),
        ("ipv6", ["2001:db8:a::/64"], []),
    ]


def test_both_family_rule_with_only_ipv4_sources_yields_no_ipv6_rule():
    rule = {"chain": "prerouting", "sources": ["198.51.100.0/24"]}
    rules = f.capture_rules(f.merge_instances([instance(capture=[rule])], {}))
    assert [r["family"] for r in rules] == ["ipv4"]


def test_upstream_ips_skip_names_and_keep_literals_by_family():
    merged = f.merge_instances(
        [
            instance(upstream_proxy="proxy.example:3128"),
            instance(name="b", local_port=2000, upstream_proxy="[2001:db8::3]:3128"),
            instance(name="c", local_port=2001, upstream_proxy="198.51.100.7:8080"),
        ],
        {},
    )
    assert f.upstream_ips(merged, "ipv4") == ["198.51.100.7"]
    assert f.upstream_ips(merged, "ipv6") == ["2001:db8::3"]


def test_timeout_stop_outlasts_the_longest_drain():
    assert f.timeout_stop_sec([{"drain_timeout": "30s"}]) == 90
    assert f.timeout_stop_sec([{"drain_timeout": "5m"}]) == 330


def test_toml_values_quote_durations_and_strings_but_not_ints():
    assert f.toml_value("3m", "dial_timeout") == '"3m"'
    assert f.toml_value(-1, "sniff_timeout") == '"-1"'
    assert f.toml_value(8443, "local_port") == "8443"
    assert f.toml_value([80, 443], "sniff_ports") == "[80, 443]"
    assert f.toml_value('a"b\\c', "upstream_proxy") == '"a\\"b\\\\c"'
