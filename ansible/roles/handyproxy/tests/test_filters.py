"""Tests of the role's filter plugin: the preflight's verdicts and the capture-rule expansion.

The plugin decides what reaches the host (rules, TOML values) and what never does (a bad
inventory), so each check here is one an operator's typo would hit. No Ansible run is needed:
the plugins are plain Python, imported from the collection's plugins/filter directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import collection_plugins
import pytest

# The collection handyproxy.fleet's filters (ansible/plugins/filter), which the role calls by FQCN.
f = collection_plugins.load("filter", "handyproxy")
cntlm = collection_plugins.load("filter", "handyproxy_cntlm")


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


def test_upstream_without_port_takes_the_forwarders_default_port():
    assert errors_for(instance(upstream_proxy="proxy.example")) == []
    (spec,) = f.upstream_specs("proxy.example")
    assert spec.port == 3128


def test_a_host_name_the_forwarder_accepts_passes_the_preflight():
    """The role used to reject underscores that the forwarder takes."""
    assert errors_for(instance(upstream_proxy="proxy_1.corp:3128")) == []


def test_bad_upstream_names_host_instance_and_field():
    (error,) = errors_for(instance(upstream_proxy="proxy.example:http"))
    assert error.startswith("host router1: instance 'alice': upstream_proxy: ")
    assert "port" in error


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
    assert f.toml_value("127.0.0.1:9464") == '"127.0.0.1:9464"'


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


def test_toml_values_keep_the_inventorys_types():
    assert f.toml_value("3m") == '"3m"'
    assert f.toml_value(-1) == "-1"
    assert f.toml_value(8443) == "8443"
    assert f.toml_value(True) == "true"
    assert f.toml_value([80, 443]) == "[80, 443]"
    assert f.toml_value('a"b\\c') == '"a\\"b\\\\c"'
    assert f.toml_value({"address": "b:2", "group": "g"}) == '{ "address" = "b:2", "group" = "g" }'


def test_every_forwarder_option_is_an_instance_key():
    """The option list is the forwarder's: a field added to Config is settable at once."""
    from handyproxy import config

    names = {field.name for field in dataclasses.fields(config.Config)}
    assert set(f.forwarder_options()) == names - set(f.ROLE_MANAGED_OPTIONS)
    assert set(f.instance_keys()) == (names - set(f.ROLE_MANAGED_OPTIONS)) | set(f.ROLE_KEYS)


def test_relay_several_upstreams_policy_and_rules_pass_and_render_as_toml():
    item = instance(
        relay="copy",
        upstream_proxy=["cntlm-a:3128", {"address": "partner:8080", "group": "partners"}],
        upstream_policy="round-robin",
        sniff_timeout="1s",
        rule=[
            "dst=10.0.0.0/8 direct",
            {"name": ".partner.example", "action": "proxy", "group": "partners"},
        ],
    )
    assert errors_for(item) == []
    rendered = "\n".join(
        f"{key} = {f.toml_value(value)}"
        for key, value in f.toml_settings(item, "upstream-credentials").items()
    )
    parsed = tomllib.loads(rendered)
    from handyproxy import config

    values = {k: config.convert(k, v) for k, v in parsed.items()}
    cfg = config.build(values)
    assert cfg.relay == "copy"
    assert [u.name for u in cfg.upstreams] == ["cntlm-a:3128", "partner:8080"]
    assert [str(r) for r in cfg.rules] == [
        "dst=10.0.0.0/8 direct",
        "name=.partner.example proxy:partners",
    ]


def test_forwarder_verdicts_name_the_inventory_key():
    (error,) = errors_for(instance(relay="zerocopy"))
    assert error.startswith("host router1: instance 'alice': relay: must be one of")
    (error,) = errors_for(instance(rule=["port=25 teleport"]))
    assert error.startswith("host router1: instance 'alice': rule: ")
    (error,) = errors_for(instance(dial_timeout="3 minutes"))
    assert error.startswith("host router1: instance 'alice': dial_timeout: ")


def test_defaults_are_judged_with_each_instance():
    errors = errors_for(instance(), defaults={"upstream_policy": "random"})
    assert errors == [
        "host router1: instance 'alice': upstream_policy: must be one of failover, round-robin,"
        " least-connections"
    ]


def test_credentials_file_is_the_roles_and_the_secret_never_shows():
    (error,) = errors_for(instance(upstream_credentials_file="/root/secret"))
    assert "upstream_credentials_file: unknown field (set upstream_credentials instead)" in error
    (error,) = errors_for(instance(upstream_credentials="no-colon-s3cret"))
    assert "upstream_credentials:" in error and "s3cret" not in error
    item = instance(upstream_credentials="alice:s3cret")
    assert errors_for(item) == []
    settings = f.toml_settings(item, "upstream-credentials")
    assert settings["upstream-credentials-file"] == "upstream-credentials"
    assert "s3cret" not in repr(settings)


