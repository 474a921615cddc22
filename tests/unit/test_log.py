"""The two log formats carry the same facts, one record per line.

Operators grep the text lines and ship the JSON ones; the integration tests read fields such as
``end=`` and ``status=`` from them, so the shapes here are part of the contract in
docs/interfaces.md.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from handyproxy import log

FIELDS = {
    "client": "198.51.100.2:40000",
    "dst": "198.18.0.2:443",
    "target": "origin.test:443",
    "status": 200,
    "up": 517,
    "down": 4096,
    "duration": "0.012s",
    "end": "eof",
}
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger("handyproxy")
    saved = (root.handlers[:], root.level, root.propagate)
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    yield
    root.handlers[:], root.level, root.propagate = saved


def capture(fmt: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    log.setup(fmt, level, stream=stream)
    return stream


def test_text_access_record_is_one_line_with_every_field() -> None:
    out = capture("text")
    log.access.info("tunnel end", extra={"fields": FIELDS})
    assert out.getvalue() == (
        "INFO handyproxy.access: tunnel end client=198.51.100.2:40000 dst=198.18.0.2:443 "
        "target=origin.test:443 status=200 up=517 down=4096 duration=0.012s end=eof\n"
    )


def test_text_lines_carry_a_utc_timestamp_outside_the_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM")
    out = capture("text")
    log.logger.info("listening on [::]:8443", extra={"fields": {"upstream": "localhost:3128"}})
    line = out.getvalue()
    assert STAMP.match(line)
    assert STAMP.sub("", line) == (
        "INFO handyproxy: listening on [::]:8443 upstream=localhost:3128\n"
    )


def test_text_quotes_values_that_would_break_key_value_parsing() -> None:
    out = capture("text")
    fields = {"reason": "upstream refused the tunnel", "q": 'say "hi"', "eq": "a=b", "empty": ""}
    log.access.info("tunnel end", extra={"fields": fields})
    line = out.getvalue().rstrip("\n")
    tail = line.split("tunnel end ", 1)[1]
    assert tail == ('reason="upstream refused the tunnel" q="say \\"hi\\"" eq="a=b" empty=""')
    parsed = dict(
        (m.group(1), json.loads(m.group(2)) if m.group(2).startswith('"') else m.group(2))
        for m in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', tail)
    )
    assert parsed == fields


def test_text_record_stays_on_one_line_when_a_value_holds_a_newline() -> None:
    out = capture("text")
    for reason in ("OSError: bad\nINFO forged", "bad\nforged", "bad\rforged", "tab\tx"):
        log.access.info("tunnel end", extra={"fields": {"end": "error", "reason": reason}})
    lines = out.getvalue().split("\n")
    assert len(lines) == 5
    assert all("\r" not in line and "\t" not in line for line in lines)


def test_json_record_parses_and_has_the_same_fields() -> None:
    out = capture("json")
    log.access.info("tunnel end", extra={"fields": FIELDS})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "info"
    assert doc["logger"] == "handyproxy.access"
    assert doc["message"] == "tunnel end"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    assert {k: doc[k] for k in FIELDS} == FIELDS  # numbers stay numbers
    assert set(doc) == {"time", "level", "logger", "message", *FIELDS}


def test_json_keeps_a_multi_line_exception_in_one_record() -> None:
    out = capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.logger.exception("tunnel setup failed", extra={"fields": {"client": "c"}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "error"
    assert doc["client"] == "c"
    assert "ValueError: boom" in doc["exception"]


def test_text_appends_the_traceback_after_the_record() -> None:
    out = capture("text")
    try:
        raise ValueError("boom")
    except ValueError:
        log.logger.exception("tunnel setup failed")
    text = out.getvalue()
    assert text.startswith("ERROR handyproxy: tunnel setup failed\nTraceback")
    assert "ValueError: boom" in text


def test_json_renders_values_it_cannot_encode_as_strings() -> None:
    out = capture("json")
    log.logger.info("odd", extra={"fields": {"addr": ("198.51.100.2", 1), "obj": object()}})
    doc = json.loads(out.getvalue())
    assert doc["addr"] == ["198.51.100.2", 1]
    assert doc["obj"].startswith("<object object")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_level_filters_records(fmt: str) -> None:
    out = capture(fmt, "warning")
    log.access.info("tunnel end", extra={"fields": FIELDS})
    log.logger.debug("noise")
    log.logger.warning("accept failed", extra={"fields": {"errno": "EMFILE"}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "accept failed" in lines[0]
    assert "EMFILE" in lines[0]


def test_debug_level_lets_debug_through() -> None:
    out = capture("text", "debug")
    log.logger.debug("sniffed", extra={"fields": {"name": "origin.test"}})
    assert out.getvalue() == "DEBUG handyproxy: sniffed name=origin.test\n"


def test_setup_twice_replaces_the_handler_instead_of_doubling_lines() -> None:
    capture("text")
    out = capture("json")
    log.logger.info("once")
    assert len(out.getvalue().splitlines()) == 1
    assert logging.getLogger("handyproxy").propagate is False


class CountingStream(io.StringIO):
    """A stream that counts its writes: one per flush of the batching handler."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_records_of_one_loop_turn_share_one_write_and_keep_their_order() -> None:
    stream = CountingStream()
    log.setup("text", "info", stream=stream)

    async def main() -> tuple[int, int]:
        log.attach(asyncio.get_running_loop())
        try:
            for i in range(5):
                log.access.info("tunnel end", extra={"fields": {"n": i}})
            before = stream.writes  # nothing written yet: the turn has not ended
            await asyncio.sleep(0)
            return before, stream.writes
        finally:
            log.detach()

    before, after = asyncio.run(main())
    assert (before, after) == (0, 1)
    assert [line.rsplit("=", 1)[1] for line in stream.getvalue().splitlines()] == list("01234")


def test_a_warning_is_written_at_once_after_what_is_pending() -> None:
    stream = CountingStream()
    log.setup("text", "info", stream=stream)

    async def main() -> str:
        log.attach(asyncio.get_running_loop())
        try:
            log.access.info("tunnel end", extra={"fields": {"n": 1}})
            log.logger.warning("trouble")
            return stream.getvalue()
        finally:
            log.detach()

    text = asyncio.run(main())
    assert text.splitlines() == [
        "INFO handyproxy.access: tunnel end n=1",
        "WARNING handyproxy: trouble",
    ]


def test_detach_writes_what_is_pending() -> None:
    stream = CountingStream()
    log.setup("text", "info", stream=stream)

    async def main() -> None:
        log.attach(asyncio.get_running_loop())
        log.access.info("tunnel end", extra={"fields": {"n": 1}})
        log.detach()

    asyncio.run(main())
    assert stream.getvalue() == "INFO handyproxy.access: tunnel end n=1\n"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("198.51.100.2:40000", "198.51.100.2:40000"),
        ("[2001:db8::2]:443", "[2001:db8::2]:443"),
        ("", '""'),
        ("a b", '"a b"'),
        ('say "x"', '"say \\"x\\""'),
        ("k=v", '"k=v"'),
        ("tab\there", '"tab\\there"'),
        ("ünïcode", "ünïcode"),  # printable, no space, quote or "=": shown as it is
        ("caf\u00e9 au lait", '"caf\\u00e9 au lait"'),
    ],
)
def test_a_field_is_quoted_exactly_when_it_must_be(value: str, shown: str) -> None:
    out = capture("text")
    log.access.info("tunnel end", extra={"fields": {"reason": value}})
    assert out.getvalue() == f"INFO handyproxy.access: tunnel end reason={shown}\n"
