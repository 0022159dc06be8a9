"""The shared-memory segment: one file /dev/shm/mplb.<masterpid>, a fixed versioned layout.

Why a file: the master creates it before the first fork (MAP_SHARED survives fork, so every
worker sees the same pages) and tools (mplb-stats) can map it read-only by name.  The master
removes it on exit (``unlink``).  Secrets (the cookie key, the hash salt) are never in the
file: they live in the master's memory and reach the workers through fork.

Layout (little-endian; every field an 8-byte int64 "word"; names from the tables below)::

    header    512 bytes: HEADER_FIELDS, one word each, then SECTIONS' byte offsets
    servers   max_servers x 272 B: url length (0 = free entry), then the url (<= 264 B)
    counters  max_servers x max_workers x 8 words: COUNTER_FIELDS; a (server, worker)
              cell is written only by that worker (the master zeroes active/tunnels of a
              dead worker's slot)
    health    max_servers x 8 words: HEALTH_FIELDS
    workers   max_workers x 8 words: WORKER_FIELDS
    tables    max_tables x 128 B: TABLE_FIELDS, then the name (<= 64 bytes) at byte 64
    pool      table entries of 5 words (mplb.shmtable): seq, key digest (2 w), value,
              last used (monotonic us)
    upstreams max_upstreams x 8 words: UPSTREAM_FIELDS (name digest 0, 0 = free entry)

Space is reserved by the master alone, before it forks a generation that needs it
(``server_id``, ``table`` and ``upstream_word`` with ``allocating``); workers only look
up what was reserved for them.  Whatever no running generation uses any more (servers,
with their counters and health; tables; upstream words) is given back by ``reclaim``,
which the master calls once the last worker that could use it has exited, so reloads
can repeat without bound.  A freed table's pages are returned to the system.

Concurrency scheme:
- Counters: single writer per (server, worker) slot, no locks.  Aligned 8-byte stores are
  not torn on x86-64, so readers summing the slots see each word whole (the sum is a
  snapshot up to a few in-flight increments, which is all least_connections needs).
- Shared read-modify-write (passive failures, table inserts) is serialised by striped
  locks: fcntl byte-range locks (``lockf``) on bytes of the segment file, one byte per
  stripe.  They are released by the kernel if the holder dies, never spin, and are held
  only for a few memory operations with nothing that can yield to another greenlet in
  between.  Caveats: POSIX record locks belong to a process (threads of one process do
  not exclude each other; only the master runs threads and its health threads never
  take locks) and closing *any* descriptor of this file in a process drops that
  process's locks, so never open a second descriptor to it in a worker.
- Directory entries are published last (the url length, the name digest) and
  unpublished first, so a concurrent reader finds a whole entry or none.
- Upstream rotation words are racy read-then-store counters: two workers picking in the
  same instant may take the same turn, which only nudges the rotation.
- Tables (mplb.shmtable): writers hold the group's stripe lock, readers use a per-entry
  seqlock; the table module's docstring describes the scheme.
- Hot path (mplb.balancing): a balancer resolves every word offset it needs once, at
  init (``counter_word``, ``health_word``, ``active_words``, ``upstream_word``), and then
  reads and writes ``q`` directly: a pick is a handful of aligned loads and one store.
"""
from __future__ import annotations

import mmap
import os
import struct
import time

from mplb.errors import MplbError
from mplb.shmtable import (ENTRY_WORDS, GROUP, LOCK_HEALTH,  # noqa: F401
                           LOCK_TABLE, STRIPES, TOUCH_US, ShmTable, StripeLocks, digest_words)

MAGIC = b"MPLBSHM2"
VERSION = 2
HEADER_BYTES = 512

# The header, word by word: the one place that names these fields.
HEADER_FIELDS = ("magic", "version", "total_size", "master_pid", "generation", "reloads",
                 "start_time_us", "max_workers", "max_servers", "max_tables", "pool_entries",
                 "pool_used", "servers_high", "slots_high", "max_upstreams", "servers_used")
(HDR_MAGIC, HDR_VERSION, HDR_SIZE, HDR_MASTER_PID, HDR_GENERATION, HDR_RELOADS,
 HDR_STARTED, HDR_MAX_WORKERS, HDR_MAX_SERVERS, HDR_MAX_TABLES, HDR_POOL_ENTRIES,
 HDR_POOL_USED, HDR_SERVERS_HIGH, HDR_SLOTS_USED, HDR_MAX_UPSTREAMS,
 HDR_SERVERS_USED) = range(len(HEADER_FIELDS))
