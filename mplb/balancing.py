"""Balancing methods behind one peer interface (nginx's upstream round-robin shape).

``init_upstream`` builds a :class:`Balancer` once per configuration and worker; per request
the worker calls ``get(request, tried)`` and, exactly once per pick, ``free(pick, failed)``.
Every method shares one eligibility filter (down, passive failure, active health check,
max_conns across all workers, already tried) and falls back to backup servers only when no
primary is eligible.  Persistence (mplb.persistence) wraps the method: it answers first when
it knows the client and records the method's pick when it does not.

Counters live in the shared segment (mplb.shm.SharedState) so least_connections and
max_conns see every worker; with ``shared=None`` (unit tests, single process) a
:class:`LocalState` with the same layout in private memory stands in.

The rotation is shared too: one position word per upstream in the segment, so a
handful of requests spread over several workers still rotates over the servers (each
worker keeping its own position would send the first request of every worker to the
same server).  Weighted round robin walks a precomputed smooth sequence (nginx's
algorithm, so over any window of sum(weights) picks each server gets exactly its
share, interleaved) at that shared position; least_connections breaks ties from it.

Hot path: the balancer resolves every shared-memory word it touches once, at init (this
worker's active counter, each server's health words, where its per-worker active counters
start), so a pick reads a few words of ``q`` directly.  The clock is read only when a
server has recorded failures (or a persistence table needs it); the active counters of
all workers are summed only for least_connections and servers with ``max_conns``.
"""
from __future__ import annotations

import math
import mmap
import os
import time
from typing import Callable, Optional

from mplb.shm import (H_DOWN, H_FAILS, H_LAST_FAIL, HDR_SLOTS_USED as SLOTS_USED, NFIELDS,
                      SharedState, segment_layout)
from mplb.shmtable import private_table

METHODS = ("weighted_round_robin", "round_robin", "least_connections")
METHOD_ALIASES = {"least_conn": "least_connections"}
EMPTY = frozenset()
MAX_SEQUENCE = 8192          # longest precomputed rotation; larger weight sums are scaled


class Pick:
    """The server chosen for one request; handed back to ``free`` exactly once."""

    __slots__ = ("index", "server", "persistence", "sid", "cookie_valid", "freed")

    def __init__(self, index, server, sid, persistence=None):
        self.index = index            # position in upstream.servers
        self.server = server          # UpstreamServer
        self.sid = sid                # server slot in the shared directory
        self.persistence = persistence  # None | 'hit' | 'miss' | 'repick'
        self.cookie_valid = False     # the client presented a valid cookie for this server
        self.freed = False

    def __repr__(self):
        return f"Pick({self.index}, {self.server.url!r}, persistence={self.persistence!r})"


class LocalState(SharedState):
    """The segment layout in this process's private memory (shared=None, one process)."""

    def __init__(self, max_workers: int = 1, max_servers: int = 64):
        header, total = segment_layout(max_workers, max_servers, 16, 4)
        mm = mmap.mmap(-1, total)
        mm[:len(header)] = header
        super().__init__(None, None, mm, True, salt=os.urandom(16), secret=os.urandom(32))
        self.allocating = True
        for slot in range(max_workers):
            self.worker_started(slot, os.getpid(), 0)

    def table(self, name: str, capacity: int, ttl: float):
        """A private table (same code as the shared ones) sized on demand."""
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = private_table(name, capacity, ttl, self.secret[:16])
        table.ttl_us = int(ttl * 1e6)
        return table


