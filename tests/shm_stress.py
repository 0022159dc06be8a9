"""Several processes hammering shared tables so that writers collide on purpose.

Used by tests/test_shm.py.  ``python -m tests.shm_stress --interleave --no-locks`` (or
``--no-seqlock``) runs the same hammer with the table's protection switched off and prints
the violations it finds: the proof that the test can fail.

Three phases, each returning a list of violations (empty = pass):

- ``race_inserts``: a table of many groups; in round r every process inserts its own 4 keys
  into group r at the same moment (a shared-memory barrier starts each round), so the 16
  new keys exactly fill the group.  Afterwards each group must hold each of its 16 keys
  exactly once: two writers that picked the same empty entry lose a key, a writer that
  did not see another's insert duplicates one.
- ``churn``: a 2-group table, 24 keys per group (more than fit), every process putting and
  getting at random, so entries are evicted and rewritten constantly.  Every value carries
  a tag derived from its key: a get that returns a value tagged for another key is a torn
  or misattributed entry.  At the end no key may appear twice in a group, no entry may be
  left mid-write (odd seq) and every stored value must match its key.
- ``torn_reads``: one writer evicting constantly in one group, three readers: the seqlock's
  test (a reader without it returns a value written for another key).
"""
from __future__ import annotations

import mmap
import os
import random
import struct
import sys
import time

from mplb.shm.tables import ENTRY_WORDS, GROUP

PROCESSES = 4
TAG_MASK = ~0xFFFF


def keys_in_groups(table, groups: int, per_group: int) -> list:
    """``per_group`` keys hashing into each of the first ``groups`` groups of ``table``."""
    found = [[] for _ in range(groups)]
    missing = groups
    i = 0
    while missing:
        key = b"client-%d" % i
        i += 1
        g = table.digest(key)[2]
        if g < groups and len(found[g]) < per_group:
            found[g].append(key)
            if len(found[g]) == per_group:
                missing -= 1
    return found


def tagged(table, key: bytes, low: int) -> int:
    return (table.digest(key)[0] & TAG_MASK) | (low & 0xFFFF)


def tag_ok(table, key: bytes, value) -> bool:
    return value is None or value & TAG_MASK == table.digest(key)[0] & TAG_MASK


