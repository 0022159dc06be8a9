"""The shared-memory segment: one file /dev/shm/mplb.<masterpid>, a fixed versioned layout.

Why a file: the master creates it before the first fork (MAP_SHARED survives fork, so every
worker sees the same pages) and tools (mplb-stats) can map it read-only by name.  The master
removes it on exit (``unlink``).

Layout (little-endian; every field an 8-byte aligned int64 "word" unless noted)::

    header   512 bytes   w0 magic b'MPLBSHM1'  w1 version  w2 total size  w3 master pid
                         w4 generation  w5 reload count  w6 start time (wall, us)
                         w7 max_workers  w8 max_servers  w9 max_tables  w10 pool entries
                         w11 pool entries allocated  w12 servers registered
                         w13 worker slots high-water mark  w16..w21 section byte offsets
                         bytes 256..272 hash salt, 272..304 cookie secret (random per master)
    servers  max_servers x 272 B: w0 url length, then the url (<= 264 bytes)
    counters max_servers x max_workers x 8 words: active, tunnels, requests, failures,
             bytes_in, bytes_out (2 spare); a (server, worker) slot is written only by
             that worker (the master zeroes active/tunnels of a dead worker's slot)
    health   max_servers x 8 words: passive fails, last failure (monotonic us), active
             check down flag, consecutive check fails, consecutive passes, last check (us)
    workers  max_workers x 8 words: pid, generation, connections, requests, started (wall us)
    tables   max_tables x 128 B: name digest (2 w), first pool entry, capacity, ttl us,
             then the name (<= 64 bytes) at byte 64
    pool     entries of 5 words: seq, key digest (2 w), value, last used (monotonic us)

Concurrency scheme:
- Counters: single writer per (server, worker) slot, no locks.  Aligned 8-byte stores are
  not torn on x86-64, so readers summing the slots see each word whole (the sum is a
  snapshot up to a few in-flight increments, which is all least_connections needs).
- Shared read-modify-write (passive failures, table inserts, directory and table
  allocation) is serialised by striped locks: fcntl byte-range locks (``lockf``) on bytes
  of the segment file, one byte per stripe.  They are released by the kernel if the holder
  dies, never spin, and are held only for a few memory operations with nothing that can
  yield to another greenlet in between.  Caveats: POSIX record locks belong to a process
  (threads of one process do not exclude each other; only the master runs threads and its
  health threads never take locks) and closing *any* descriptor of this file in a process
  drops that process's locks, so never open a second descriptor to it in a worker.
- Tables (mplb.shmtable): writers hold the group's stripe lock, readers use a per-entry
  seqlock; the table module's docstring describes the scheme.
- Hot path (mplb.balancing): a balancer resolves every word offset it needs once, at
  init (``counter_word``, ``health_word``, ``active_words``), and then reads and writes
  ``q`` directly: a pick is a handful of aligned loads and one store.
"""
from __future__ import annotations

import mmap
import os
import struct
import time

from mplb.errors import MplbError
from mplb.shmtable import (ENTRY_WORDS, GROUP, LOCK_GLOBAL, LOCK_HEALTH,  # noqa: F401
                           LOCK_TABLE, STRIPES, TOUCH_US, ShmTable, StripeLocks, digest_words)

MAGIC = b"MPLBSHM1"
VERSION = 1
HEADER_BYTES = 512
URL_ENTRY_BYTES = 272
URL_MAX = URL_ENTRY_BYTES - 8
NFIELDS = 8
FIELDS = ("active", "tunnels", "requests", "failures", "bytes_in", "bytes_out")
ACTIVE, TUNNELS, REQUESTS, FAILURES, BYTES_IN, BYTES_OUT = range(6)
HEALTH_WORDS = 8
H_FAILS, H_LAST_FAIL, H_DOWN, H_CHECK_FAILS, H_CHECK_PASSES, H_LAST_CHECK = range(6)
WORKER_WORDS = 8
W_PID, W_GENERATION, W_CONNECTIONS, W_REQUESTS, W_STARTED = range(5)
TABLE_DIR_BYTES = 128
TABLE_NAME_MAX = 64
HDR_SLOTS_USED = 13              # header word: worker slots high-water mark


