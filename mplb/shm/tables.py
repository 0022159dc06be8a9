"""Persistence tables in shared memory: fixed capacity, TTL, approximate LRU, many writers.

A table is an array of entries of 5 int64 words ``seq, k1, k2, value, last_used`` (last used
in monotonic microseconds) inside the shared segment (mplb.shm.layout), or inside private memory
for a single process.

Concurrency scheme (see also mplb.shm.layout):

- A table is set-associative: a key hashes (blake2b-128 keyed with the per-master salt, so
  clients cannot aim at one group) to a group of 16 entries.  Entries are filled in order
  and never cleared, so a lookup stops at the first empty entry.  An insert into a full
  group replaces an expired entry first, else the least recently used one of the group
  (approximate LRU: per group, not for the whole table).
- Writers (put/delete) hold the group's stripe lock (an fcntl byte-range lock, see
  :class:`StripeLocks`) for a few memory operations.  Two writers in different processes
  can therefore never pick the same empty entry, duplicate a key or interleave the words
  of one entry.
- Readers take no lock: a per-entry seqlock.  A writer makes ``seq`` odd, writes the
  entry, makes it even; a reader retries while ``seq`` is odd or changed during its read,
  and after a few retries takes the stripe lock (a writer killed mid-write leaves ``seq``
  odd; under the lock that entry reads as empty and the next insert repairs it).  x86-64
  keeps stores ordered with stores and loads with loads, which is what the seqlock needs.
- Readers refresh "last used" with a plain racy store (at most once a second): a lost or
  misplaced refresh only makes an entry look a little older or newer.
- A worker memoises key digests (bounded), so a returning client costs no hashing.

tests/shm_stress.py hammers tables from 4 processes with every key forced into a few
groups; with the stripe locks switched off it loses and duplicates keys at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import struct

ENTRY_WORDS = 5
GROUP = 16
STRIPES = 256
LOCK_LIVE = 0                    # held by the master as long as it lives (mplb.shm.liveness)
LOCK_HEALTH = 1                  # + stripe (lock byte offsets may lie beyond the file end)
LOCK_TABLE = 1 + STRIPES         # + stripe
TOUCH_US = 1_000_000
DIGEST_CACHE = 4096              # per-process memo of key -> digest (keys are bounded)
EXPIRED = -(1 << 62)

_unpack_qq = struct.Struct("<qq").unpack
_pack_qq = struct.Struct("<qq").pack


def digest_words(data: bytes, salt: bytes) -> tuple:
    """A bounded 128-bit key for any client-supplied bytes; (0, 0) is reserved for empty."""
    k1, k2 = _unpack_qq(hashlib.blake2b(data, digest_size=16, key=salt).digest())
    if k1 == 0 and k2 == 0:
        k2 = 1
    return k1, k2


class StripeLocks:
    """fcntl byte-range locks on the segment file; a no-op when there is no file."""

    def __init__(self, fd):
        self.fd = fd

    def acquire(self, offset: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset, os.SEEK_SET)

    def release(self, offset: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


class ShmTable:
    """A fixed-capacity set-associative table (key bytes -> int64) with TTL and ~LRU."""

    def __init__(self, words, start_word: int, capacity: int, ttl_us: int, salt: bytes,
                 locks: StripeLocks, stripe_seed: int = 0, name: str = "",
                 group_salt: bytes = None, index: int = 0):
        self.q = words
        self.start = start_word
        self.capacity = capacity
        self.groups = capacity // GROUP
        self.ttl_us = ttl_us
        self.salt = salt
        self.locks = locks
        self.seed = stripe_seed
        self.name = name
        self.index = index              # directory entry (names the table to the master)
        # A cluster table digests keys with the cluster's key (the same on every
        # instance, so a digest can travel between them) and places a digest in a
        # group by this master's own salt, so a client still cannot aim at a group.
        self.group_salt = group_salt
        self._grouper = (hashlib.blake2b(digest_size=8, key=group_salt)
                         if group_salt is not None else None)
        self._keyed = hashlib.blake2b(digest_size=16, key=salt or b"")
        self._digests = {}

    def digest(self, key: bytes) -> tuple:
        """(k1, k2, group) of ``key``, memoised per process (a client is usually seen again)."""
        words = self._digests.get(key)
        if words is None:
            h = self._keyed.copy()
            h.update(key)
            k1, k2 = _unpack_qq(h.digest())
            if k1 == 0 and k2 == 0:
                k2 = 1
            words = (k1, k2, self.group_of(k1, k2))
            if len(self._digests) >= DIGEST_CACHE:
                self._digests.clear()
            self._digests[key] = words
        return words

    def group_of(self, k1: int, k2: int) -> int:
        """The group a digest lives in."""
        if self._grouper is None:
            return k1 % self.groups
        h = self._grouper.copy()
        h.update(_pack_qq(k1, k2))
        return int.from_bytes(h.digest(), "little") % self.groups

    def _group(self, g: int) -> tuple:
        return self.start + g * GROUP * ENTRY_WORDS, LOCK_TABLE + (g + self.seed) % STRIPES

    def get(self, key: bytes, now: float):
        """The live value for ``key`` or None; refreshes its last-used time."""
        k1, k2, g = self.digest(key)
        base = self.start + g * (GROUP * ENTRY_WORDS)
        q = self.q
        for off in range(base, base + GROUP * ENTRY_WORDS, ENTRY_WORDS):
            seq = q[off]
            e1 = q[off + 1]
            if e1 == k1:
                # Only a match must be read consistently; a racing miss is harmless.
                e2, value, used = q[off + 2], q[off + 3], q[off + 4]
                if seq & 1 or q[off] != seq:
                    entry = self._read_slow(off, LOCK_TABLE + (g + self.seed) % STRIPES)
                    if entry is None:
                        continue                # a dead writer's entry: not this key
                    e1, e2, value, used = entry
                if e1 == k1 and e2 == k2:
                    t = int(now * 1_000_000)
                    if t - used > self.ttl_us:
                        return None
                    if t - used > TOUCH_US:
                        q[off + 4] = t          # racy refresh, benign (module docstring)
                    return value
            elif e1 == 0 and q[off + 2] == 0:
                return None
        return None

    def _read_slow(self, off: int, lock: int):
        """Seqlock read of (k1, k2, value, last_used); None for a dead writer's entry."""
        q = self.q
        for _ in range(100):
            s1 = q[off]
            if s1 & 1:
                continue
            entry = (q[off + 1], q[off + 2], q[off + 3], q[off + 4])
            if q[off] == s1:
                return entry
        self.locks.acquire(lock)
        try:
            if q[off] & 1:
                return None
            return (q[off + 1], q[off + 2], q[off + 3], q[off + 4])
        finally:
            self.locks.release(lock)

    def put(self, key: bytes, value: int, now: float, replace: bool = True):
        """Insert or update ``key``; a full group loses its least recently used entry.

        With ``replace=False`` a live entry another writer made first is kept and its
        value returned (first writer wins); otherwise returns None.
        """
        k1, k2, g = self.digest(key)
        return self.put_words(k1, k2, g, value, int(now * 1_000_000), replace)

    def put_words(self, k1: int, k2: int, g: int, value: int, t: int, replace: bool = True):
        """``put`` by digest: the master writes entries other instances made (``t`` is
        the last-used time in monotonic microseconds, so an entry keeps its age)."""
        base, lock = self._group(g)
        q = self.q
        self.locks.acquire(lock)
        try:
            victim = corpse = None
            oldest = None
            for off in range(base, base + GROUP * ENTRY_WORDS, ENTRY_WORDS):
                e1, e2 = q[off + 1], q[off + 2]
                if q[off] & 1:                       # torn by a dead writer: reusable
                    corpse = corpse or off
                    continue
                if e1 == k1 and e2 == k2:
                    if not replace and t - q[off + 4] <= self.ttl_us:
                        return q[off + 3]
                    victim = off
                    break
                if e1 == 0 and e2 == 0:
                    victim = corpse or off
                    break
                used = q[off + 4]
                if oldest is None or used < oldest:
                    victim, oldest = off, used
            else:
                victim = corpse or victim
            seq = q[victim] | 1                      # odd: writing (repairs an odd corpse)
            q[victim] = seq
            q[victim + 1] = k1
            q[victim + 2] = k2
            q[victim + 3] = value
            q[victim + 4] = t
            q[victim] = seq + 1
        finally:
            self.locks.release(lock)
        return None

    def delete(self, key: bytes) -> None:
        """Expire ``key`` (the entry stays in place so lookups still stop correctly)."""
        k1, k2, g = self.digest(key)
        base, lock = self._group(g)
        q = self.q
        self.locks.acquire(lock)
        try:
            for off in range(base, base + GROUP * ENTRY_WORDS, ENTRY_WORDS):
                if q[off + 1] == k1 and q[off + 2] == k2:
                    seq = q[off] | 1
                    q[off] = seq
                    q[off + 4] = EXPIRED
                    q[off] = seq + 1
                    return
        finally:
            self.locks.release(lock)

    def count(self, now: float) -> int:
        """Live entries (a scan in C-speed steps; for statistics only)."""
        cutoff = int(now * 1_000_000) - self.ttl_us
        end = self.start + self.capacity * ENTRY_WORDS
        used = self.q[self.start + 4:end:ENTRY_WORDS].tolist()
        live = sum(map(cutoff.__le__, used))
        if cutoff <= 0:                 # never-written entries (used == 0) passed the test
            live -= used.count(0)
        return live

    def entries(self):
        """(k1, k2, value, last_used) of every written entry (tests and tools)."""
        q = self.q
        out = []
        for off in range(self.start, self.start + self.capacity * ENTRY_WORDS, ENTRY_WORDS):
            if q[off + 1] or q[off + 2]:
                out.append((q[off + 1], q[off + 2], q[off + 3], q[off + 4]))
        return out


def private_table(name: str, capacity: int, ttl: float, salt: bytes,
                  cluster_key: bytes = b"") -> ShmTable:
    """A table over process memory (single process: no locks needed)."""
    capacity = max(GROUP, -(-capacity // GROUP) * GROUP)
    words = memoryview(bytearray(capacity * ENTRY_WORDS * 8)).cast("q")
    return ShmTable(words, 0, capacity, int(ttl * 1e6), cluster_key or salt,
                    StripeLocks(None), name=name, group_salt=salt if cluster_key else None)
