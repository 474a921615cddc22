"""Logging setup: the only place handlers are configured.

Two loggers: ``handyproxy`` for the process's story (start, stop, trouble) and
``handyproxy.access`` for one record per connection. Fields travel in ``extra={"fields": {...}}``
so the text and JSON formats carry the same facts.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

logger = logging.getLogger("handyproxy")
access = logging.getLogger("handyproxy.access")


#: A value that needs no quoting, checked in one match (the usual case: addresses, numbers).
_PLAIN = re.compile(r"[!#-<>-~]+")


def _render_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        text = str(value)
        if _PLAIN.fullmatch(text) is None and (
            not text or not text.isprintable() or any(c in text for c in ' "=')
        ):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


_stamp_second = -1
_stamp_text = ""


def _stamp(created: float) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in UTC, formatted once per second rather than per record."""
    global _stamp_second, _stamp_text
    second = int(created)
    if second != _stamp_second:
        _stamp_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = second
    return _stamp_text


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
            line = f"{_stamp(record.created)}.{int(record.msecs):03d}Z {line}"
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


class BatchingHandler(logging.StreamHandler):
    """Writes the records of one event-loop turn with one write(2), formatted only then.

    At thousands of tunnels a second, one access record each, a write per record is a
    syscall per tunnel. Once ``attach(loop)`` has been called, a record is kept and the loop
    is asked to flush at the end of the current turn; warnings and errors, and anything logged
    without an attached loop, are written at once (after what is pending, in order).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.pending: list[logging.LogRecord] = []
        self.loop: Any = None

    def attach(self, loop: Any) -> None:
        self.loop = loop

    def detach(self) -> None:
        self.flush()
        self.loop = None

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(record)
        if self.loop is None or record.levelno >= logging.WARNING:
            self.flush()
        elif len(self.pending) == 1:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        if not self.pending:
            return
        records, self.pending = self.pending, []
        lines = []
        for record in records:
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        self.acquire()
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(records[-1])
        finally:
            self.release()


def attach(loop: Any) -> None:
    """Batch the records of each turn of ``loop`` (the server calls this once it runs)."""
    for handler in logging.getLogger("handyproxy").handlers:
        if isinstance(handler, BatchingHandler):
            handler.attach(loop)


def detach() -> None:
    """Write what is pending and go back to writing each record at once."""
    for handler in logging.getLogger("handyproxy").handlers:
        if isinstance(handler, BatchingHandler):
            handler.detach()


def setup(fmt: str = "text", level: str = "info", stream: Any = None) -> None:
    """Send both loggers to stderr in the chosen format.

    Timestamps are left out of text lines when stderr is the journal (JOURNAL_STREAM is set),
    because journald stamps every line itself.
    """
    import os

    handler = BatchingHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(timestamps="JOURNAL_STREAM" not in os.environ))
    # Records need none of these, and each costs a syscall or a lookup per tunnel.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    # No caller lookup (a walk up the stack per record): no format here names the caller.
    logging._srcfile = None
    root = logging.getLogger("handyproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
