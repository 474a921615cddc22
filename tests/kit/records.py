"""Reading the ``key=value`` lines the forwarder (its access records) and the lab's CONNECT
proxy write, so a test asserts on fields rather than on substrings."""

from __future__ import annotations

import json
import re

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of a text log line; quoted values are unquoted."""
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in _FIELD.findall(line)
    }
