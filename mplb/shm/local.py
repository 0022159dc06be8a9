"""The segment's layout in one process's private memory, for a balancer without a master.

Unit tests and benchmarks build balancers with ``shared=None``: this stands in for the
shared segment with the same code, so what they measure is what the workers run.
"""
from __future__ import annotations

import mmap
import os

from mplb.shm.layout import segment_layout
from mplb.shm.segment import SharedState
from mplb.shm.tables import private_table


class LocalState(SharedState):
    """A private segment that reserves on demand (no master, one process)."""

    def __init__(self, max_workers: int = 1, max_servers: int = 64):
        header, total = segment_layout(max_workers, max_servers, 16, 4)
        mm = mmap.mmap(-1, total)
        mm[:len(header)] = header
        super().__init__(None, None, mm, True, salt=os.urandom(16), secret=os.urandom(32))
        self.allocating = True
        for slot in range(max_workers):
            self.worker_started(slot, os.getpid(), 0)

    def table(self, name: str, capacity: int, ttl: float, cluster_key: bytes = b""):
        """A private table (same code as the shared ones) sized on demand."""
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = private_table(name, capacity, ttl, self.salt,
                                                       cluster_key)
        table.ttl_us = int(ttl * 1e6)
        return table
