"""Fixtures for the fault, shutdown and exhaustion tests: a lab, the forwarder in its router
namespace, and the scripted peers of ``fakes.py``, each stopped and removed after the test.

Everything runs in the namespaces of ``handyproxy.lab.netns.Lab``; the test process itself talks to
them through sockets created inside a namespace (``lab.connect``), so no test traffic touches the
host's own network.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultkit import (
    FAKES,
    ORIGIN,
    ORIGIN6,
    PROXY_PORT,
    UPSTREAM,
    UPSTREAM6,
    Fake,
    Forwarder,
    nofile_prefix,
)

from handyproxy.lab.netns import Lab, missing_requirements


@pytest.fixture
def lab() -> Iterator[Lab]:
    missing = missing_requirements()
    if missing:  # the test command installs everything; a gap must fail, not skip
        pytest.fail("the lab needs " + ", ".join(missing), pytrace=False)
    with Lab(prefix=f"hr{os.getpid() % 100000}{os.urandom(2).hex()}") as lab:
        yield lab


def _popen(lab: Lab, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    return lab.popen(
        ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, **kwargs
    )


@pytest.fixture
def start_fake(lab: Lab) -> Iterator[Callable[..., Fake]]:
    """``start_fake("upstream", mode="echo", fault="reset", after=1000)`` or ``("origin")``."""
    started: list[Fake] = []

    def start(
        role: str, *, nofile: int | None = None, listen: list[str] | None = None, **opts: Any
    ) -> Fake:
        if listen is None:
            listen = (
                [f"{UPSTREAM}:{PROXY_PORT}", f"[{UPSTREAM6}]:{PROXY_PORT}"]
                if role == "upstream"
                else [f"{ORIGIN}:80", f"[{ORIGIN6}]:80"]
            )
        argv = [*nofile_prefix(nofile), sys.executable, str(FAKES), role]
        for addr in listen:
            argv += ["--listen", addr]
        for key, value in opts.items():
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        fake = Fake(_popen(lab, role, argv), f"fake {role}")
        started.append(fake)
        for _ in listen:
            fake.wait_line('"ev": "listening"', timeout=10)
        return fake

    yield start
    for fake in reversed(started):
        lab.stop(fake.popen)


@pytest.fixture
def start_forwarder(lab: Lab) -> Iterator[Callable[..., Forwarder]]:
    """``start_forwarder("-idle-timeout", "2s")``: runs handyproxy, installs the REDIRECT."""
    started: list[Forwarder] = []

    def start(
        *flags: str, nofile: int | None = None, redirect: bool = True, port: int = 0
    ) -> Forwarder:
        """Port 0 reads the kernel's choice from the ``listening on`` line; a fixed port is
        needed with ``-log-level warning``, which leaves that line out."""
        argv = [
            *nofile_prefix(nofile),
            sys.executable,
            "-m",
            "handyproxy",
            "-local-port",
            str(port),
            "-upstream-proxy",
            f"{UPSTREAM}:{PROXY_PORT}",
            *flags,
        ]
        fwd = Forwarder(_popen(lab, "router", argv), "handyproxy")
        started.append(fwd)
        if port:
            deadline = time.monotonic() + 15
            while not lab.run(
                "router", ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True
            ).stdout.strip():
                assert fwd.alive() and time.monotonic() < deadline, fwd.text()
                time.sleep(0.1)
            fwd.port = port
        else:
            line = fwd.wait_line(r"listening on \S+:\d+", timeout=15)
            fwd.port = int(re.search(r"listening on \S+:(\d+)", line).group(1))  # type: ignore[union-attr]
        if redirect:
            lab.redirect(fwd.port)
        return fwd

    yield start
    for fwd in reversed(started):
        if fwd.alive():
            fwd.popen.send_signal(signal.SIGKILL)
        fwd.popen.wait(10)