def run_children(body, processes=PROCESSES, timeout=60.0) -> list:
    """Fork ``processes`` children running ``body(worker) -> [violation, ...]``; gather."""
    pipes, pids = [], []
    for worker in range(processes):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                found = body(worker)
            except BaseException as exc:           # report, never hang the parent
                found = [f"worker {worker} crashed: {exc!r}"]
            os.write(write_end, "\n".join(found[:20]).encode() or b"")
            os._exit(0)
        os.close(write_end)
        pipes.append(read_end)
        pids.append(pid)
    violations = []
    deadline = time.monotonic() + timeout
    for pid, read_end in zip(pids, pipes):
        chunks = []
        while True:
            data = os.read(read_end, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(read_end)
        text = b"".join(chunks).decode()
        violations += [line for line in text.split("\n") if line]
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
            time.sleep(0.001)
    return violations


class Interleaving:
    """The segment's words, but every store gives the CPU away for a moment.

    Wrapped around the real shared memory of a real table (real locks, real seqlock), it
    makes another process run in the middle of almost every table update (and every
    third read), so races that
    a loaded 2-CPU machine would hit once in a thousand runs happen on every run.
    """

    def __init__(self, words, pause=20e-6, read_every=0, read_pause=20e-6):
        self.words = words
        self.pause = pause
        self.read_every = read_every
        self.read_pause = read_pause
        self.reads = 0

    def __getitem__(self, index):
        if self.read_every:
            self.reads += 1
            if self.reads % self.read_every == 0:      # readers get interrupted too
                time.sleep(self.read_pause)
        return self.words[index]

    def __setitem__(self, index, value):
        self.words[index] = value
        time.sleep(self.pause)


def interleaved(table, read_every=0, pause=20e-6):
    """The same table (same memory, locks and salt) seen through :class:`Interleaving`."""
    from mplb.shm.tables import ShmTable
    return ShmTable(Interleaving(table.q, pause, read_every), table.start, table.capacity,
                    table.ttl_us, table.salt, table.locks, stripe_seed=table.seed,
                    name=table.name)


class Barrier:
    """Single-writer-per-word barrier in anonymous shared memory (no atomics needed)."""

    def __init__(self, processes):
        self.mm = mmap.mmap(-1, 8 * processes)       # MAP_SHARED: inherited by children
        self.n = processes

    def wait(self, worker: int, round_no: int, timeout=10.0) -> None:
        struct.pack_into("<q", self.mm, worker * 8, round_no)
        deadline = time.monotonic() + timeout
        while min(struct.unpack_from(f"<{self.n}q", self.mm)) < round_no:
            if time.monotonic() > deadline:
                raise TimeoutError("barrier")
            os.sched_yield()


def race_inserts(table, rounds: int) -> list:
    """Phase 1: every round, all processes fill one group together."""
    groups = keys_in_groups(table, rounds, GROUP)
    barrier = Barrier(PROCESSES)
    share = GROUP // PROCESSES

    def body(worker):
        for r in range(rounds):
            barrier.wait(worker, r + 1)
            for key in groups[r][worker * share:(worker + 1) * share]:
                table.put(key, tagged(table, key, worker), 1.0)
        return []

    violations = run_children(body)
    for r, keys in enumerate(groups):
        stored = group_keys(table, table.digest(keys[0])[2])
        for key in keys:
            k = table.digest(key)[:2]
            count = stored.count(k)
            if count != 1:
                violations.append(f"round {r}: key {key!r} stored {count} times")
    return violations


def churn(table, ops: int, keys_per_group=24, groups=2) -> list:
    """Phase 2: constant eviction in two groups; every read and the end state checked."""
    keys = [k for group in keys_in_groups(table, groups, keys_per_group) for k in group]

    def body(worker):
        rng = random.Random(worker)
        found = []
        t = 10.0
        for i in range(ops):
            key = rng.choice(keys)
            t += 0.001
            if rng.random() < 0.6:
                table.put(key, tagged(table, key, worker << 8 | i & 0xFF), t)
            else:
                value = table.get(key, t)
                if not tag_ok(table, key, value):
                    found.append(f"worker {worker}: get({key!r}) returned another key's "
                                 f"value {value:#x}")
        return found

    violations = run_children(body)
    violations += check_structure(table, {table.digest(k)[:2]: k for k in keys})
    return violations


def torn_reads(table, reads: int) -> list:
    """Phase 3: one writer cycles 17 keys through one 16-entry group, so every put evicts
    the entry of the key written 16 puts earlier; 3 readers look keys up meanwhile.  A
    reader that is not protected by the seqlock returns an evicted key's slot holding
    the new key's value."""
    keys = keys_in_groups(table, 1, GROUP + 1)[0]
    barrier = Barrier(PROCESSES)
    done = mmap.mmap(-1, 8 * PROCESSES)                # one flag word per reader

    def body(worker):
        barrier.wait(worker, 1)
        rng = random.Random(worker)
        found = []
        if worker == 0:
            t = 10.0
            i = 0
            deadline = time.monotonic() + 60
            while sum(struct.unpack_from(f"<{PROCESSES}q", done)) < PROCESSES - 1 and \
                    time.monotonic() < deadline:
                key = keys[i % len(keys)]
                t += 0.001
                table.put(key, tagged(table, key, i), t)
                i += 1
            return found
        for _ in range(reads):
            key = rng.choice(keys)
            value = table.get(key, 20.0)
            if not tag_ok(table, key, value):
                found.append(f"reader {worker}: get({key!r}) returned another key's value")
        struct.pack_into("<q", done, 8 * worker, 1)
        return found

    violations = run_children(body)
    violations += check_structure(table, {table.digest(k)[:2]: k for k in keys})
    return violations


def group_keys(table, g: int) -> list:
    q = table.q
    base = table.start + g * GROUP * ENTRY_WORDS
    return [(q[off + 1], q[off + 2]) for off in range(base, base + GROUP * ENTRY_WORDS,
                                                      ENTRY_WORDS)]


def check_structure(table, known: dict) -> list:
    """No duplicate key in a group, no entry left mid-write, every value tagged for its key."""
    q = table.q
    out = []
    for g in range(table.groups):
        base = table.start + g * GROUP * ENTRY_WORDS
        seen = set()
        for off in range(base, base + GROUP * ENTRY_WORDS, ENTRY_WORDS):
            k = (q[off + 1], q[off + 2])
            if q[off] & 1:
                out.append(f"group {g}: entry left mid-write")
            if k == (0, 0):
                continue
            if k in seen:
                out.append(f"group {g}: key {known.get(k, k)!r} stored twice")
            seen.add(k)
            if k not in known:
                out.append(f"group {g}: entry with a key nobody wrote (torn key words)")
            elif q[off + 3] & TAG_MASK != k[0] & TAG_MASK:
                out.append(f"group {g}: key {known[k]!r} holds another key's value")
    return out


def disable_protection(locks=True, seqlock=False) -> None:
    """For the proof only: make the table unsafe, to show the hammer notices."""
    from mplb.shm import tables as shmtable
    if locks:
        shmtable.StripeLocks.acquire = lambda self, offset: None
        shmtable.StripeLocks.release = lambda self, offset: None
    if seqlock:
        def get(self, key, now):
            k1, k2, g = self.digest(key)
            base = self.start + g * GROUP * ENTRY_WORDS
            q = self.q
            for off in range(base, base + GROUP * ENTRY_WORDS, ENTRY_WORDS):
                if q[off + 1] == k1 and q[off + 2] == k2:
                    return q[off + 3]
                if q[off + 1] == 0 and q[off + 2] == 0:
                    return None
            return None
        shmtable.ShmTable.get = get


def main(argv) -> int:
    import tempfile
    from mplb.shm import SharedState
    disable_protection(locks="--no-locks" in argv, seqlock="--no-seqlock" in argv)
    path = os.path.join(tempfile.gettempdir(), f"mplb.stress.{os.getpid()}")
    shared = SharedState.create(path, max_workers=4, max_servers=8, table_entries=8192)
    slow = "--interleave" in argv
    try:
        table = shared.table("race", 64 * GROUP, 1e6)
        found = race_inserts(interleaved(table) if slow else table, 24)
        print(f"race_inserts: {len(found)} violations", *found[:5], sep="\n  ")
        table = shared.table("churn", 2 * GROUP, 1e6)
        more = churn(interleaved(table, 3) if slow else table, 1500 if slow else 20000)
        print(f"churn: {len(more)} violations", *more[:5], sep="\n  ")
        table = shared.table("torn", GROUP, 1e6)
        torn = torn_reads(interleaved(table, 3) if slow else table, 1000 if slow else 20000)
        print(f"torn_reads: {len(torn)} violations", *torn[:5], sep="\n  ")
        return 1 if found or more or torn else 0
    finally:
        shared.close()
        shared.unlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
