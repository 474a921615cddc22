"""Readiness of the tunnels' sockets: one epoll of our own, itself one reader of the event loop.

uvloop (libuv) gives every descriptor with a reader or a writer a poll handle of its own, and
every change to it costs system calls: building one checks the descriptor (epoll_ctl ADD and
DEL, an ioctl), each change of interest is a DEL and a re-ADD, dropping it a DEL or two, about
eighteen per tunnel in all. An epoll of our own costs one epoll_ctl per change (register,
modify, unregister) and no objects, and tells the loop about all the tunnels' sockets through a
single registration that never changes. The listeners, the supervisor's channel and the copy
relay's transports stay with the loop.

The interface is the loop's (``add_reader``, ``remove_writer``...), with the loop's rules:
level-triggered, so a callback that leaves bytes unread is called again on the next turn; an
error or hang-up wakes both the reader and the writer; a descriptor is unregistered before it
is closed. Nothing here duplicates a descriptor, and tunnel sockets never outlive their
process, so the epoll never holds a file its owner closed.
"""

from __future__ import annotations

import asyncio
import errno
import select
import weakref
from collections.abc import Callable

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
#: What wakes a reader and a writer: an error or hang-up wakes both, as in libuv, so that the
#: callback's own read or write finds the error.
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
#: Events taken per wake-up; more stay ready for the next one.
BATCH = 1024

_ours: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Readiness] = weakref.WeakKeyDictionary()


def of(loop: asyncio.AbstractEventLoop) -> Readiness:
    """The loop's Readiness, made on first use (so after the worker's fork, never before)."""
    ready = _ours.get(loop)
    if ready is None:
        ready = _ours[loop] = Readiness(loop)
    return ready


class Readiness:
    """Readers and writers of descriptors on one epoll, dispatched from one loop callback."""

    __slots__ = ("ep", "loop", "masks", "readers", "writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the table of loops holds this object, and a strong link back would keep every
        # loop (and its epoll) alive for good.
        self.loop = weakref.ref(loop)
        self.ep = select.epoll()  # close-on-exec
        self.readers: dict[int, Callable[[], object]] = {}
        self.writers: dict[int, Callable[[], object]] = {}
        self.masks: dict[int, int] = {}  # what the epoll has for each registered descriptor
        loop.add_reader(self.ep.fileno(), self.dispatch)

    def close(self) -> None:
        """Leave the loop and close the epoll (else both go when the loop is freed)."""
        loop = self.loop()
        if not self.ep.closed:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self.ep.fileno())
            self.ep.close()
        if loop is not None:
            _ours.pop(loop, None)

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        self.readers[fd] = callback
        self._set(fd, self.masks.get(fd, 0) | _IN)

    def add_writer(self, fd: int, callback: Callable[[], object]) -> None:
        self.writers[fd] = callback
        self._set(fd, self.masks.get(fd, 0) | _OUT)

    def remove_reader(self, fd: int) -> bool:
        if self.readers.pop(fd, None) is None:
            return False
        self._set(fd, self.masks.get(fd, 0) & ~_IN)
        return True

    def remove_writer(self, fd: int) -> bool:
        if self.writers.pop(fd, None) is None:
            return False
        self._set(fd, self.masks.get(fd, 0) & ~_OUT)
        return True

    def watch(
        self, fd: int, reader: Callable[[], object] | None, writer: Callable[[], object] | None
    ) -> None:
        """Make ``fd``'s reader and writer these two (None: none) in one change of interest."""
        for table, callback in ((self.readers, reader), (self.writers, writer)):
            if callback is None:
                table.pop(fd, None)
            else:
                table[fd] = callback
        self._set(fd, (_IN if reader is not None else 0) | (_OUT if writer is not None else 0))

    def _set(self, fd: int, mask: int) -> None:
        """Make the epoll's interest in ``fd`` ``mask``: one epoll_ctl, none when unchanged."""
        masks = self.masks
        old = masks.get(fd, 0)
        if mask == old:
            return
        ep = self.ep
        try:
            if not mask:
                del masks[fd]
                ep.unregister(fd)
            elif old:
                masks[fd] = mask
                ep.modify(fd, mask)
            else:
                masks[fd] = mask
                ep.register(fd, mask)
        except FileExistsError:  # registered under a mask we lost track of
            ep.modify(fd, mask)
        except OSError as exc:
            if exc.errno == errno.ENOENT and mask:  # the kernel dropped it with its file
                ep.register(fd, mask)
            elif exc.errno not in (errno.ENOENT, errno.EBADF):
                raise

    def dispatch(self) -> None:
        """The epoll is readable: run the callbacks of what is ready, each at most once.

        A callback may drop or change any registration, its own or another's, so each one is
        looked up when its turn comes; one that raises is reported as the loop reports its own
        and the rest still run.
        """
        readers, writers = self.readers, self.writers
        for fd, events in self.ep.poll(0, BATCH):
            try:
                if events & _READ_EVENTS:
                    callback = readers.get(fd)
                    if callback is not None:
                        callback()
                if events & _WRITE_EVENTS:
                    callback = writers.get(fd)
                    if callback is not None:
                        callback()
            except Exception as exc:
                loop = self.loop()
                if loop is None:
                    raise
                loop.call_exception_handler(
                    {"message": f"readiness callback for fd {fd} failed", "exception": exc}
                )