UVLOOP = "uvloop-0.23.0-cp{v}-cp{v}-manylinux_2_17_{a}.manylinux2014_{a}.whl"


def manifest(*files: str) -> str:
    return "".join(f"{index:064x}  {name}\n" for index, name in enumerate(files, 1))


def test_wheels_are_chosen_for_the_hosts_python_and_architecture():
    text = manifest(
        "handyproxy-0.1.0-py3-none-any.whl",
        UVLOOP.format(v=311, a="x86_64"),
        UVLOOP.format(v=313, a="x86_64"),
        UVLOOP.format(v=313, a="aarch64"),
        "prometheus_client-0.21.1-py3-none-any.whl",
    )
    choice = f.select_wheels(text, "3.13", "aarch64")
    assert choice["missing"] == []
    assert [w["file"] for w in choice["wheels"]] == [
        "handyproxy-0.1.0-py3-none-any.whl",
        UVLOOP.format(v=313, a="aarch64"),
        "prometheus_client-0.21.1-py3-none-any.whl",
    ]
    assert choice["wheels"][1]["sha256"] == f"{4:064x}"
    assert choice["wheels"][1]["version"] == "0.23.0"


def test_a_host_no_wheel_fits_gets_the_missing_distribution_named():
    text = manifest("handyproxy-0.1.0-py3-none-any.whl", UVLOOP.format(v=311, a="x86_64"))
    assert f.select_wheels(text, "3.13", "x86_64")["missing"] == ["uvloop"]
    assert f.select_wheels(text, "3.11", "aarch64")["missing"] == ["uvloop"]
    assert f.select_wheels(text, "3.11", "x86_64")["missing"] == []


def test_abi3_wheels_fit_later_pythons_only():
    text = manifest("x-1-cp312-abi3-manylinux_2_17_x86_64.whl")
    assert f.select_wheels(text, "3.13", "x86_64")["missing"] == []
    assert f.select_wheels(text, "3.11", "x86_64")["missing"] == ["x"]


def test_checksum_mismatches_name_missing_and_different_wheels():
    wheels = [{"file": name, "sha256": "1" * 64} for name in ("a.whl", "b.whl", "c.whl")]
    assert f.checksum_mismatches(wheels, ["1" * 64, "2" * 64, ""]) == ["b.whl", "c.whl"]
    assert f.checksum_mismatches(wheels, ["1" * 64]) == ["b.whl", "c.whl"]


HOST_LISTING = """\
file a.whl 644 root:root
file b.whl 644 root:root
file c.whl 600 root:root
file old.whl 644 root:root
{a}  ./a.whl
{other}  ./b.whl
{c}  ./c.whl
{a}  ./old.whl
""".format(a="a" * 64, other="f" * 64, c="c" * 64)


def test_wheels_to_push_are_those_missing_different_or_not_roots_0644():
    wheels = [
        {"file": "a.whl", "sha256": "a" * 64},  # in place
        {"file": "b.whl", "sha256": "b" * 64},  # another hash on the host
        {"file": "c.whl", "sha256": "c" * 64},  # mode 0600
        {"file": "d.whl", "sha256": "d" * 64},  # missing
    ]
    assert [w["file"] for w in f.wheels_to_push(wheels, HOST_LISTING)] == [
        "b.whl",
        "c.whl",
        "d.whl",
    ]
    assert f.wheels_to_push(wheels, "") == wheels  # no wheelhouse on the host yet


def test_stale_wheels_are_the_hosts_wheels_not_chosen():
    wheels = [{"file": "a.whl", "sha256": "a" * 64}]
    assert f.stale_wheels(wheels, HOST_LISTING) == ["b.whl", "c.whl", "old.whl"]
    assert f.stale_wheels(wheels, "") == []


def test_the_example_inventory_passes_the_preflight():
    """The README points operators at ansible/inventory/example: it must be sound as written."""
    import yaml

    example = Path(__file__).resolve().parents[3] / "inventory" / "example"
    group = yaml.safe_load((example / "group_vars" / "handyproxy.yml").read_text())
    for host_file in sorted((example / "host_vars").glob("*.yml")):
        host = yaml.safe_load(host_file.read_text())
        instances = host["handyproxy_instances"]
        # As the role does: cntlm blocks are checked, then replaced by their cNTLM upstream.
        assert cntlm.cntlm_errors(instances, host_file.stem) == []
        errors = f.preflight_errors(
            cntlm.cntlm_upstreams(instances),
            group["handyproxy_instance_defaults"],
            host_file.stem,
        )
        assert errors == [], errors
