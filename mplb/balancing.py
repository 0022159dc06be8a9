"""One upstream's balancer: nginx's peer interface (init_upstream / get / free).

``init_upstream`` builds a :class:`Balancer` once per configuration and worker; per request
the worker calls ``get(request, tried)`` and, exactly once per pick, ``free(pick, failed)``.
Two kinds of plug-in decide the server:

- the method (mplb.methods), one per tier: primary servers first, backups only when no
  primary is eligible;
- persistence (mplb.persistence), when configured, which answers first for a client it
  knows and records the method's decision for one it does not.

Both ask this module's one eligibility filter (configured down, passive failure, active
health check, max_conns across all workers, already tried).

Counters live in the shared segment (mplb.shm) so least_connections and max_conns see
every worker; with ``shared=None`` (unit tests, single process) mplb.shm.local stands in.

Hot path: the balancer resolves every shared-memory word it touches once, at init (this
worker's active counter, each server's health words, where its per-worker active counters
start, the upstream's rotation word), so a pick reads a few words of ``q`` directly.  The
clock is read only when a server has recorded failures (or a persistence table needs it);
the active counters of all workers are summed only for least_connections and servers with
``max_conns``.
"""
from __future__ import annotations

import operator
import time
from typing import Callable, Optional

from mplb.methods import method_for
from mplb.persistence import persistence_for
from mplb.shm.layout import H_DOWN, H_FAILS, H_LAST_FAIL, H_REMOTE, HDR_SLOTS_USED, NFIELDS
from mplb.vocabulary import method_name

EMPTY = frozenset()


class Pick:
    """The server chosen for one request; handed back to ``free`` exactly once."""

    __slots__ = ("index", "server", "persistence", "sid", "freed")

    def __init__(self, index, server, sid, persistence=None):
        self.index = index            # position in upstream.servers
        self.server = server          # UpstreamServer
        self.sid = sid                # server slot in the shared directory
        self.persistence = persistence  # None | 'hit' | 'miss' | 'repick'
        self.freed = False

    def __repr__(self):
        return f"Pick({self.index}, {self.server.url!r}, persistence={self.persistence!r})"


