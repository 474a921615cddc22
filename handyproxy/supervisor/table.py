"""The instance-wide tunnel counts behind ``-max-connections`` and ``-max-client-connections``.

With ``-workers N`` each worker accepts on its own, so a cap kept per process would let one
client hold N times its share. The counts live in one shared-memory table instead: a memfd the
master creates (and hands on across an upgrade's exec, so old and new workers count together),
one row per worker, each row written only by its owner, so no lock is needed. A row holds the
worker's open tunnels and a counter per client bucket (the client address hashed with CRC-32,
stable across processes and exec). Addresses that share a bucket count together: on a
collision a client is capped early, never late.
"""

from __future__ import annotations

import mmap
import os
import zlib

#: Rows for the workers of two generations (an upgrade's old and new) at the largest -workers.
ROWS = 520
#: Client buckets per row; with the open count in front a row is one 4 KiB page of int32.
BUCKETS = 1023
ROW_INTS = BUCKETS + 1


class SharedTable:
    """The table, mapped; ``fd`` is the memfd to hand to a re-executed master."""

    def __init__(self, fd: int | None = None, rows: int = ROWS) -> None:
        # The rows, then one int: how many rows have been in use (written by the master only),
        # so a check sums those rather than all of them.
        self.used_at = rows * ROW_INTS
        size = (self.used_at + 1) * 4
        if fd is None:
            fd = os.memfd_create("handyproxy-tunnels", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.rows = rows
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.ints = memoryview(self._map).cast("i")

    def row(self, index: int) -> Row:
        return Row(self, index)

    def reserve(self, index: int) -> None:
        """Count row ``index`` in from now on (the master, before the worker starts)."""
        self.ints[self.used_at] = max(self.ints[self.used_at], index + 1)

    def clear(self, index: int) -> None:
        """Forget a row whose worker is gone: its tunnels went with it."""
        start = index * ROW_INTS
        self.ints[start : start + ROW_INTS] = memoryview(bytes(ROW_INTS * 4)).cast("i")

    def open_total(self) -> int:
        """Tunnels open in the whole instance."""
        return sum(self.ints[0 : self.ints[self.used_at] * ROW_INTS : ROW_INTS])

    def client_total(self, bucket: int) -> int:
        """Tunnels open in the whole instance for the clients in ``bucket``."""
        return sum(self.ints[1 + bucket : self.ints[self.used_at] * ROW_INTS : ROW_INTS])


def bucket_of(client_ip: str) -> int:
    return zlib.crc32(client_ip.encode()) % BUCKETS


class Row:
    """One worker's row: the only place that worker writes."""

    __slots__ = ("base", "ints", "table")

    def __init__(self, table: SharedTable, index: int) -> None:
        self.table = table
        self.ints = table.ints
        self.base = index * ROW_INTS

    def add(self, bucket: int, delta: int) -> None:
        ints, base = self.ints, self.base
        ints[base] += delta
        ints[base + 1 + bucket] += delta

    def admit(self, bucket: int, cap: int, client_cap: int) -> str | None:
        """Count a new tunnel; None when it fits under both caps, else the refusal reason.

        Counting first and checking after means two workers admitting at the same moment can
        both refuse, never both exceed.
        """
        self.add(bucket, 1)
        table = self.table
        if cap and table.open_total() > cap:
            self.add(bucket, -1)
            return "connection-cap"
        if client_cap and table.client_total(bucket) > client_cap:
            self.add(bucket, -1)
            return "client-cap"
        return None
