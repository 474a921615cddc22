"""sd_notify and socket activation with the standard library only.

libsystemd bindings would be a compiled dependency for a handful of datagrams; the protocol is
documented and stable (sd_notify(3), sd_listen_fds(3)). Outside systemd every call is a no-op,
and no call ever raises: a broken notify socket must not take the forwarder down.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(*messages: str) -> bool:
    """Send ``KEY=VALUE`` lines to the service manager; False when not under systemd or on error."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not messages:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(messages).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", *([f"STATUS={status}"] if status else []))


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def listen_fds() -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_FDS), or [] when there are none for us."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not count or pid != str(os.getpid()):
        return []  # as sd_listen_fds(3): without our pid they were meant for someone else
    try:
        n = int(count)
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        try:
            os.set_inheritable(fd, False)
            socks.append(socket.socket(fileno=fd))
        except OSError:  # not an open socket: the caller binds its own instead
            continue
    return socks