class Balancer:
    """One upstream's method + persistence for one worker."""

    def __init__(self, upstream, shared, worker_slot: int, clock: Optional[Callable] = None):
        self.upstream = upstream
        self.method = method_name(upstream.method)
        if self.method is None:
            raise ValueError(f"unknown balancing method {upstream.method!r}")
        self.servers = servers = tuple(upstream.servers)
        if shared is None:
            from mplb.shm.local import LocalState
            shared = LocalState(worker_slot + 1, max(16, len(servers)))
        self.state = state = shared
        self.q = state.q
        self.worker_slot = worker_slot
        self.clock = clock or time.monotonic
        self.sids = tuple(state.server_id(s.url) for s in servers)
        self.index_of_sid = {sid: i for i, sid in enumerate(self.sids)}
        self.primary = tuple(i for i, s in enumerate(servers) if not s.backup)
        self.backup = tuple(i for i, s in enumerate(servers) if s.backup)
        self._resolve_words()
        # Configured-down servers never qualify: the methods never see them.  A
        # primary tier always exists (it may have no server); a backup tier only if
        # there are backups.
        primary, backup = (tuple(i for i in tier if not servers[i].down)
                           for tier in (self.primary, self.backup))
        self.tiers = (method_for(self, self.method, primary),
                      method_for(self, self.method, backup) if backup else None)
        self._pick_primary = self.tiers[0].pick
        self._pick_backup = self.tiers[1].pick if backup else None
        self.persistence = persistence_for(self, upstream)

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
        # With a shared_store: where the store thread writes the active connections the
        # other instances hold on each server (0: no such word, this instance alone).
        self.remote_words = tuple(h + H_REMOTE if self.upstream.shared else 0
                                  for h in health)
        # What a method checks per server, in one tuple: index and its words.
        self.words = tuple((i, self._hdown[i], self._hfails[i], self._max_conns[i])
                           for i in range(len(servers)))
        self.position = state.upstream_word(self.upstream.name)
        self._summer_slots = -1
        self._summer_fns = ()

    # -- the peer interface -------------------------------------------------------------

    def get(self, request, tried=EMPTY) -> Optional[Pick]:
        """Choose a server for ``request`` (skipping ``tried`` indexes); None means 502."""
        persistence = self.persistence
        if persistence is None:
            index = self._pick_primary(tried, None)
            if index is None:
                if self._pick_backup is None:
                    return None
                index = self._pick_backup(tried, None)
                if index is None:
                    return None
            pick = Pick(index, self.servers[index], self.sids[index])
        else:
            decided = persistence.decide(request, tried)
            if decided is None:
                return None
            index, label = decided
            pick = Pick(index, self.servers[index], self.sids[index], label)
        self.q[self._act[index]] += 1
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
        return self.persistence.response_headers(pick.index, pick.persistence, request,
                                                 response_headers)

    def pick_index(self, tried=EMPTY, now=None) -> Optional[int]:
        """The method's choice among primaries, else among backups; None if none."""
        primary, backup = self.tiers
        index = primary.pick(tried, now)
        if index is None and backup is not None:
            index = backup.pick(tried, now)
        return index

    # -- eligibility ----------------------------------------------------------------------

    def eligible(self, index: int, tried=EMPTY, now=None) -> bool:
        """The one filter every method and persistence mode uses (``now`` may be None)."""
        if index in tried or self._down[index]:
            return False
        q = self.q
        if q[self._hdown[index]]:
            return False
        if q[self._hfails[index]] and self.failed(index, now):
            return False
        max_conns = self._max_conns[index]
        return not (max_conns and self.active_total(index) >= max_conns)

    def usable(self, index, tried=EMPTY, now=None) -> bool:
        """A server persistence knows may serve: eligible, and not a backup while some
        primary is."""
        return self.eligible(index, tried, now) and not (
            self.servers[index].backup and self.primary_available(tried, now))

    def failed(self, index: int, now) -> bool:
        """Passive failure: max_fails failures, the last one within fail_timeout."""
        max_fails = self._max_fails[index]
        if not max_fails or self.q[self._hfails[index]] < max_fails:
            return False
        if now is None:
            now = self.clock()
        return int(now * 1_000_000) - self.q[self._hlast[index]] < self._timeout_us[index]

    def active_total(self, index: int) -> int:
        """Active connections to server ``index`` summed over every worker slot."""
        return self.summers()[index](self.q)

    def summers(self) -> tuple:
        """Per server, a function summing its active words over the slots in use.

        Rebuilt only when the number of worker slots in use changes: reading a few
        known words is several times cheaper than slicing the segment on every pick.
        """
        slots = self.q[HDR_SLOTS_USED]
        if slots != self._summer_slots:
            self._summer_slots = slots
            self._summer_fns = tuple(word_sum(base, NFIELDS, slots) for base in self._abase)
        return self._summer_fns

    def primary_available(self, tried=EMPTY, now=None) -> bool:
        """Some primary is eligible (a persisted backup must then give way)."""
        return any(self.eligible(i, tried, now) for i in self.primary)


def word_sum(base: int, stride: int, count: int) -> Callable:
    """``f(q)`` = q[base] + q[base + stride] + ... (``count`` words)."""
    if count <= 0:
        return _zero
    if count == 1:
        return operator.itemgetter(base)
    getter = operator.itemgetter(*range(base, base + count * stride, stride))
    return lambda q: sum(getter(q))


def _zero(q) -> int:
    return 0


def init_upstream(upstream, shared, worker_slot: int, clock: Optional[Callable] = None) -> Balancer:
    """Build the balancer for ``upstream`` in the worker using ``worker_slot``."""
    return Balancer(upstream, shared, worker_slot, clock=clock)