class Balancer:
    """One upstream's method + persistence for one worker (per-worker rotation state)."""

    def __init__(self, upstream, shared, worker_slot: int, clock: Optional[Callable] = None):
        self.upstream = upstream
        self.method = METHOD_ALIASES.get(upstream.method, upstream.method)
        if self.method not in METHODS:
            raise ValueError(f"unknown balancing method {upstream.method!r}")
        self.servers = servers = tuple(upstream.servers)
        if shared is None:
            shared_state = LocalState(worker_slot + 1, max(16, len(servers)))
        else:
            shared_state = shared
        self.state = state = shared_state
        self.shared = shared
        self.q = state.q
        self.worker_slot = worker_slot
        self.clock = clock or time.monotonic
        self.sids = tuple(state.server_id(s.url) for s in servers)
        self.index_of_sid = {sid: i for i, sid in enumerate(self.sids)}
        self.primary = tuple(i for i, s in enumerate(servers) if not s.backup)
        self.backup = tuple(i for i, s in enumerate(servers) if s.backup)
        if self.method == "round_robin":
            self.weights = tuple(1 for _ in servers)
        else:
            self.weights = tuple(max(1, s.weight) for s in servers)
        self._resolve_words()
        self.persistence = None
        if upstream.persistence.kind != "none":
            from mplb.persistence import make_persistence
            self.persistence = make_persistence(self, upstream.persistence)

    def _resolve_words(self) -> None:
        """Shared-memory word indexes and per-server limits, computed once."""
        state, servers = self.state, self.servers
        health = [state.health_word(sid) for sid in self.sids]
        self._act = tuple(state.counter_word(self.worker_slot, sid) for sid in self.sids)
        self._abase = tuple(state.active_words(sid)[0] for sid in self.sids)
        self._hdown = tuple(h + H_DOWN for h in health)
        self._hfails = tuple(h + H_FAILS for h in health)
        self._hlast = tuple(h + H_LAST_FAIL for h in health)
        self._down = tuple(s.down for s in servers)
        self._max_conns = tuple(s.max_conns for s in servers)
        # nginx: the only server of a group is never considered unavailable by
        # passive checks (max_fails and fail_timeout are ignored for it).
        single = len(servers) == 1
        self._max_fails = tuple(0 if single else s.max_fails for s in servers)
        self._timeout_us = tuple(int(s.fail_timeout * 1_000_000) for s in servers)

        def pool(indexes):                         # configured-down servers never qualify
            return tuple((i, self._hdown[i], self._hfails[i], self._max_conns[i])
                         for i in indexes if not servers[i].down)

        def rotation(entries):                     # the pool in smooth WRR order
            order = smooth_sequence([self.weights[i] for i, _, _, _ in entries])
            return tuple(entries[k] for k in order)
        self._position = state.upstream_word(self.upstream.name)
        self._summer_slots = -1
        self._summer_fns = ()
        # Per tier (primary, backup), what the method walks: the servers themselves for
        # least_connections, their smooth sequence for the round robins.
        if self.method == "least_connections":
            self._method = self._least_connections
            self._pools = (pool(self.primary), pool(self.backup))
        else:
            self._method = self._rotate
            self._pools = (rotation(pool(self.primary)), rotation(pool(self.backup)))
        if len(self._pools[0]) == 1 and not self._pools[1]:
            self._method = self._single         # every method picks the only server

    # -- the peer interface -------------------------------------------------------------

    def get(self, request, tried=EMPTY) -> Optional[Pick]:
        """Choose a server for ``request`` (skipping ``tried`` indexes); None means 502."""
        if self.persistence is not None:
            pick = self.persistence.get(request, tried, None)
            if pick is None:
                return None
        else:
            primary, backup = self._pools
            index = self._method(primary, tried, None)
            if index is None:
                if not backup:
                    return None
                index = self._method(backup, tried, None)
                if index is None:
                    return None
            pick = Pick(index, self.servers[index], self.sids[index])
        self.q[self._act[pick.index]] += 1
        return pick

    def free(self, pick: Pick, failed: bool) -> None:
        """Release the connection taken by ``get``; record a passive failure when failed."""
        if pick is None or pick.freed:
            return
        pick.freed = True
        i = pick.index
        q = self.q
        q[self._act[i]] -= 1
        if failed:
            self.state.record_failure(self.worker_slot, pick.sid, self.clock(),
                                      self._max_fails[i], pick.server.fail_timeout)
        elif q[self._hfails[i]]:                   # lock-free common case: no failures
            self.state.record_success(pick.sid, self.clock(), self._max_fails[i],
                                      pick.server.fail_timeout)

    def adopt(self, index: int) -> Pick:
        """Count a connection this worker took over (tunnel handover) as its own."""
        pick = Pick(index, self.servers[index], self.sids[index])
        self.q[self._act[index]] += 1
        return pick

    def response_headers(self, pick, request, response_headers) -> list:
        """Extra raw header lines for the client response (persistence cookies)."""
        if self.persistence is None or pick is None:
            return []
        return self.persistence.response_headers(pick, request, response_headers)

    # -- eligibility ----------------------------------------------------------------------

    def eligible(self, index: int, tried=EMPTY, now=None) -> bool:
        """The one filter every method and persistence mode uses (``now`` may be None)."""
        if index in tried or self._down[index]:
            return False
        q = self.q
        if q[self._hdown[index]]:
            return False
        if q[self._hfails[index]] and self._failed(index, now):
            return False
        max_conns = self._max_conns[index]
        return not (max_conns and self.active_total(index) >= max_conns)

    def _failed(self, index: int, now) -> bool:
        """Passive failure: max_fails failures, the last one within fail_timeout."""
        max_fails = self._max_fails[index]
        if not max_fails or self.q[self._hfails[index]] < max_fails:
            return False
        if now is None:
            now = self.clock()
        return int(now * 1_000_000) - self.q[self._hlast[index]] < self._timeout_us[index]

    def active_total(self, index: int) -> int:
        """Active connections to server ``index`` summed over every worker slot."""
        return self._summers()[index](self.q)

    def _summers(self) -> tuple:
        """Per server, a function summing its active words over the slots in use.

        Rebuilt only when the number of worker slots in use changes: an unrolled sum of
        a few words is several times cheaper than slicing the segment on every pick.
        """
        slots = self.q[SLOTS_USED]
        if slots != self._summer_slots:
            self._summer_slots = slots
            self._summer_fns = tuple(word_sum(base, NFIELDS, slots) for base in self._abase)
        return self._summer_fns

    def primary_available(self, tried=EMPTY, now=None) -> bool:
        """Some primary is eligible (a persisted backup must then give way)."""
        return any(self.eligible(i, tried, now) for i in self.primary)

    # -- methods ------------------------------------------------------------------------

    def pick_index(self, tried=EMPTY, now=None) -> Optional[int]:
        """Run the configured method over primaries, then over backups."""
        primary, backup = self._pools
        index = self._method(primary, tried, now)
        if index is None and backup:
            index = self._method(backup, tried, now)
        return index

    def _single(self, pool, tried, now) -> Optional[int]:
        """One eligible server and no backup: no weights to turn."""
        i = pool[0][0]
        return i if self.eligible(i, tried, now) else None

    def _rotate(self, sequence, tried, now) -> Optional[int]:
        """The next eligible server of a tier's smooth sequence, from the shared turn."""
        q, position = self.q, self._position
        n = len(sequence)
        if not n:
            return None
        turn = q[position]
        i, hdown, hfails, max_conns = sequence[turn % n]
        if not ((tried and i in tried) or q[hdown] or (q[hfails] and self._failed(i, now))
                or (max_conns and self.active_total(i) >= max_conns)):
            q[position] = turn + 1
            return i
        verdict = {i: False}                  # ineligible servers are skipped, in order
        for step in range(1, n):
            i = sequence[(turn + step) % n][0]
            ok = verdict.get(i)
            if ok is None:
                ok = verdict[i] = self.eligible(i, tried, now)
            if ok:
                q[position] = turn + step + 1
                return i
        return None

    def _least_connections(self, pool, tried, now) -> Optional[int]:
        """Fewest active/weight across all workers; ties rotate round robin."""
        q, weights = self.q, self.weights
        sums = self._summer_fns if q[SLOTS_USED] == self._summer_slots else self._summers()
        n = len(self.servers)
        cursor = q[self._position] % n
        best = -1
        best_active = best_weight = best_turn = 0
        for i, hdown, hfails, max_conns in pool:
            if (tried and i in tried) or q[hdown]:
                continue
            if q[hfails] and self._failed(i, now):
                continue
            active = sums[i](q)
            if max_conns and active >= max_conns:
                continue
            weight = weights[i]
            turn = (i - cursor) % n                # tie: first at or after the cursor
            if best < 0:
                better = True
            else:
                lhs, rhs = active * best_weight, best_active * weight
                better = lhs < rhs or (lhs == rhs and turn < best_turn)
            if better:
                best, best_active, best_weight, best_turn = i, active, weight, turn
        if best < 0:
            return None
        q[self._position] = best + 1
        return best


