"""Tests of the role's cNTLM filters: the checks of a `cntlm` block, the owners and the upstreams.

Each check is one an operator's inventory could trip: a typo in a block must stop the run
before cntlm is installed, and no message may show the password.
"""

from __future__ import annotations

import collection_plugins
import pytest

# One of the collection handyproxy.fleet's filters (ansible/plugins/filter).
f = collection_plugins.load("filter", "handyproxy_cntlm")
SECRET = "s3cr3t-never-shown"


def tenant(name: str = "alice", **block: object) -> dict[str, object]:
    cntlm: dict[str, object] = {
        "port": 3201,
        "user": name,
        "domain": "CORP",
        "password": SECRET,
        "parents": ["proxy.corp.example:3128"],
    }
    cntlm.update(block)
    return {"name": name, "local_port": 8443, "cntlm": cntlm}


def test_sound_block_has_no_errors():
    assert f.cntlm_errors([tenant(auth="NT", no_proxy=["*.local", "10.*"])], "r1") == []


def test_instances_without_cntlm_are_not_checked_here():
    plain = {"name": "plain", "local_port": 8443, "upstream_proxy": "127.0.0.1:3128"}
    assert f.cntlm_errors([plain], "r1") == []


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"port": 80}, "cntlm.port"),
        ({"port": "3201"}, "cntlm.port"),
        ({"user": ""}, "cntlm.user"),
        ({"user": "al ice"}, "cntlm.user"),
        ({"domain": "CO RP"}, "cntlm.domain"),
        ({"password": ""}, "cntlm.password"),
        ({"auth": "Kerberos"}, "cntlm.auth"),
        ({"parents": []}, "cntlm.parents"),
        ({"parents": ["proxy.corp.example"]}, "cntlm.parents[0]"),
        ({"parents": ["proxy.corp.example:99999"]}, "cntlm.parents[0]"),
        ({"parents": ["[2001:db8::3]:3128"]}, "cntlm.parents[0]"),
        ({"no_proxy": "*.local"}, "cntlm.no_proxy"),
        ({"owner": "Alice"}, "cntlm.owner"),
        ({"passwd": "x"}, "cntlm.passwd"),
    ],
)
def test_bad_field_is_named_with_host_and_instance(block, field):
    errors = f.cntlm_errors([tenant(**block)], "r1")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"host r1: instance 'alice': {field}"), errors
    assert SECRET not in errors[0]


def test_ipv6_parent_is_refused_with_the_reason():
    (error,) = f.cntlm_errors([tenant(parents=["[2001:db8::3]:3128"])], "r1")
    assert "first colon" in error


def test_upstream_proxy_beside_cntlm_is_refused():
    instance = tenant()
    instance["upstream_proxy"] = "198.51.100.1:3128"
    (error,) = f.cntlm_errors([instance], "r1")
    assert "upstream_proxy: must not be set with cntlm" in error


def test_missing_block_fields_are_all_reported_without_the_password():
    errors = f.cntlm_errors([{"name": "alice", "local_port": 8443, "cntlm": {}}], "r1")
    fields = [e.split(": ")[2] for e in errors]
    assert fields == ["cntlm.port", "cntlm.user", "cntlm.password", "cntlm.parents"], errors


def test_two_owners_on_one_port_are_refused():
    errors = f.cntlm_errors([tenant("alice"), tenant("bob")], "r1")
    assert errors == ["host r1: instance 'bob': cntlm.port: 3201 is already used by owner 'alice'"]


def test_owner_port_on_an_instance_port_is_refused():
    errors = f.cntlm_errors([tenant(port=8443)], "r1")
    assert errors == [
        "host r1: instance 'alice': cntlm.port: 8443 is the local_port of instance 'alice'"
    ]


def test_instances_sharing_an_owner_share_its_cntlm():
    second = tenant("alice-wifi", owner="alice", user="alice")
    second["local_port"] = 8444
    first = tenant("alice", owner="alice")
    assert f.cntlm_errors([first, second], "r1") == []
    owners = f.cntlm_owners([first, second])
    assert [o["owner"] for o in owners] == ["alice"]
    assert [i["upstream_proxy"] for i in f.cntlm_upstreams([first, second])] == [
        "127.0.0.1:3201"
    ] * 2


def test_instances_sharing_an_owner_with_different_blocks_are_refused():
    second = tenant("alice-wifi", owner="alice", user="alice", password="pw-of-the-wifi")
    second["local_port"] = 8444
    errors = f.cntlm_errors([tenant("alice", owner="alice"), second], "r1")
    assert len(errors) == 1 and "owner 'alice' is also declared by instance 'alice'" in errors[0]
    assert "pw-of-the-wifi" not in errors[0]


def test_upstreams_replace_the_block_and_leave_other_instances_alone():
    plain = {"name": "plain", "local_port": 8445, "upstream_proxy": "198.51.100.1:3128"}
    result = f.cntlm_upstreams([tenant(), plain])
    assert result[0] == {"name": "alice", "local_port": 8443, "upstream_proxy": "127.0.0.1:3201"}
    assert result[1] == plain


def test_owners_fill_defaults_and_the_hashes_their_auth_needs():
    (owner,) = f.cntlm_owners([tenant()])
    assert owner["listen"] == "127.0.0.1:3201"
    assert owner["auth"] == "NTLMv2" and owner["hashes"] == ["PassNTLMv2"]
    assert owner["no_proxy"] == []
    (nt,) = f.cntlm_owners([tenant(auth="NT", domain=None)])
    assert nt["hashes"] == ["PassNT"]


def test_hashes_are_read_from_cntlm_output():
    # What `cntlm -H -u alice -d CORP` prints for the password "secret" (cntlm 0.92.3).
    output = (
        "Password: \n"
        "PassLM          AAD6FDFCE4121610552C4BCA4AEBFB11\n"
        "PassNT          78727FEB9F9325D69885BB105ECAC038\n"
        "PassNTLMv2      23B6C0FE39F719980070EEB2BBFD30FA    "
        "# Only for user 'alice', domain 'CORP'\n"
    )
    assert f.cntlm_hashes(output) == {
        "PassLM": "AAD6FDFCE4121610552C4BCA4AEBFB11",
        "PassNT": "78727FEB9F9325D69885BB105ECAC038",
        "PassNTLMv2": "23B6C0FE39F719980070EEB2BBFD30FA",
    }
    assert f.cntlm_hashes(None) == {}
