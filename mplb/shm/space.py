"""The reservable space of the shared segment: persistence tables and upstream words.

Mixed into SharedState (mplb.shm.segment), whose views and directories it uses.  The
master reserves, before it forks a generation, what that generation needs; workers
only find it.  ``reclaim`` gives back what no running generation names any more: table
pages go back to the system (tmpfs frees a range punched out of a mapping).
"""
from __future__ import annotations

import mmap
import time

from mplb.errors import MplbError
from mplb.shm.layout import (
    HDR_POOL_ENTRIES, HDR_POOL_USED, HDR_SERVERS_USED, T_CAPACITY, T_K1, T_K2, T_START,
    T_TTL, TABLE_DIR_BYTES, TABLE_NAME_AT, TABLE_NAME_MAX, U_K1, U_K2, U_ROTATION,
    UPSTREAM_WORDS, zeros)
from mplb.shm.tables import ENTRY_WORDS, GROUP, ShmTable, digest_words


class Reservations:
    """Tables in the pool, per-upstream words, and reclaiming (a SharedState mixin)."""

    # -- persistence tables -------------------------------------------------------------

    def _table_dir(self, index: int) -> int:
        return self.off_tables + index * TABLE_DIR_BYTES // 8

    def table(self, name: str, capacity: int, ttl: float, cluster_key: bytes = b"") -> ShmTable:
        """The table called ``name``: reserved by the master, found by the workers.

        With ``cluster_key`` (shared_store), keys are digested with it instead of this
        master's salt: a digest then means the same client on every instance.
        """
        table = self._tables.get(name)
        if table is not None:
            table.ttl_us = int(ttl * 1e6)
            return table
        raw = name.encode()[:TABLE_NAME_MAX]
        k1, k2 = digest_words(raw, b"mplb-table")
        capacity = max(GROUP, -(-capacity // GROUP) * GROUP)
        found = self._find_table(k1, k2)
        if found is None:
            self._reserve_check(name)
            found = self._alloc_table(k1, k2, raw, capacity)
        index, start, cap = found
        if self.writable:
            self.q[self._table_dir(index) + T_TTL] = int(ttl * 1e6)
        table = ShmTable(self.q, self.off_pool + start * ENTRY_WORDS, cap, int(ttl * 1e6),
                         cluster_key or self.salt, self.locks, stripe_seed=index * 31,
                         name=name, group_salt=self.salt if cluster_key else None,
                         index=index)
        self._tables[name] = table
        return table

    def find_table(self, index: int):
        """The table a worker names by its directory ``index`` (or None): master side,
        for entries announced by workers; never reserves."""
        for table in self._tables.values():
            if table.index == index:
                return table
        return None

    def _find_table(self, k1, k2):
        for i in range(self.max_tables):
            d = self._table_dir(i)
            if self.q[d + T_K1] == k1 and self.q[d + T_K2] == k2:
                return i, self.q[d + T_START], self.q[d + T_CAPACITY]
        return None

    def _table_entries(self):
        """(index, directory word, name) of every allocated table."""
        q, view = self.q, self.view
        for i in range(self.max_tables):
            d = self._table_dir(i)
            if q[d + T_K1] == 0 and q[d + T_K2] == 0:
                continue
            start = d * 8 + TABLE_NAME_AT
            name = bytes(view[start:start + TABLE_NAME_MAX]).rstrip(b"\0").decode()
            yield i, d, name

    def _alloc_table(self, k1, k2, raw, capacity):
        """Master: a directory entry and the first gap in the pool that fits."""
        q = self.q
        free_index = next((i for i in range(self.max_tables)
                           if not q[self._table_dir(i) + T_K1]
                           and not q[self._table_dir(i) + T_K2]), None)
        if free_index is None:
            raise MplbError(f"shared memory table directory full ({self.max_tables} tables "
                            f"in use by running generations)")
        start = self._pool_gap(capacity)
        if start is None:
            raise MplbError(f"shared memory table pool exhausted: {capacity} entries "
                            f"needed, {q[HDR_POOL_ENTRIES] - q[HDR_POOL_USED]} of "
                            f"{q[HDR_POOL_ENTRIES]} free (a restart sizes the segment anew)")
        first = self.off_pool + start * ENTRY_WORDS
        q[first:first + capacity * ENTRY_WORDS] = zeros(capacity * ENTRY_WORDS)
        d = self._table_dir(free_index)
        q[d + T_START], q[d + T_CAPACITY] = start, capacity
        name_at = d * 8 + TABLE_NAME_AT
        self.view[name_at:name_at + TABLE_NAME_MAX] = bytes(TABLE_NAME_MAX)
        self.view[name_at:name_at + len(raw)] = raw
        q[HDR_POOL_USED] += capacity
        q[d + T_K2] = k2
        q[d + T_K1] = k1                            # published last: a finder sees all
        return free_index, start, capacity

    def _pool_gap(self, capacity: int):
        """First pool entry of a free run of ``capacity`` entries (first fit), or None."""
        used = sorted((self.q[d + T_START], self.q[d + T_CAPACITY])
                      for _, d, _ in self._table_entries())
        position = 0
        for start, cap in used:
            if start - position >= capacity:
                return position
            position = max(position, start + cap)
        return position if self.q[HDR_POOL_ENTRIES] - position >= capacity else None

    def tables(self, now: float = None) -> dict:
        """name -> {capacity, entries} for every allocated table (statistics)."""
        now = time.monotonic() if now is None else now
        out = {}
        for _, d, name in self._table_entries():
            cap = self.q[d + T_CAPACITY]
            table = ShmTable(self.q, self.off_pool + self.q[d + T_START] * ENTRY_WORDS, cap,
                             self.q[d + T_TTL], self.salt, self.locks)
            out[name] = {"capacity": cap, "entries": table.count(now)}
        return out

    # -- upstream words -----------------------------------------------------------------

    def _upstream_entry(self, index: int) -> int:
        return self.off_upstreams + index * UPSTREAM_WORDS

    def upstream_word(self, name: str, field: int = U_ROTATION) -> int:
        """Index in ``q`` of a per-upstream word shared by all workers (the rotation)."""
        entry = self._upstreams.get(name)
        if entry is None:
            k1, k2 = digest_words(name.encode(), b"mplb-upstream")
            entry = next((e for e, e1, e2 in self._upstream_entries() if (e1, e2) == (k1, k2)),
                         None)
            if entry is None:
                self._reserve_check(f"upstream {name}")
                entry = self._add_upstream(k1, k2, name)
            self._upstreams[name] = entry
        return entry + field

    def _upstream_entries(self):
        q = self.q
        for i in range(self.max_upstreams):
            e = self._upstream_entry(i)
            if q[e + U_K1] or q[e + U_K2]:
                yield e, q[e + U_K1], q[e + U_K2]

    def _add_upstream(self, k1, k2, name) -> int:
        q = self.q
        for i in range(self.max_upstreams):
            e = self._upstream_entry(i)
            if not q[e + U_K1] and not q[e + U_K2]:
                q[e:e + UPSTREAM_WORDS] = zeros(UPSTREAM_WORDS)
                q[e + U_K2] = k2
                q[e + U_K1] = k1
                return e
        raise MplbError(f"shared memory upstream directory full ({self.max_upstreams} "
                        f"upstreams in use by running generations)")

    # -- reclaiming what no generation uses ---------------------------------------------

    def reclaim(self, urls, tables, upstreams) -> dict:
        """Master: free every server, table and upstream word not named here.

        Call it only with the names every running generation (and a reload being
        started) uses: whatever else is in the segment belongs to workers that have
        exited.  Returns how many entries of each kind were freed.
        """
        if not self.allocating:
            raise MplbError("only the master reclaims shared memory")
        freed = {"servers": 0, "tables": 0, "upstreams": 0}
        for sid, url in list(self._server_entries()):
            if url not in urls:
                self.q[self._url_entry(sid) // 8] = 0           # unpublished first
                self._clear_server(sid)
                self.q[HDR_SERVERS_USED] -= 1
                self._sids.pop(url, None)
                freed["servers"] += 1
        keep = {digest_words(name.encode()[:TABLE_NAME_MAX], b"mplb-table") for name in tables}
        for _, d, name in list(self._table_entries()):
            if (self.q[d + T_K1], self.q[d + T_K2]) not in keep:
                self._free_table(d)
                self._tables.pop(name, None)
                freed["tables"] += 1
        keep = {digest_words(name.encode(), b"mplb-upstream") for name in upstreams}
        for e, k1, k2 in list(self._upstream_entries()):
            if (k1, k2) not in keep:
                self.q[e + U_K1] = self.q[e + U_K2] = 0
                freed["upstreams"] += 1
        self._upstreams = {name: e for name, e in self._upstreams.items()
                           if digest_words(name.encode(), b"mplb-upstream") in keep}
        return freed

    def _free_table(self, d: int) -> None:
        """Unpublish a table entry and give its pool pages back to the system."""
        q = self.q
        start, cap = q[d + T_START], q[d + T_CAPACITY]
        q[d + T_K1] = q[d + T_K2] = 0
        q[d + T_START] = q[d + T_CAPACITY] = q[d + T_TTL] = 0
        q[HDR_POOL_USED] -= cap
        first = (self.off_pool + start * ENTRY_WORDS) * 8
        end = first + cap * ENTRY_WORDS * 8
        page = mmap.PAGESIZE
        inner_start, inner_end = -(-first // page) * page, end // page * page
        if inner_end > inner_start and hasattr(mmap, "MADV_REMOVE"):
            try:
                self.mm.madvise(mmap.MADV_REMOVE, inner_start, inner_end - inner_start)
            except OSError:
                pass              # the pages stay; _alloc_table zeroes what it reuses