def smooth_sequence(weights) -> list:
    """Positions of ``weights`` in nginx's smooth weighted round robin order, one period.

    Weights are divided by their greatest common divisor; a period longer than
    MAX_SEQUENCE picks is scaled down to it (each server keeps at least one turn).
    """
    if not weights:
        return []
    divisor = math.gcd(*weights)
    weights = [w // divisor for w in weights]
    total = sum(weights)
    if total > MAX_SEQUENCE:
        weights = [max(1, w * MAX_SEQUENCE // total) for w in weights]
        total = sum(weights)
    current = [0] * len(weights)
    out = []
    for _ in range(total):
        best = 0
        for k, w in enumerate(weights):
            current[k] += w
            if current[k] > current[best]:
                best = k
        current[best] -= total
        out.append(best)
    return out


def word_sum(base: int, stride: int, count: int) -> Callable:
    """``f(q)`` = q[base] + q[base + stride] + ... (``count`` words), unrolled when small."""
    if count <= 0:
        return lambda q: 0
    if count > 32:
        end = base + count * stride
        return lambda q: sum(q[base:end:stride])
    terms = " + ".join(f"q[{base + k * stride}]" for k in range(count))
    return eval(f"lambda q: {terms}")          # only integers are interpolated


def init_upstream(upstream, shared, worker_slot: int, clock: Optional[Callable] = None) -> Balancer:
    """Build the balancer for ``upstream`` in the worker using ``worker_slot``."""
    return Balancer(upstream, shared, worker_slot, clock=clock)
