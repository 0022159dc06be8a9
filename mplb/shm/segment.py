"""SharedState: typed views over the shared segment (mplb.shm.layout names its fields).

Why a file: the master creates it before the first fork (MAP_SHARED survives fork, so every
worker sees the same pages) and tools (mplb-stats) can map it read-only by name.  The master
removes it on exit (``unlink``); the next master removes it if this one was killed
(mplb.shm.liveness).  Secrets (the cookie key, the hash salt) are never in the file: they
live in the master's memory and reach the workers through fork.  The file is the
creator's, mode 0600: workers use the descriptor and mapping they inherit, so only the
master's user (root, as a rule) can open it, not the user the workers run as.

This module holds the segment's life cycle, its header, the server directory, the
counters, the worker table and health; mplb.shm.space adds the reservable space
(tables, upstream words) and reclaiming.
"""
from __future__ import annotations

import mmap
import os
import time

from mplb.errors import MplbError
from mplb.shm.layout import (
    ACTIVE, BYTES_IN, BYTES_OUT, COUNTER_FIELDS, FAILURES, H_DOWN, H_CHECK_FAILS,
    H_CHECK_PASSES, H_FAILS, H_LAST_CHECK, H_LAST_FAIL, H_REMOTE, HDR_GENERATION,
    HDR_MASTER_PID, HDR_MAX_SERVERS, HDR_MAX_TABLES, HDR_MAX_UPSTREAMS, HDR_MAX_WORKERS,
    HDR_OFFSETS, HDR_POOL_ENTRIES, HDR_POOL_USED, HDR_RELOADS, HDR_SERVERS_HIGH,
    HDR_SERVERS_USED, HDR_SIZE, HDR_SLOTS_USED, HDR_STARTED, HDR_STORE_DROPPED,
    HDR_STORE_INSTANCES, HDR_STORE_STATE, HDR_VERSION, HEALTH_WORDS, MAGIC, NFIELDS,
    REQUESTS, SECTIONS, TUNNELS, URL_ENTRY_BYTES, URL_MAX, VERSION, W_CONNECTIONS,
    W_GENERATION, W_PID, W_REQUESTS, W_STARTED, W_STORE_DROPPED, WORKER_WORDS, now_us,
    segment_layout, zeros)
from mplb.shm import liveness
from mplb.shm.space import Reservations
from mplb.shm.tables import LOCK_HEALTH, STRIPES, StripeLocks
from mplb.shm.timing import Timings


class SharedState(Reservations, Timings):
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
        self._last_buckets = {}        # master: sid -> response buckets at the last sample
        q = self.q
        if bytes(self.view[:8]) != MAGIC or q[HDR_VERSION] != VERSION:
            self.close()
            raise MplbError(f"{path}: not an mplb shared memory segment of version {VERSION}")
        self.max_workers = q[HDR_MAX_WORKERS]
        self.max_servers = q[HDR_MAX_SERVERS]
        self.max_tables = q[HDR_MAX_TABLES]
        self.max_upstreams = q[HDR_MAX_UPSTREAMS]
        (self.off_servers, self.off_counters, self.off_health, self.off_workers,
         self.off_tables, self.off_pool, self.off_upstreams, self.off_histograms,
         self.off_samples) = (q[HDR_OFFSETS + i] // 8 for i in range(len(SECTIONS)))
        # Process memory only: forked workers inherit them, readers of the file never
        # see them (a reader could otherwise forge cookies or aim at table groups).
        self.salt = salt
        self.secret = secret
        self.locks = StripeLocks(fd if writable else None)
        # Set in a worker that has a shared_store: announce(table, key, sid, first)
        # tells the master of a new table entry, without blocking (mplb.control).
        self.announce = None

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, max_workers: int, max_servers: int = 1024,
               table_entries: int = 65536 * 2, max_tables: int = 64,
               max_upstreams: int = None) -> "SharedState":
        """Master, before the first fork: make and initialise the segment file."""
        header, total = segment_layout(max_workers, max_servers, table_entries, max_tables,
                                       max_upstreams)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            liveness.hold(fd)                # before the header: a live file is locked
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

    store_state = property(lambda self: self.q[HDR_STORE_STATE])
    store_instances = property(lambda self: self.q[HDR_STORE_INSTANCES])
    store_dropped = property(lambda self: self.q[HDR_STORE_DROPPED])

    def set_store(self, state: int, instances: int = 0) -> None:
        """The master's store thread: the link's state (layout STORE_*) and how many
        instances share the store, for the status page of every worker."""
        self.q[HDR_STORE_INSTANCES] = instances
        self.q[HDR_STORE_STATE] = state

    def count_store_dropped(self, n: int = 1) -> None:
        """Master: table entries that could not be handed to the store (queue full)."""
        self.q[HDR_STORE_DROPPED] += n

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
        """Zero every counter cell, the health record, histograms and samples of ``sid``."""
        q = self.q
        base = self.off_counters + sid * self.max_workers * NFIELDS
        q[base:base + self.max_workers * NFIELDS] = zeros(self.max_workers * NFIELDS)
        h = self._health(sid)
        q[h:h + HEALTH_WORDS] = zeros(HEALTH_WORDS)
        self._clear_timings(sid)

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
        out, its own request count and the first response-time bucket (computed once,
        so the hot path only adds)."""
        cell = self._cell(worker_slot, self.server_id(url))
        return (cell + REQUESTS, cell + BYTES_IN, cell + BYTES_OUT,
                self.off_workers + worker_slot * WORKER_WORDS + W_REQUESTS,
                self.histogram_word(worker_slot, url, "response"))

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
        self.q[w + W_STORE_DROPPED] = 0
        self.q[w + W_STARTED] = int(time.time() * 1e6)
        if worker_slot + 1 > self.q[HDR_SLOTS_USED]:
            self.q[HDR_SLOTS_USED] = worker_slot + 1

    def worker_stopped(self, worker_slot: int) -> None:
        """Master, when reaping: free the slot and forget its live counts."""
        self.reset_worker_slot(worker_slot)
        self.q[self.off_workers + worker_slot * WORKER_WORDS + W_PID] = 0

    def worker_word(self, worker_slot: int, field: int) -> int:
        """Index in ``q`` of one word of a worker's record (W_* fields)."""
        return self.off_workers + worker_slot * WORKER_WORDS + field

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
                            "started": self.q[w + W_STARTED] / 1e6,
                            "store_dropped": self.q[w + W_STORE_DROPPED]})
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

    def remote_active(self, sid: int) -> int:
        """Active connections the other instances of a cluster hold on ``sid``."""
        return self.q[self._health(sid) + H_REMOTE]

    def set_remote_active(self, sid: int, count: int) -> None:
        """The master's store thread (single writer)."""
        self.q[self._health(sid) + H_REMOTE] = count

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



class _Held:
    """Context manager for one stripe lock."""

    __slots__ = ("locks", "offset")

    def __init__(self, locks, offset):
        self.locks, self.offset = locks, offset

    def __enter__(self):
        self.locks.acquire(self.offset)

    def __exit__(self, *exc):
        self.locks.release(self.offset)

