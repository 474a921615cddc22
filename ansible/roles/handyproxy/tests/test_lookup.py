"""The collection's lookup handyproxy.fleet.file_sha256, which the preflight hashes wheels with."""

from __future__ import annotations

import hashlib

import collection_plugins

lookup = collection_plugins.load("lookup", "file_sha256")


def test_digests_come_in_order_with_an_empty_string_for_a_missing_file(tmp_path):
    big = tmp_path / "big.whl"
    big.write_bytes(bytes(range(256)) * 20_000)  # several read chunks
    empty = tmp_path / "empty.whl"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.whl"
    run = lookup.LookupModule().run
    # A list argument is flattened, as query('...', list) passes it.
    assert run([[str(big), str(missing)], str(empty)]) == [
        hashlib.sha256(big.read_bytes()).hexdigest(),
        "",
        hashlib.sha256(b"").hexdigest(),
    ]


def test_a_directory_is_not_a_readable_file(tmp_path):
    assert lookup.file_sha256(str(tmp_path)) == ""
