"""Socket options the forwarder sets, each written once.

A reset on the wire is how a tunnel tells a peer "this transfer did not complete": the relays,
the set-up and the tests' peers all ask for it through ``reset_socket``.

A tunnel's sockets carry that reset *armed* from the start (the listener has it, accepted
sockets inherit it; the relay arms the upstream side), so when the process dies without a word
(SIGKILL, the OOM killer, a crash) the kernel's close sends RST, never a FIN that would make a
truncated download look complete. Only a deliberate graceful close disarms it first
(``keep_socket``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import socket
import struct
import termios

#: Errors that mean "the peer (or the path to it) went away", not a fault of ours.
PEER_RESETS = frozenset(
    {
        errno.ECONNRESET,
        errno.ENOTCONN,  # shutdown(2) on a socket the peer has reset (its state is CLOSE)
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4
#: struct linger {l_onoff = 1, l_linger = 0}: close() sends RST and drops unsent data.
LINGER_RESET = struct.pack("ii", 1, 0)
#: struct linger {l_onoff = 0}: the default, close() sends FIN after the unsent data.
LINGER_OFF = struct.pack("ii", 0, 0)


def reset_socket(sock: socket.socket | None) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER with a zero timeout)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def keep_socket(sock: socket.socket | None) -> None:
    """Disarm the reset: the next close is graceful (FIN after every byte written)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay (we forward what we get at once) and keepalive to find vanished peers.

    Set on the listeners too: accepted sockets inherit these options, which saves five
    syscalls per tunnel.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


# include/net/tcp_states.h, as TCP_INFO's first byte reports them.
TCP_ESTABLISHED = 1
TCP_FIN_WAIT2 = 5
TCP_CLOSE = 7  # what a socket becomes when a reset arrives
TCP_CLOSE_WAIT = 8  # ... and when a FIN arrives


def tcp_state(sock: socket.socket) -> int:
    """The connection's TCP state; CLOSE for a socket the kernel no longer knows."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return TCP_CLOSE


def reset_after_fin(sock: socket.socket | None) -> bool:
    """True when the peer was reset after its FIN, so every byte it sent is here.

    A reset leaves the socket in CLOSE, its error EPIPE if the FIN was in (CLOSE_WAIT) and
    ECONNRESET otherwise; the pending error is read, and so taken, only on a dead socket.
    """
    if sock is None or tcp_state(sock) != TCP_CLOSE:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EPIPE
    except OSError:
        return False


def unacked(sock: socket.socket | None) -> int:
    """Bytes written to ``sock`` that its peer has not acknowledged yet (SIOCOUTQ)."""
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
