"""Logging setup: the only place handlers are configured.

Two loggers: ``handyproxy`` for the process's story (start, stop, trouble) and
``handyproxy.access`` for one record per connection. Fields travel in ``extra={"fields": {...}}``
so the text and JSON formats carry the same facts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger("handyproxy")
access = logging.getLogger("handyproxy.access")


def _render_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or not text.isprintable() or any(c in text for c in ' "='):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message key=value ...``; journald adds the timestamp under systemd."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + _render_fields(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            line = f"{stamp}.{int(record.msecs):03d}Z {line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(fmt: str = "text", level: str = "info", stream: Any = None) -> None:
    """Send both loggers to stderr in the chosen format.

    Timestamps are left out of text lines when stderr is the journal (JOURNAL_STREAM is set),
    because journald stamps every line itself.
    """
    import os

    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    # Records need none of these, and each costs a syscall or a lookup per tunnel.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    root = logging.getLogger("handyproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
