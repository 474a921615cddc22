"""Lookup handyproxy.fleet.file_sha256: SHA-256 digests of files on the controller.

The role's preflight checks every wheel it is about to push against the wheelhouse's SHA256SUMS.
A `stat` delegated to localhost per wheel and host is a module run each (a third of a second of
CPU apiece, on every rollout of every host); reading the files here costs milliseconds.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ansible.plugins.lookup import LookupBase

DOCUMENTATION = r"""
name: file_sha256
author: HandyProxy developers
version_added: "1.0.0"
short_description: SHA-256 digests of files on the controller
description:
  - Returns the lowercase hexadecimal SHA-256 digest of each file named, in order.
  - A file that does not exist or cannot be read gives an empty string, so that a caller can
    report it as missing rather than fail on the first one.
options:
  _terms:
    description: Paths of files on the controller (lists are flattened).
    required: true
    type: list
    elements: path
"""

EXAMPLES = r"""
- name: Compare a wheel with its published digest
  ansible.builtin.assert:
    that: lookup('handyproxy.fleet.file_sha256', 'wheelhouse/' ~ wheel) == digest
"""

RETURN = r"""
_raw:
  description: One digest per file (an empty string for a missing or unreadable file).
  type: list
  elements: str
"""

CHUNK = 1 << 20


def file_sha256(path: str) -> str:
    """The file's digest, or "" when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _paths(terms: Any) -> list[str]:
    out: list[str] = []
    for term in terms if isinstance(terms, (list, tuple)) else [terms]:
        if isinstance(term, (list, tuple)):
            out.extend(_paths(term))
        else:
            out.append(str(term))
    return out


class LookupModule(LookupBase):
    def run(self, terms: Any, variables: Any = None, **kwargs: Any) -> list[str]:
        self.set_options(var_options=variables, direct=kwargs)
        return [file_sha256(path) for path in _paths(terms)]
