"""Balancing methods: the plug-ins a Balancer asks for a server, one tier at a time.

A method is built once per tier of an upstream (its primary servers, then its backups)
and answers ``pick(tried, now)`` with a server index, or None when none of its servers
is eligible.  Eligibility is the Balancer's one filter; a method only decides the order.
``PLUGINS`` maps every name of ``mplb.vocabulary.METHODS`` to its class.

The rotation is one position word per upstream in the shared segment, so a handful of
requests taken by different workers still goes round the servers (a private position
per worker would send each worker's first request to the same server).  The word is a
racy read-then-store counter: two workers picking in the same instant may take the
same turn, which only nudges the rotation.
"""
from __future__ import annotations

import math
from typing import Optional

MAX_SEQUENCE = 8192          # longest precomputed rotation; larger weight sums are scaled


def smooth_sequence(weights) -> list:
    """Positions of ``weights`` in nginx's smooth weighted round robin order, one period.

    Over any window of sum(weights) picks each server gets exactly its share,
    interleaved rather than in bursts.  Weights are divided by their greatest common
    divisor; a period longer than MAX_SEQUENCE picks is scaled down to it (each server
    keeps at least one turn).
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


class Rotation:
    """weighted_round_robin (and round_robin, all weights 1): the tier's smooth
    sequence walked from the upstream's shared turn."""

    def __init__(self, balancer, tier, weighted=True):
        self.b = balancer
        self.q = balancer.q
        self.position = balancer.position
        weights = [balancer.servers[i].weight if weighted else 1 for i in tier]
        self.sequence = tuple(balancer.words[tier[k]] for k in smooth_sequence(weights))

    def pick(self, tried, now) -> Optional[int]:
        q, position, sequence = self.q, self.position, self.sequence
        n = len(sequence)
        turn = q[position]
        i, hdown, hfails, max_conns = sequence[turn % n]
        if not ((tried and i in tried) or q[hdown] or (q[hfails] and self.b.failed(i, now))
                or (max_conns and self.b.active_total(i) >= max_conns)):
            q[position] = turn + 1
            return i
        verdict = {i: False}                  # ineligible servers are skipped, in order
        for step in range(1, n):
            i = sequence[(turn + step) % n][0]
            ok = verdict.get(i)
            if ok is None:
                ok = verdict[i] = self.b.eligible(i, tried, now)
            if ok:
                q[position] = turn + step + 1
                return i
        return None


class RoundRobin(Rotation):
    """round_robin: the rotation with every weight taken as 1."""

    def __init__(self, balancer, tier):
        super().__init__(balancer, tier, weighted=False)


class LeastConnections:
    """Fewest active connections (all workers) per unit of weight; ties are broken in
    turn from the shared position.  With a shared_store the connections the other
    instances hold count too (one more word per server; max_conns stays per instance)."""

    def __init__(self, balancer, tier):
        self.b = balancer
        self.q = balancer.q
        self.position = balancer.position
        self.entries = tuple(balancer.words[i] + (balancer.remote_words[i],) for i in tier)
        self.weights = tuple(balancer.servers[i].weight for i in range(len(balancer.servers)))
        self.count = len(balancer.servers)

    def pick(self, tried, now) -> Optional[int]:
        q, weights, b = self.q, self.weights, self.b
        sums = b.summers()
        n = self.count
        cursor = q[self.position] % n
        best = -1
        best_active = best_weight = best_turn = 0
        for i, hdown, hfails, max_conns, remote in self.entries:
            if (tried and i in tried) or q[hdown]:
                continue
            if q[hfails] and b.failed(i, now):
                continue
            active = sums[i](q)
            if max_conns and active >= max_conns:
                continue
            if remote:
                active += q[remote]
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
        q[self.position] = best + 1
        return best


class Single:
    """A tier of one server (every method picks it when it is eligible)."""

    def __init__(self, balancer, tier):
        self.index = tier[0]
        self.eligible = balancer.eligible

    def pick(self, tried, now) -> Optional[int]:
        i = self.index
        return i if self.eligible(i, tried, now) else None


PLUGINS = {"weighted_round_robin": Rotation, "round_robin": RoundRobin,
           "least_connections": LeastConnections}


class NoServer:
    """A tier with no server that can ever serve (all configured down)."""

    def __init__(self, balancer, tier):
        pass

    def pick(self, tried, now) -> None:
        return None


def method_for(balancer, name: str, tier: tuple):
    """The plug-in ``name`` for the servers ``tier`` (indexes)."""
    if not tier:
        return NoServer(balancer, tier)
    if len(tier) == 1:
        return Single(balancer, tier)
    return PLUGINS[name](balancer, tier)
