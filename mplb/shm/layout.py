"""The shared segment's layout: every field named once, and the concurrency scheme.

The segment is one file /dev/shm/mplb.<masterpid> with a fixed, versioned layout.
mplb.shm.segment reads and writes it; mplb-stats maps it read-only.

Layout (little-endian; every field an 8-byte int64 "word"; names from the tables below)::

    header    512 bytes: HEADER_FIELDS, one word each, then (from word HDR_OFFSETS)
              SECTIONS' byte offsets
    servers   max_servers x 272 B: url length (0 = free entry), then the url (<= 264 B)
    counters  max_servers x max_workers x 8 words: COUNTER_FIELDS; a (server, worker)
              cell is written only by that worker (the master zeroes active/tunnels of a
              dead worker's slot)
    health    max_servers x 8 words: HEALTH_FIELDS
    workers   max_workers x 8 words: WORKER_FIELDS
    tables    max_tables x 128 B: TABLE_FIELDS, then the name (<= 64 bytes) at byte 64
    pool      table entries of 5 words (mplb.shm.tables): seq, key digest (2 w), value,
              last used (monotonic us)
    upstreams max_upstreams x 8 words: UPSTREAM_FIELDS (name digest 0, 0 = free entry)
    histograms max_servers x max_workers x 32 words: HISTOGRAMS, bucket counts then the
              sum in microseconds; a (server, worker) cell is written only by that worker
    samples   RING_SAMPLES words of sample times (wall clock, us), then max_servers x
              RING_SAMPLES x SAMPLE_FIELDS words: the master's once-a-second ring

Space is reserved by the master alone, before it forks a generation that needs it
(``server_id``, ``table`` and ``upstream_word`` with ``allocating``, mplb.shm.space);
workers only look up what was reserved for them.  Whatever no running generation uses any more (servers,
with their counters and health; tables; upstream words) is given back by ``reclaim``,
which the master calls once the last worker that could use it has exited, so reloads
can repeat without bound.  A freed table's pages are returned to the system.

Concurrency scheme:
- Histograms: like counters, one writer per (server, worker) cell; an observation is
  one bucket word and the sum word.  Buckets are stored per bucket (not cumulative)
  and readers add up the cumulative ``le`` counts, so ``_count`` always equals the
  ``+Inf`` bucket.
- Samples: the master alone writes the ring (mplb.shm.timing): a sample's words, then its
  time, then the header's sample count; readers skip the oldest slot, the one the next
  sample overwrites.
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
- Tables (mplb.shm.tables): writers hold the group's stripe lock, readers use a per-entry
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

from mplb.shm.tables import ENTRY_WORDS, GROUP

MAGIC = b"MPLBSHM3"
VERSION = 4                      # 4: store words, histograms and samples, the liveness lock
HEADER_BYTES = 512

# The header, word by word: the one place that names these fields.
HEADER_FIELDS = ("magic", "version", "total_size", "master_pid", "generation", "reloads",
                 "start_time_us", "max_workers", "max_servers", "max_tables", "pool_entries",
                 "pool_used", "servers_high", "slots_high", "max_upstreams", "servers_used",
                 "store_state", "store_instances", "store_dropped", "samples_taken")
(HDR_MAGIC, HDR_VERSION, HDR_SIZE, HDR_MASTER_PID, HDR_GENERATION, HDR_RELOADS,
 HDR_STARTED, HDR_MAX_WORKERS, HDR_MAX_SERVERS, HDR_MAX_TABLES, HDR_POOL_ENTRIES,
 HDR_POOL_USED, HDR_SERVERS_HIGH, HDR_SLOTS_USED, HDR_MAX_UPSTREAMS,
 HDR_SERVERS_USED, HDR_STORE_STATE, HDR_STORE_INSTANCES,
 HDR_STORE_DROPPED, HDR_SAMPLES_TAKEN) = range(len(HEADER_FIELDS))
# store_state (written by the master's store thread alone): no store, or its link.
STORE_NONE, STORE_OK, STORE_DEGRADED = 0, 1, 2
# Byte offsets of the sections, in this order, from header word HDR_OFFSETS on.
SECTIONS = ("servers", "counters", "health", "workers", "tables", "pool", "upstreams",
            "histograms", "samples")
HDR_OFFSETS = 32
assert len(HEADER_FIELDS) <= HDR_OFFSETS and (HDR_OFFSETS + len(SECTIONS)) * 8 <= 512

URL_ENTRY_BYTES = 272
URL_MAX = URL_ENTRY_BYTES - 8

COUNTER_FIELDS = ("active", "tunnels", "requests", "failures", "bytes_in", "bytes_out")
FIELDS = COUNTER_FIELDS
ACTIVE, TUNNELS, REQUESTS, FAILURES, BYTES_IN, BYTES_OUT = range(len(COUNTER_FIELDS))
NFIELDS = 8                      # words per (server, worker) cell: the fields + 2 spare

# remote_active: active connections the *other* instances of a cluster hold on this
# server (summed from their published counts by the master's store thread, its only
# writer); least_connections adds it to the local live count.
HEALTH_FIELDS = ("passive_fails", "last_fail_us", "check_down", "check_fails",
                 "check_passes", "last_check_us", "remote_active")
H_FAILS, H_LAST_FAIL, H_DOWN, H_CHECK_FAILS, H_CHECK_PASSES, H_LAST_CHECK, H_REMOTE = \
    range(len(HEALTH_FIELDS))
HEALTH_WORDS = 8

# store_dropped: table entries the worker could not hand to its master (control socket
# full), counted by the worker itself.
WORKER_FIELDS = ("pid", "generation", "connections", "requests", "started_us",
                 "store_dropped")
W_PID, W_GENERATION, W_CONNECTIONS, W_REQUESTS, W_STARTED, W_STORE_DROPPED = \
    range(len(WORKER_FIELDS))
WORKER_WORDS = 8

TABLE_FIELDS = ("name_digest_1", "name_digest_2", "first_entry", "capacity", "ttl_us")
T_K1, T_K2, T_START, T_CAPACITY, T_TTL = range(len(TABLE_FIELDS))
TABLE_DIR_BYTES = 128
TABLE_NAME_AT = 64
TABLE_NAME_MAX = 64

UPSTREAM_FIELDS = ("name_digest_1", "name_digest_2", "rotation")
U_K1, U_K2, U_ROTATION = range(len(UPSTREAM_FIELDS))
UPSTREAM_WORDS = 8


# Histograms: le bounds in seconds (Prometheus style; +Inf is the last bucket).  Each
# takes len(bounds) + 1 bucket words, then one word: the sum of observations in us.
RESPONSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)
TUNNEL_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                  43200.0, 86400.0)
HISTOGRAMS = (("response", RESPONSE_BUCKETS), ("tunnel", TUNNEL_BUCKETS))
HIST_RESPONSE = 0                                   # word of the first response bucket
HIST_TUNNEL = len(RESPONSE_BUCKETS) + 2             # word of the first tunnel bucket
HIST_WORDS = 32                                     # words per (server, worker) cell

# The sample ring: one sample a second for five minutes, per server these words.
RING_SAMPLES = 300
# requests so far, open tunnels, p50 and p99 in microseconds plus one (0: no response)
SAMPLE_FIELDS = ("requests", "tunnels", "p50_us1", "p99_us1")
S_REQUESTS, S_TUNNELS, S_P50, S_P99 = range(len(SAMPLE_FIELDS))
SAMPLE_WORDS = len(SAMPLE_FIELDS)

assert HIST_TUNNEL + len(TUNNEL_BUCKETS) + 2 <= HIST_WORDS


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
             table_entries * ENTRY_WORDS * 8, max_upstreams * UPSTREAM_WORDS * 8,
             max_servers * max_workers * HIST_WORDS * 8,
             (RING_SAMPLES + max_servers * RING_SAMPLES * SAMPLE_WORDS) * 8]
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



def zeros(words: int) -> memoryview:
    """A run of zero words to assign over a slice of the segment."""
    return memoryview(bytes(words * 8)).cast("q")