# Byte offsets of the sections, in this order, from header word HDR_OFFSETS on.
SECTIONS = ("servers", "counters", "health", "workers", "tables", "pool", "upstreams")
HDR_OFFSETS = 16

URL_ENTRY_BYTES = 272
URL_MAX = URL_ENTRY_BYTES - 8

COUNTER_FIELDS = ("active", "tunnels", "requests", "failures", "bytes_in", "bytes_out")
FIELDS = COUNTER_FIELDS
ACTIVE, TUNNELS, REQUESTS, FAILURES, BYTES_IN, BYTES_OUT = range(len(COUNTER_FIELDS))
NFIELDS = 8                      # words per (server, worker) cell: the fields + 2 spare

HEALTH_FIELDS = ("passive_fails", "last_fail_us", "check_down", "check_fails",
                 "check_passes", "last_check_us")
H_FAILS, H_LAST_FAIL, H_DOWN, H_CHECK_FAILS, H_CHECK_PASSES, H_LAST_CHECK = \
    range(len(HEALTH_FIELDS))
HEALTH_WORDS = 8

WORKER_FIELDS = ("pid", "generation", "connections", "requests", "started_us")
W_PID, W_GENERATION, W_CONNECTIONS, W_REQUESTS, W_STARTED = range(len(WORKER_FIELDS))
WORKER_WORDS = 8

TABLE_FIELDS = ("name_digest_1", "name_digest_2", "first_entry", "capacity", "ttl_us")
T_K1, T_K2, T_START, T_CAPACITY, T_TTL = range(len(TABLE_FIELDS))
TABLE_DIR_BYTES = 128
TABLE_NAME_AT = 64
TABLE_NAME_MAX = 64

UPSTREAM_FIELDS = ("name_digest_1", "name_digest_2", "rotation")
U_K1, U_K2, U_ROTATION = range(len(UPSTREAM_FIELDS))
UPSTREAM_WORDS = 8


def segment_path(master_pid: int, directory: str = "/dev/shm") -> str:
    """The segment of a master: the pid is a separate dot-delimited number."""
    return os.path.join(directory, f"mplb.{int(master_pid)}")


def now_us(clock_value: float) -> int:
    return int(clock_value * 1_000_000)


