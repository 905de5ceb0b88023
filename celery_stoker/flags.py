"""Flags every process of a worker sees, for what is said once per worker, not per process.

With prefork each event may run in another pool process, and under
``--max-tasks-per-child`` in a new one: a fault that every event of an outage
meets would be logged once per process, again and again, if each process
kept its own "already said".
"""

from __future__ import annotations

import mmap
import zlib


class WorkerFlags:
    """Stoker names flagged across a worker's processes, for "said once per worker".

    A page shared (``MAP_SHARED``) with the pool processes forked after this
    object is made (the worker's main process imports the modules that make
    them before its pool starts): a flag a pool process sets is seen by its
    siblings and by the processes that replace it (``--max-tasks-per-child``).
    Names share 4096 slots: two Stokers that collide only share when they are
    said.
    """

    SIZE = 4096

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, self.SIZE)

    def _slot(self, name: str) -> int:
        return zlib.crc32(name.encode("utf-8", "surrogatepass")) % self.SIZE

    def __contains__(self, name: str) -> bool:
        return self._page[self._slot(name)] != 0

    def add(self, name: str) -> None:
        self._page[self._slot(name)] = 1

    def discard(self, name: str) -> None:
        self._page[self._slot(name)] = 0
