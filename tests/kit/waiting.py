"""Waiting for a condition instead of sleeping: a test returns as soon as the condition holds
and fails with what it last saw when it never does, however loaded the machine is.

Lines a process writes are waited for with ``handyproxy.lab.output.Output.wait_for``, which
wakes on the line itself; ``wait_until`` is for what only polling can see (descriptor counts in
/proc, sockets in ``ss``, a process count), and ``until`` is its twin inside a running event
loop, which it lets turn between looks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How often ``wait_until`` looks again: short against every bound the tests use.
POLL = 0.02


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, what: str = "", interval: float = POLL
) -> T:
    """The first true value ``condition()`` returns; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{what or getattr(condition, '__name__', 'condition')}: "
                f"not true within {timeout}s (last: {value!r})"
            )
        time.sleep(interval)


async def until(condition: Callable[[], object], what: str = "", timeout: float = 5.0) -> None:
    """Let the running loop turn until ``condition()`` is true (a kernel or loop state with no
    event to await); AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"{what or 'condition'}: not true within {timeout}s")
        await asyncio.sleep(0)
