"""What a lab process writes, line by line, so a caller can wait for a line instead of sleeping.

The demo, the tests and the soak start processes in the lab's namespaces and need to know when
one is ready ("listening on ...") or has done something (an access record). A thread reads the
process's output as it comes; ``wait_for`` returns as soon as a matching line is there and fails
at once, naming the pattern and showing the output, when the process ends without writing it.
A log file (squid's access.log) can be watched the same way.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: How often a log file is read again while waiting (a pipe wakes the waiter itself).
FILE_POLL = 0.05


class _Lines:
    """The lines of one stream, shared by every view of it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ended = False
        self.cond = threading.Condition()


class Output:
    """The lines of a process's output (or of a file), from this view's start on."""

    def __init__(
        self,
        stream: Iterable[str] | None = None,
        *,
        path: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        name: str = "process",
    ) -> None:
        self.name = name
        self.path = path
        self._store = _Lines()
        self._offset = 0
        self._on_line = on_line
        self._thread: threading.Thread | None = None
        if stream is not None:
            self._thread = threading.Thread(
                target=self._read, args=(stream,), name=f"output-{name}", daemon=True
            )
            self._thread.start()

    def _read(self, stream: Iterable[str]) -> None:
        store = self._store
        try:
            # ends at EOF: the process, and every child sharing the pipe, is gone
            for raw in stream:
                line = raw.rstrip("\n")
                if self._on_line is not None:
                    self._on_line(line)
                with store.cond:
                    store.lines.append(line)
                    store.cond.notify_all()
        except (OSError, ValueError):  # the pipe was closed under us
            pass
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(OSError):
                    close()
            with store.cond:
                store.ended = True
                store.cond.notify_all()

    # Reading

    def _all(self) -> list[str]:
        if self.path is not None:
            with contextlib.suppress(OSError):
                return self.path.read_text(errors="replace").splitlines()
            return []
        with self._store.cond:
            return list(self._store.lines)

    @property
    def lines(self) -> list[str]:
        """The lines so far (a copy), from this view's start."""
        return self._all()[self._offset :]

    def text(self) -> str:
        return "\n".join(self.lines)

    def mark(self) -> int:
        """A position to pass as ``since``, so that only later lines count."""
        return len(self.lines)

    def view(self) -> Output:
        """The same output, showing only the lines that arrive from now on."""
        view = Output.__new__(Output)
        view.__dict__.update(self.__dict__)
        view._offset = len(self._all())
        return view

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    @property
    def ended(self) -> bool:
        """True once the stream reached EOF (never for a file)."""
        return self.path is None and self._store.ended

    # Waiting

    def wait_line(self, match: Callable[[str], bool], timeout: float = 10.0, since: int = 0) -> str:
        """The first line (from position ``since``) for which ``match`` is true."""
        return self.wait_lines(match, timeout, 1, since)[0]

    def wait_for(
        self, pattern: str, timeout: float = 10.0, count: int = 1, since: int = 0
    ) -> list[re.Match[str]]:
        """The first ``count`` matches of the regular expression ``pattern``."""
        regex = re.compile(pattern)
        lines = self.wait_lines(lambda line: regex.search(line) is not None, timeout, count, since)
        return [m for line in lines if (m := regex.search(line))]

    def wait_lines(
        self, match: Callable[[str], bool], timeout: float, count: int, since: int = 0
    ) -> list[str]:
        """The first ``count`` lines that ``match``; TimeoutError (with the output) otherwise."""
        deadline = time.monotonic() + timeout
        found: list[str] = []
        scanned = since
        with self._store.cond:  # re-entrant: reading the lines takes it too
            while True:
                ended = self.ended  # read first: a line written just before EOF still counts
                lines = self.lines
                found += [line for line in lines[scanned:] if match(line)]
                scanned = max(scanned, len(lines))
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or ended:
                    why = "the process ended" if ended else f"not within {timeout}s"
                    raise TimeoutError(
                        f"{self.name}: {len(found)} of {count} lines wanted ({why}); "
                        f"output:\n{self.text()}"
                    )
                self._store.cond.wait(min(left, FILE_POLL) if self.path is not None else left)