def segment_path(master_pid: int, directory: str = "/dev/shm") -> str:
    """The segment of a master: the pid is a separate dot-delimited number."""
    return os.path.join(directory, f"mplb.{int(master_pid)}")


def now_us(clock_value: float) -> int:
    return int(clock_value * 1_000_000)


def segment_layout(max_workers, max_servers, table_entries, max_tables) -> tuple:
    """(header bytes, total size) of a segment with these capacities."""
    table_entries = max(GROUP, -(-table_entries // GROUP) * GROUP)
    sizes = [HEADER_BYTES, max_servers * URL_ENTRY_BYTES,
             max_servers * max_workers * NFIELDS * 8, max_servers * HEALTH_WORDS * 8,
             max_workers * WORKER_WORDS * 8, max_tables * TABLE_DIR_BYTES,
             table_entries * ENTRY_WORDS * 8]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = -(-sum(sizes) // mmap.PAGESIZE) * mmap.PAGESIZE
    header = bytearray(HEADER_BYTES)
    struct.pack_into("<8s15q", header, 0, MAGIC, VERSION, total, os.getpid(), 0, 0,
                     int(time.time() * 1e6), max_workers, max_servers, max_tables,
                     table_entries, 0, 0, 0, 0, 0)
    struct.pack_into("<6q", header, 128, *offsets[1:])
    header[256:272] = os.urandom(16)
    header[272:304] = os.urandom(32)
    return bytes(header), total


class SharedState:
    """Typed views over the segment; the same object serves master, workers and tools."""

    def __init__(self, path, fd, mm, writable):
        self.path = path
        self.fd = fd
        self.mm = mm
        self.writable = writable
        self.view = memoryview(mm)
        self.q = self.view.cast("q")
        self._sids = {}
        self._tables = {}
        q = self.q
        if bytes(self.view[:8]) != MAGIC or q[1] != VERSION:
            self.close()
            raise MplbError(f"{path}: not an mplb shared memory segment of version {VERSION}")
        self.max_workers, self.max_servers, self.max_tables = q[7], q[8], q[9]
        self.off_servers, self.off_counters, self.off_health = q[16] // 8, q[17] // 8, q[18] // 8
        self.off_workers, self.off_tables, self.off_pool = q[19] // 8, q[20] // 8, q[21] // 8
        self.salt = bytes(self.view[256:272])
        self.secret = bytes(self.view[272:304])
        self.locks = StripeLocks(fd if writable else None)

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, max_workers: int, max_servers: int = 1024,
               table_entries: int = 65536 * 2, max_tables: int = 64) -> "SharedState":
        """Master, before the first fork: make and initialise the segment file."""
        header, total = segment_layout(max_workers, max_servers, table_entries, max_tables)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        mm[:len(header)] = header
        return cls(path, fd, mm, True)

    @classmethod
    def open_readonly(cls, path: str) -> "SharedState":
        """Tools: map an existing segment read-only (no locks, seqlock reads only)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(path, None, mm, False)

    def close(self) -> None:
        """Drop the mapping in this process (the file stays)."""
        for table in self._tables.values():
            table.q = None
        self._tables.clear()
        self.q.release()
        self.view.release()
        self.mm.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unlink(self) -> None:
        """Master, at exit: remove the segment file (mappings stay valid until closed)."""
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- header -------------------------------------------------------------------------

    master_pid = property(lambda self: self.q[3])
    generation = property(lambda self: self.q[4])
    reloads = property(lambda self: self.q[5])
    start_time = property(lambda self: self.q[6] / 1e6)
    servers_registered = property(lambda self: self.q[12])

    def set_generation(self, generation: int) -> None:
        self.q[4] = generation

    def count_reload(self) -> None:
        self.q[5] += 1

    def _locked(self, offset):
        return _Held(self.locks, offset)

    # -- server directory ---------------------------------------------------------------

    def server_id(self, url: str) -> int:
        """Slot of ``url`` in the directory, registering it if new (cached per process)."""
        sid = self._sids.get(url)
        if sid is not None:
            return sid
        raw = url.encode()
        if len(raw) > URL_MAX:
            raise MplbError(f"server URL too long for shared memory: {url[:80]}...")
        sid = self._find_server(raw)
        if sid is None:
            if not self.writable:
                raise KeyError(url)
            with self._locked(LOCK_GLOBAL):
                sid = self._find_server(raw)
                if sid is None:
                    sid = self.q[12]
                    if sid >= self.max_servers:
                        raise MplbError(f"shared memory server directory full ({sid} servers)")
                    start = self.off_servers * 8 + sid * URL_ENTRY_BYTES
                    self.view[start + 8:start + 8 + len(raw)] = raw
                    self.q[start // 8] = len(raw)
                    self.q[12] = sid + 1
        self._sids[url] = sid
        return sid

    def _find_server(self, raw: bytes):
        for sid in range(self.q[12]):
            start = self.off_servers * 8 + sid * URL_ENTRY_BYTES
            n = self.q[start // 8]
            if n == len(raw) and self.view[start + 8:start + 8 + n] == raw:
                return sid
        return None

    def server_urls(self) -> list:
        out = []
        for sid in range(self.q[12]):
            start = self.off_servers * 8 + sid * URL_ENTRY_BYTES
            n = self.q[start // 8]
            out.append(bytes(self.view[start + 8:start + 8 + n]).decode())
        return out

    # -- counters (single writer per worker slot) --------------------------------------

    def _cell(self, worker_slot: int, sid: int) -> int:
        return self.off_counters + (sid * self.max_workers + worker_slot) * NFIELDS

    def counter_word(self, worker_slot: int, sid: int, field: int = ACTIVE) -> int:
        """Index in ``q`` of one counter of one worker slot (the hot path writes it)."""
        if not 0 <= worker_slot < self.max_workers:
            raise MplbError(f"worker slot {worker_slot} outside 0..{self.max_workers - 1}")
        return self._cell(worker_slot, sid) + field

    def active_words(self, sid: int) -> tuple:
        """(first index, stride) of the ACTIVE words of ``sid``: sum the first slots_used."""
        return self.off_counters + sid * self.max_workers * NFIELDS + ACTIVE, NFIELDS

    def health_word(self, sid: int) -> int:
        """Index in ``q`` of the health record of ``sid`` (H_* offsets within it)."""
        return self._health(sid)

    slots_used = property(lambda self: self.q[HDR_SLOTS_USED])

    def add_active(self, worker_slot: int, sid: int, delta: int) -> None:
        self.q[self._cell(worker_slot, sid) + ACTIVE] += delta

    def active_total(self, sid: int) -> int:
        base = self.off_counters + sid * self.max_workers * NFIELDS
        return sum(self.q[base:base + self.q[13] * NFIELDS:NFIELDS])

    def count_request(self, worker_slot: int, url: str) -> None:
        """One request (or upgrade) sent to ``url`` by this worker."""
        self.q[self._cell(worker_slot, self.server_id(url)) + REQUESTS] += 1
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_REQUESTS] += 1

    def exchange_words(self, worker_slot: int, url: str) -> tuple:
        """Word indexes a worker bumps per request to ``url``: requests, bytes in, bytes
        out, and its own request count (computed once, so the hot path only adds)."""
        cell = self._cell(worker_slot, self.server_id(url))
        return (cell + REQUESTS, cell + BYTES_IN, cell + BYTES_OUT,
                self.off_workers + worker_slot * WORKER_WORDS + W_REQUESTS)

    def add_bytes(self, worker_slot: int, url: str, n_in: int, n_out: int) -> None:
        """Bytes received from (in) and sent to (out) the backend ``url``."""
        cell = self._cell(worker_slot, self.server_id(url))
        self.q[cell + BYTES_IN] += n_in
        self.q[cell + BYTES_OUT] += n_out

    def tunnel_opened(self, worker_slot: int, url: str) -> None:
        self.q[self._cell(worker_slot, self.server_id(url)) + TUNNELS] += 1

    def tunnel_closed(self, worker_slot: int, url: str) -> None:
        self.q[self._cell(worker_slot, self.server_id(url)) + TUNNELS] -= 1

    def server_counters(self, url: str) -> dict:
        """Counters of ``url`` summed over worker slots (zeros for an unknown server)."""
        try:
            sid = self.server_id(url)
        except KeyError:
            return dict.fromkeys(FIELDS, 0)
        base = self.off_counters + sid * self.max_workers * NFIELDS
        end = base + self.max_workers * NFIELDS
        return {name: sum(self.q[base + f:end:NFIELDS]) for f, name in enumerate(FIELDS)}

    def reset_worker_slot(self, worker_slot: int) -> None:
        """Master: a worker in this slot died; its connections and tunnels are gone."""
        for sid in range(self.q[12]):
            cell = self._cell(worker_slot, sid)
            self.q[cell + ACTIVE] = 0
            self.q[cell + TUNNELS] = 0
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_CONNECTIONS] = 0

    # -- worker table -------------------------------------------------------------------

    def worker_started(self, worker_slot: int, pid: int, generation: int) -> None:
        """Master (after fork) or the worker itself: claim ``worker_slot``."""
        if not 0 <= worker_slot < self.max_workers:
            raise MplbError(f"worker slot {worker_slot} outside 0..{self.max_workers - 1}")
        w = self.off_workers + worker_slot * WORKER_WORDS
        self.q[w + W_PID] = pid
        self.q[w + W_GENERATION] = generation
        self.q[w + W_CONNECTIONS] = 0
        self.q[w + W_STARTED] = int(time.time() * 1e6)
        if worker_slot + 1 > self.q[13]:
            self.q[13] = worker_slot + 1

    def worker_stopped(self, worker_slot: int) -> None:
        """Master, when reaping: free the slot and forget its live counts."""
        self.reset_worker_slot(worker_slot)
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_PID] = 0

    def worker_connections(self, worker_slot: int, delta: int) -> None:
        """Worker: client connections opened (+1) / closed (-1)."""
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_CONNECTIONS] += delta

    def workers(self) -> list:
        out = []
        for slot in range(self.q[13]):
            w = self.off_workers + slot * WORKER_WORDS
            if self.q[w + W_PID]:
                out.append({"slot": slot, "pid": self.q[w + W_PID],
                            "generation": self.q[w + W_GENERATION],
                            "connections": self.q[w + W_CONNECTIONS],
                            "requests": self.q[w + W_REQUESTS],
                            "started": self.q[w + W_STARTED] / 1e6})
        return out

    # -- health: passive failures (striped lock) and active checks (single writer) -----

    def _health(self, sid: int) -> int:
        return self.off_health + sid * HEALTH_WORDS

    def is_failed(self, sid: int, now: float, max_fails: int, fail_timeout: float) -> bool:
        h = self._health(sid)
        fails, last = self.q[h + H_FAILS], self.q[h + H_LAST_FAIL]
        return bool(max_fails) and fails >= max_fails and now_us(now) - last < fail_timeout * 1e6

    def record_failure(self, worker_slot, sid, now, max_fails, fail_timeout) -> None:
        """Count a failure; ``max_fails`` failures within ``fail_timeout`` fail the server."""
        self.q[self._cell(worker_slot, sid) + FAILURES] += 1
        if not max_fails:
            return
        h, t = self._health(sid), now_us(now)
        with self._locked(LOCK_HEALTH + sid % STRIPES):
            if t - self.q[h + H_LAST_FAIL] >= fail_timeout * 1e6:
                self.q[h + H_FAILS] = 0
            self.q[h + H_FAILS] += 1
            self.q[h + H_LAST_FAIL] = t

    def record_success(self, sid, now, max_fails, fail_timeout) -> None:
        """nginx: a success resets the failure count unless the server is still failed."""
        h = self._health(sid)
        if not self.q[h + H_FAILS]:
            return                                  # lock-free common case
        with self._locked(LOCK_HEALTH + sid % STRIPES):
            fails = self.q[h + H_FAILS]
            if fails < max_fails or now_us(now) - self.q[h + H_LAST_FAIL] >= fail_timeout * 1e6:
                self.q[h + H_FAILS] = 0

    def health_down(self, sid: int) -> bool:
        return self.q[self._health(sid) + H_DOWN] != 0

    def set_health(self, sid: int, up: bool) -> None:
        """Health checker (single writer, in the master)."""
        self.q[self._health(sid) + H_DOWN] = 0 if up else 1

    def health_record(self, sid: int) -> list:
        h = self._health(sid)
        return list(self.q[h:h + HEALTH_WORDS])

    def set_health_record(self, sid: int, fails: int, passes: int, checked: float) -> None:
        h = self._health(sid)
        self.q[h + H_CHECK_FAILS] = fails
        self.q[h + H_CHECK_PASSES] = passes
        self.q[h + H_LAST_CHECK] = now_us(checked)

    def server_state(self, url: str, server=None, now: float = None) -> str:
        """'down' (configured or health check), 'failed' (passive), 'backup' or 'up'."""
        sid = self.server_id(url)
        now = time.monotonic() if now is None else now
        if (server is not None and server.down) or self.health_down(sid):
            return "down"
        if server is not None and self.is_failed(sid, now, server.max_fails, server.fail_timeout):
            return "failed"
        return "backup" if server is not None and server.backup else "up"

    # -- persistence tables -------------------------------------------------------------

    def table(self, name: str, capacity: int, ttl: float) -> ShmTable:
        """The table called ``name``, allocated from the pool on first use (by anyone)."""
        table = self._tables.get(name)
        if table is not None:
            table.ttl_us = int(ttl * 1e6)
            return table
        raw = name.encode()[:TABLE_NAME_MAX]
        k1, k2 = digest_words(raw, b"mplb-table")
        capacity = max(GROUP, -(-capacity // GROUP) * GROUP)
        found = self._find_table(k1, k2)
        if found is None:
            if not self.writable:
                raise KeyError(name)
            with self._locked(LOCK_GLOBAL):
                found = self._find_table(k1, k2) or self._alloc_table(k1, k2, raw, capacity)
        index, start, cap = found
        if self.writable:
            self.q[self.off_tables + index * TABLE_DIR_BYTES // 8 + 4] = int(ttl * 1e6)
        table = ShmTable(self.q, self.off_pool + start * ENTRY_WORDS, cap, int(ttl * 1e6),
                         self.salt, self.locks, stripe_seed=index * 31, name=name)
        self._tables[name] = table
        return table

    def _find_table(self, k1, k2):
        for i in range(self.max_tables):
            d = self.off_tables + i * TABLE_DIR_BYTES // 8
            if self.q[d] == k1 and self.q[d + 1] == k2:
                return i, self.q[d + 2], self.q[d + 3]
        return None

    def _alloc_table(self, k1, k2, raw, capacity):
        used = self.q[11]
        if used + capacity > self.q[10]:
            raise MplbError(f"shared memory table pool exhausted "
                            f"({used}+{capacity} > {self.q[10]})")
        for i in range(self.max_tables):
            d = self.off_tables + i * TABLE_DIR_BYTES // 8
            if self.q[d] == 0 and self.q[d + 1] == 0:
                self.q[d + 2], self.q[d + 3] = used, capacity
                start = d * 8 + 64
                self.view[start:start + len(raw)] = raw
                self.q[11] = used + capacity
                self.q[d + 1] = k2
                self.q[d] = k1                      # published last: a finder sees all
                return i, used, capacity
        raise MplbError(f"shared memory table directory full ({self.max_tables} tables)")

    def tables(self, now: float = None) -> dict:
        """name -> {capacity, entries} for every allocated table (statistics)."""
        now = time.monotonic() if now is None else now
        out = {}
        for i in range(self.max_tables):
            d = self.off_tables + i * TABLE_DIR_BYTES // 8
            if self.q[d] == 0 and self.q[d + 1] == 0:
                continue
            start = d * 8 + 64
            name = bytes(self.view[start:start + TABLE_NAME_MAX]).rstrip(b"\0").decode()
            cap = self.q[d + 3]
            table = ShmTable(self.q, self.off_pool + self.q[d + 2] * ENTRY_WORDS, cap,
                             self.q[d + 4], self.salt, self.locks)
            out[name] = {"capacity": cap, "entries": table.count(now)}
        return out


class _Held:
    """Context manager for one stripe lock."""

    __slots__ = ("locks", "offset")

    def __init__(self, locks, offset):
        self.locks, self.offset = locks, offset

    def __enter__(self):
        self.locks.acquire(self.offset)

    def __exit__(self, *exc):
        self.locks.release(self.offset)