def segment_layout(max_workers, max_servers, table_entries, max_tables,
                   max_upstreams=None) -> tuple:
    """(header bytes, total size) of a segment with these capacities."""
    max_upstreams = max_servers if max_upstreams is None else max_upstreams
    table_entries = max(GROUP, -(-table_entries // GROUP) * GROUP)
    sizes = [HEADER_BYTES, max_servers * URL_ENTRY_BYTES,
             max_servers * max_workers * NFIELDS * 8, max_servers * HEALTH_WORDS * 8,
             max_workers * WORKER_WORDS * 8, max_tables * TABLE_DIR_BYTES,
             table_entries * ENTRY_WORDS * 8, max_upstreams * UPSTREAM_WORDS * 8]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = -(-sum(sizes) // mmap.PAGESIZE) * mmap.PAGESIZE
    header = [0] * len(HEADER_FIELDS)
    header[HDR_VERSION] = VERSION
    header[HDR_SIZE] = total
    header[HDR_MASTER_PID] = os.getpid()
    header[HDR_STARTED] = int(time.time() * 1e6)
    header[HDR_MAX_WORKERS] = max_workers
    header[HDR_MAX_SERVERS] = max_servers
    header[HDR_MAX_TABLES] = max_tables
    header[HDR_POOL_ENTRIES] = table_entries
    header[HDR_MAX_UPSTREAMS] = max_upstreams
    raw = bytearray(HEADER_BYTES)
    struct.pack_into(f"<8s{len(HEADER_FIELDS) - 1}q", raw, 0, MAGIC, *header[1:])
    struct.pack_into(f"<{len(SECTIONS)}q", raw, HDR_OFFSETS * 8, *offsets[1:])
    return bytes(raw), total


class SharedState:
    """Typed views over the segment; the same object serves master, workers and tools."""

    def __init__(self, path, fd, mm, writable, salt=None, secret=None):
        self.path = path
        self.fd = fd
        self.mm = mm
        self.writable = writable
        self.allocating = False        # the master: may reserve and reclaim space
        self.view = memoryview(mm)
        self.q = self.view.cast("q")
        self._sids = {}
        self._tables = {}
        self._upstreams = {}
        q = self.q
        if bytes(self.view[:8]) != MAGIC or q[HDR_VERSION] != VERSION:
            self.close()
            raise MplbError(f"{path}: not an mplb shared memory segment of version {VERSION}")
        self.max_workers = q[HDR_MAX_WORKERS]
        self.max_servers = q[HDR_MAX_SERVERS]
        self.max_tables = q[HDR_MAX_TABLES]
        self.max_upstreams = q[HDR_MAX_UPSTREAMS]
        (self.off_servers, self.off_counters, self.off_health, self.off_workers,
         self.off_tables, self.off_pool, self.off_upstreams) = (
            q[HDR_OFFSETS + i] // 8 for i in range(len(SECTIONS)))
        # Process memory only: forked workers inherit them, readers of the file never
        # see them (a reader could otherwise forge cookies or aim at table groups).
        self.salt = salt
        self.secret = secret
        self.locks = StripeLocks(fd if writable else None)

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, max_workers: int, max_servers: int = 1024,
               table_entries: int = 65536 * 2, max_tables: int = 64,
               max_upstreams: int = None) -> "SharedState":
        """Master, before the first fork: make and initialise the segment file."""
        header, total = segment_layout(max_workers, max_servers, table_entries, max_tables,
                                       max_upstreams)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        mm[:len(header)] = header
        state = cls(path, fd, mm, True, salt=os.urandom(16), secret=os.urandom(32))
        state.allocating = True
        return state

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

    master_pid = property(lambda self: self.q[HDR_MASTER_PID])
    generation = property(lambda self: self.q[HDR_GENERATION])
    reloads = property(lambda self: self.q[HDR_RELOADS])
    start_time = property(lambda self: self.q[HDR_STARTED] / 1e6)
    servers_registered = property(lambda self: self.q[HDR_SERVERS_USED])
    slots_used = property(lambda self: self.q[HDR_SLOTS_USED])

    def set_generation(self, generation: int) -> None:
        self.q[HDR_GENERATION] = generation

    def count_reload(self) -> None:
        self.q[HDR_RELOADS] += 1

    def _locked(self, offset):
        return _Held(self.locks, offset)

    def _reserve_check(self, what: str) -> None:
        if not self.writable:
            raise KeyError(what)
        if not self.allocating:
            raise MplbError(f"{what} was not reserved in shared memory by the master")

    def usage(self) -> dict:
        """What the segment holds now against its capacity (statistics, the soak run)."""
        return {"bytes": self.q[HDR_SIZE],
                "servers_used": self.q[HDR_SERVERS_USED], "servers_max": self.max_servers,
                "tables_used": sum(1 for _ in self._table_entries()),
                "tables_max": self.max_tables,
                "table_entries_used": self.q[HDR_POOL_USED],
                "table_entries_max": self.q[HDR_POOL_ENTRIES],
                "upstreams_used": sum(1 for _ in self._upstream_entries()),
                "upstreams_max": self.max_upstreams}

    # -- server directory ---------------------------------------------------------------

    def _url_entry(self, sid: int) -> int:
        """Byte offset of the directory entry of ``sid``."""
        return self.off_servers * 8 + sid * URL_ENTRY_BYTES

    def server_id(self, url: str) -> int:
        """Slot of ``url`` in the directory (cached per process); the master reserves it
        if new, anyone else only finds it."""
        sid = self._sids.get(url)
        if sid is not None:
            return sid
        raw = url.encode()
        if len(raw) > URL_MAX:
            raise MplbError(f"server URL too long for shared memory: {url[:80]}...")
        sid = self._find_server(raw)
        if sid is None:
            self._reserve_check(url)
            sid = self._add_server(raw)
        self._sids[url] = sid
        return sid

    def _find_server(self, raw: bytes):
        q, view = self.q, self.view
        for sid in range(q[HDR_SERVERS_HIGH]):
            start = self._url_entry(sid)
            n = q[start // 8]
            if n == len(raw) and view[start + 8:start + 8 + n] == raw:
                return sid
        return None

    def _add_server(self, raw: bytes) -> int:
        """Master: the first free directory entry, with clean counters and health."""
        q = self.q
        high = q[HDR_SERVERS_HIGH]
        sid = next((s for s in range(high) if not q[self._url_entry(s) // 8]), high)
        if sid >= self.max_servers:
            raise MplbError(f"shared memory server directory full ({self.max_servers} servers "
                            f"in use by running generations)")
        self._clear_server(sid)
        start = self._url_entry(sid)
        self.view[start + 8:start + 8 + len(raw)] = raw
        q[start // 8] = len(raw)                   # published last: a finder sees all
        if sid == high:
            q[HDR_SERVERS_HIGH] = high + 1
        q[HDR_SERVERS_USED] += 1
        return sid

    def _clear_server(self, sid: int) -> None:
        """Zero every counter cell and the health record of ``sid``."""
        q = self.q
        base = self.off_counters + sid * self.max_workers * NFIELDS
        q[base:base + self.max_workers * NFIELDS] = _zeros(self.max_workers * NFIELDS)
        h = self._health(sid)
        q[h:h + HEALTH_WORDS] = _zeros(HEALTH_WORDS)

    def _server_entries(self):
        """(sid, url) of every server in the directory."""
        q, view = self.q, self.view
        for sid in range(q[HDR_SERVERS_HIGH]):
            start = self._url_entry(sid)
            n = q[start // 8]
            if n:
                yield sid, bytes(view[start + 8:start + 8 + n]).decode()

    def server_urls(self) -> list:
        return [url for _, url in self._server_entries()]

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

    def add_active(self, worker_slot: int, sid: int, delta: int) -> None:
        self.q[self._cell(worker_slot, sid) + ACTIVE] += delta

    def active_total(self, sid: int) -> int:
        base = self.off_counters + sid * self.max_workers * NFIELDS
        return sum(self.q[base:base + self.q[HDR_SLOTS_USED] * NFIELDS:NFIELDS])

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
        except (KeyError, MplbError):
            return dict.fromkeys(COUNTER_FIELDS, 0)
        base = self.off_counters + sid * self.max_workers * NFIELDS
        end = base + self.max_workers * NFIELDS
        return {name: sum(self.q[base + f:end:NFIELDS]) for f, name in enumerate(COUNTER_FIELDS)}

    def reset_worker_slot(self, worker_slot: int) -> None:
        """Master: a worker in this slot died; its connections and tunnels are gone."""
        if not 0 <= worker_slot < self.max_workers:
            raise MplbError(f"worker slot {worker_slot} outside 0..{self.max_workers - 1}")
        for sid in range(self.q[HDR_SERVERS_HIGH]):
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
        if worker_slot + 1 > self.q[HDR_SLOTS_USED]:
            self.q[HDR_SLOTS_USED] = worker_slot + 1

    def worker_stopped(self, worker_slot: int) -> None:
        """Master, when reaping: free the slot and forget its live counts."""
        self.reset_worker_slot(worker_slot)
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_PID] = 0

    def worker_connections(self, worker_slot: int, delta: int) -> None:
        """Worker: client connections opened (+1) / closed (-1)."""
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_CONNECTIONS] += delta

    def workers(self) -> list:
        out = []
        for slot in range(self.q[HDR_SLOTS_USED]):
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

    def _table_dir(self, index: int) -> int:
        return self.off_tables + index * TABLE_DIR_BYTES // 8

    def table(self, name: str, capacity: int, ttl: float) -> ShmTable:
        """The table called ``name``: reserved by the master, found by the workers."""
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
                         self.salt, self.locks, stripe_seed=index * 31, name=name)
        self._tables[name] = table
        return table

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
        q[first:first + capacity * ENTRY_WORDS] = _zeros(capacity * ENTRY_WORDS)
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
                q[e:e + UPSTREAM_WORDS] = _zeros(UPSTREAM_WORDS)
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


def _zeros(words: int) -> memoryview:
    return memoryview(bytes(words * 8)).cast("q")


class _Held:
    """Context manager for one stripe lock."""

    __slots__ = ("locks", "offset")

    def __init__(self, locks, offset):
        self.locks, self.offset = locks, offset

    def __enter__(self):
        self.locks.acquire(self.offset)

    def __exit__(self, *exc):
        self.locks.release(self.offset)
