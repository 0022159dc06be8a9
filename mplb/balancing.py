"""Balancing methods behind one peer interface (nginx's upstream round-robin shape).

``init_upstream`` builds a :class:`Balancer` once per configuration and worker; per request
the worker calls ``get(request, tried)`` and, exactly once per pick, ``free(pick, failed)``.
Every method shares one eligibility filter (down, passive failure, active health check,
max_conns across all workers, already tried) and falls back to backup servers only when no
primary is eligible.  Persistence (mplb.persistence) wraps the method: it answers first when
it knows the client and records the method's pick when it does not.

Counters live in the shared segment (mplb.shm.SharedState) so least_connections and
max_conns see every worker; with ``shared=None`` (unit tests, single process) an in-process
:class:`LocalState` with the same small interface stands in.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

METHODS = ("weighted_round_robin", "round_robin", "least_connections")
METHOD_ALIASES = {"least_conn": "least_connections"}


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


class LocalState:
    """In-process stand-in for SharedState's balancing interface (shared=None)."""

    def __init__(self):
        self._ids = {}
        self._active = {}
        self._fails = {}          # sid -> [fails, last_fail]
        self._down = set()
        self._tables = {}
        self.secret = os.urandom(32)          # cookie secret (shared: one per master)
        self.counters = {}        # sid -> {'requests': n, 'failures': n}

    def server_id(self, url: str) -> int:
        return self._ids.setdefault(url, len(self._ids))

    def active_total(self, sid: int) -> int:
        return self._active.get(sid, 0)

    def add_active(self, worker_slot: int, sid: int, delta: int) -> None:
        self._active[sid] = self._active.get(sid, 0) + delta

    def is_failed(self, sid, now, max_fails, fail_timeout) -> bool:
        rec = self._fails.get(sid)
        return bool(rec and max_fails and rec[0] >= max_fails and now - rec[1] < fail_timeout)

    def record_failure(self, worker_slot, sid, now, max_fails, fail_timeout) -> None:
        c = self.counters.setdefault(sid, {"requests": 0, "failures": 0})
        c["failures"] += 1
        if not max_fails:
            return
        rec = self._fails.setdefault(sid, [0, 0.0])
        if now - rec[1] >= fail_timeout:
            rec[0] = 0            # older failures fell out of the window
        rec[0] += 1
        rec[1] = now

    def record_success(self, sid, now, max_fails, fail_timeout) -> None:
        rec = self._fails.get(sid)
        if rec and rec[0] and (rec[0] < max_fails or now - rec[1] >= fail_timeout):
            rec[0] = 0

    def health_down(self, sid: int) -> bool:
        return sid in self._down

    def set_health(self, sid: int, up: bool) -> None:
        (self._down.discard if up else self._down.add)(sid)

    def set_health_record(self, sid, fails, passes, checked) -> None:
        pass

    def table(self, name: str, capacity: int, ttl: float):
        """A private ShmTable over process memory (same code as the shared tables)."""
        from mplb.shm import ENTRY_WORDS, GROUP, ShmTable, StripeLocks
        table = self._tables.get(name)
        if table is None:
            capacity = max(GROUP, -(-capacity // GROUP) * GROUP)
            words = memoryview(bytearray(capacity * ENTRY_WORDS * 8)).cast("q")
            table = ShmTable(words, 0, capacity, int(ttl * 1e6), self.secret[:16],
                             StripeLocks(None), name=name)
            self._tables[name] = table
        return table


class Balancer:
    """One upstream's method + persistence for one worker (per-worker rotation state)."""

    def __init__(self, upstream, shared, worker_slot: int, clock: Optional[Callable] = None):
        self.upstream = upstream
        self.method = METHOD_ALIASES.get(upstream.method, upstream.method)
        if self.method not in METHODS:
            raise ValueError(f"unknown balancing method {upstream.method!r}")
        self.state = shared if shared is not None else LocalState()
        self.shared = shared
        self.worker_slot = worker_slot
        self.clock = clock or time.monotonic
        self.servers = tuple(upstream.servers)
        self.sids = tuple(self.state.server_id(s.url) for s in self.servers)
        self.rules = tuple((s.down, sid, s.max_fails, s.fail_timeout, s.max_conns)
                           for s, sid in zip(self.servers, self.sids))
        self.index_of_sid = {sid: i for i, sid in enumerate(self.sids)}
        self.primary = tuple(i for i, s in enumerate(self.servers) if not s.backup)
        self.backup = tuple(i for i, s in enumerate(self.servers) if s.backup)
        if self.method == "round_robin":
            self.weights = tuple(1 for _ in self.servers)
        else:
            self.weights = tuple(max(1, s.weight) for s in self.servers)
        self.current = [0] * len(self.servers)     # smooth WRR current weights
        self.cursor = 0                            # least_connections tie rotation
        self.persistence = None
        if upstream.persistence.kind != "none":
            from mplb.persistence import make_persistence
            self.persistence = make_persistence(self, upstream.persistence)

    # -- the peer interface -------------------------------------------------------------

    def get(self, request, tried=frozenset()) -> Optional[Pick]:
        """Choose a server for ``request`` (skipping ``tried`` indexes); None means 502."""
        now = self.clock()
        if self.persistence is not None:
            pick = self.persistence.get(request, tried, now)
        else:
            index = self.pick_index(tried, now)
            pick = None if index is None else Pick(index, self.servers[index], self.sids[index])
        if pick is not None:
            self.state.add_active(self.worker_slot, pick.sid, 1)
        return pick

    def free(self, pick: Pick, failed: bool) -> None:
        """Release the connection taken by ``get``; record a passive failure when failed."""
        if pick is None or pick.freed:
            return
        pick.freed = True
        self.state.add_active(self.worker_slot, pick.sid, -1)
        server = pick.server
        now = self.clock()
        if failed:
            self.state.record_failure(self.worker_slot, pick.sid, now,
                                      server.max_fails, server.fail_timeout)
        else:
            self.state.record_success(pick.sid, now, server.max_fails, server.fail_timeout)

    def response_headers(self, pick, request, response_headers) -> list:
        """Extra raw header lines for the client response (persistence cookies)."""
        if self.persistence is None or pick is None:
            return []
        return self.persistence.response_headers(pick, request, response_headers)

    # -- method and eligibility ---------------------------------------------------------

    def eligible(self, index: int, tried, now) -> bool:
        """The one filter every method and persistence mode uses."""
        if index in tried:
            return False
        down, sid, max_fails, fail_timeout, max_conns = self.rules[index]
        if down:
            return False
        state = self.state
        if max_fails and state.is_failed(sid, now, max_fails, fail_timeout):
            return False
        if state.health_down(sid):
            return False
        if max_conns and state.active_total(sid) >= max_conns:
            return False
        return True

    def primary_available(self, tried, now) -> bool:
        """Some primary is eligible (a persisted backup must then give way)."""
        return any(self.eligible(i, tried, now) for i in self.primary)

    def pick_index(self, tried, now) -> Optional[int]:
        """Run the configured method over primaries, then over backups."""
        for group in (self.primary, self.backup):
            candidates = [i for i in group if self.eligible(i, tried, now)]
            if candidates:
                if self.method == "least_connections":
                    return self._least_connections(candidates)
                return self._smooth_weighted(candidates)
        return None

    def _smooth_weighted(self, candidates) -> int:
        """nginx's smooth WRR: add weights, take the max, subtract the total from it."""
        current, weights = self.current, self.weights
        total = 0
        best = -1
        best_weight = None
        for i in candidates:
            w = weights[i]
            current[i] += w
            total += w
            if best_weight is None or current[i] > best_weight:
                best, best_weight = i, current[i]
        current[best] -= total
        return best

    def _least_connections(self, candidates) -> int:
        """Fewest active/weight across all workers; ties rotate round robin."""
        state, weights, sids = self.state, self.weights, self.sids
        tied = []
        best_active = best_weight = None
        for i in candidates:
            active, weight = state.active_total(sids[i]), weights[i]
            if best_active is None or active * best_weight < best_active * weight:
                tied = [i]
                best_active, best_weight = active, weight
            elif active * best_weight == best_active * weight:
                tied.append(i)
        if len(tied) == 1:
            choice = tied[0]
        else:
            after = [i for i in tied if i >= self.cursor]
            choice = after[0] if after else tied[0]
        self.cursor = choice + 1
        return choice


def init_upstream(upstream, shared, worker_slot: int, clock: Optional[Callable] = None) -> Balancer:
    """Build the balancer for ``upstream`` in the worker using ``worker_slot``."""
    return Balancer(upstream, shared, worker_slot, clock=clock)
