"""Persistence wrappers: answer first for a known client, record the method's pick otherwise.

A wrapper decides ``(index, label)``: the server and whether persistence knew the client
('hit'), did not ('miss') or had to replace its server ('repick'); the Balancer turns that
into its Pick.  Every mode asks the Balancer's one eligibility filter; a known server that
is not eligible (down, failed, at max_conns, already tried, or gone after a reload) is
replaced by a fresh pick of the method and the record is updated ('repick').  Records name servers by their
identity (the URL: shared directory slot or a URL hash), never by position, so they survive
reloads that reorder servers.  Client input (IPs, cookies, keys) is bounded before use and
hashed to fixed-size table keys.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import hmac
import struct

from mplb.vocabulary import PERSISTENCE_MODES

MAX_IP = 64                  # longest client address string we look at
MAX_COOKIE_HEADER = 8192     # Cookie header bytes we parse
MAX_SESSION_ID = 256         # learned session id length cap
MAC_BYTES = 16
TOKEN_BYTES = 6
VNODES_PER_WEIGHT = 160      # ketama: 40 md5 digests x 4 points each


def persistence_for(balancer, upstream):
    """The wrapper for ``upstream``'s persistence bound to ``balancer``, or None."""
    cfg = upstream.persistence
    if cfg.kind == "none":
        return None
    if cfg.kind == "cookie":
        return LearnCookie(balancer, cfg) if cfg.learn else InsertCookie(balancer, cfg)
    wrappers = {"ip_hash": IpHash, "consistent_hash": ConsistentHash}
    if cfg.kind not in wrappers:
        raise ValueError(f"unknown persistence {cfg.kind!r}")
    return wrappers[cfg.kind](balancer, cfg)


def _ttl(cfg) -> float:
    return cfg.ttl or PERSISTENCE_MODES[cfg.kind].ttl or 3600.0


def table_spec(upstream):
    """(name, capacity, ttl) of the shared table ``upstream``'s persistence keeps, or None.

    The name carries the size: a reload that resizes a table starts a new one, and the
    old one is reclaimed once no worker uses it.
    """
    p = upstream.persistence
    ttl = _ttl(p)
    # A cluster table digests keys with the cluster's key: another table than the one
    # this instance keeps alone (a reload that adds or changes shared_store starts it).
    keyed = f":c{upstream.cluster_key[:4].hex()}" if upstream.shared else ""
    if p.kind == "ip_hash":
        return f"{upstream.name}:ip_hash:{p.table_size}{keyed}", p.table_size, ttl
    if p.kind == "cookie" and p.learn:
        return f"{upstream.name}:learn:{p.learn}:{p.table_size}{keyed}", p.table_size, ttl
    return None


def store_tag(upstream):
    """The name of ``upstream``'s table in a shared store (12 hex digits), or None.

    The same on every instance with the same upstream, persistence mode and learned
    cookie (not the size: instances may size their local tables differently).
    """
    p = upstream.persistence
    if not upstream.shared or table_spec(upstream) is None:
        return None
    identity = f"{upstream.name}\0{p.kind}\0{p.learn or ''}".encode()
    return hashlib.blake2b(identity, digest_size=6, person=b"mplb-table").hexdigest()


def table_entries_for(upstreams) -> int:
    """Pool entries the shared tables of ``upstreams`` need (master sizes the segment)."""
    specs = [table_spec(upstream) for upstream in upstreams]
    return sum(spec[1] + 16 for spec in specs if spec is not None)


def cookie_value(header: str, name: str, limit: int):
    """The first value of cookie ``name`` in a Cookie header (bounded), or None."""
    if not header:
        return None
    for part in header[:MAX_COOKIE_HEADER].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip().strip('"')
            return value if 0 < len(value) <= limit else None
    return None


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


class _Wrapper:
    """Shared decide() shape: lookup -> hit, else the method's pick recorded as miss/repick."""

    uses_clock = False           # a table with TTLs needs the time; the others do not

    def __init__(self, balancer, cfg):
        self.b = balancer
        self.cfg = cfg
        self.ttl = _ttl(cfg)
        # Cluster tables tell the master of every entry they make (mplb.control).
        self.announce = balancer.state.announce if balancer.upstream.shared else None

    def remember(self, table, key: bytes, sid: int, now, first: bool):
        """``table.put`` and, for a new entry of a cluster table, the announcement."""
        existing = table.put(key, sid, now, replace=not first)
        if existing is None and self.announce is not None:
            self.announce(table, key, sid, first)
        return existing

    def lookup(self, request, now):
        """Known server index (-1 for a known server no longer configured) or None."""
        return None

    def record(self, request, sid, now, first: bool):
        """Remember server ``sid``; with ``first`` keep (and return) a record another
        worker made."""
        return None

    def decide(self, request, tried):
        """``(index, label)`` for ``request``, or None when no server is eligible."""
        b = self.b
        now = b.clock() if self.uses_clock else None
        known = self.lookup(request, now)
        if known is not None and known >= 0 and b.usable(known, tried, now):
            return known, "hit"
        index = b.pick_index(tried, now)
        if index is None:
            return None
        existing = self.record(request, b.sids[index], now, known is None)
        if existing is not None and existing != b.sids[index]:
            # Another worker recorded this new client a moment ago: follow that record.
            other = b.index_of_sid.get(existing)
            if other is not None and b.usable(other, tried, now):
                return other, "hit"
        return index, "miss" if known is None else "repick"

    def response_headers(self, index, label, request, response_headers) -> list:
        return []


class IpHash(_Wrapper):
    """Client IP -> server, in a shared table with TTL and LRU (all workers agree)."""

    uses_clock = True

    def __init__(self, balancer, cfg):
        super().__init__(balancer, cfg)
        self.table = balancer.state.table(*table_spec(balancer.upstream),
                                          balancer.upstream.cluster_key)

    @staticmethod
    def key(request) -> bytes:
        ip = getattr(request, "client_ip", None) or ""
        return ip[:MAX_IP].encode("ascii", "replace")

    def lookup(self, request, now):
        sid = self.table.get(self.key(request), now)
        if sid is None:
            return None
        return self.b.index_of_sid.get(sid, -1)

    def record(self, request, sid, now, first):
        return self.remember(self.table, self.key(request), sid, now, first)


class InsertCookie(_Wrapper):
    """mplb's own cookie naming the server (URL hash) with an HMAC; nothing stored."""

    def __init__(self, balancer, cfg):
        super().__init__(balancer, cfg)
        secret = cfg.secret.encode() if cfg.secret else balancer.state.secret
        self.secret = secret
        self.name = cfg.cookie_name
        self.by_token = {}
        self.values = []
        for i, server in enumerate(balancer.servers):
            value = self.make_value(server.url)
            self.values.append(value)
            self.by_token[value] = i
        self.limit = len(self.values[0]) if self.values else 0
        self.attributes = f"; Path=/; HttpOnly; SameSite=Lax; Max-Age={int(self.ttl)}\r\n"

    def make_value(self, url: str) -> str:
        """token.mac: token names the server, mac proves we (or a twin) issued it."""
        token = _b64(hashlib.blake2b(url.encode(), digest_size=TOKEN_BYTES).digest())
        mac = hmac.new(self.secret, f"{self.name}|{token}".encode(), hashlib.sha256).digest()
        return f"{token}.{_b64(mac[:MAC_BYTES])}"

    def lookup(self, request, now):
        header = request.header("cookie") if request is not None else None
        value = cookie_value(header, self.name, self.limit)
        if value is None:
            return None
        index = self.by_token.get(value)
        if index is not None:
            return index
        token, _, mac = value.partition(".")
        if self._verify(token, mac):
            return -1                       # genuine, but its server is gone: repick
        return None                         # forged/altered/garbage: a new client

    def _verify(self, token, mac) -> bool:
        expected = hmac.new(self.secret, f"{self.name}|{token}".encode(), hashlib.sha256).digest()
        return hmac.compare_digest(_b64(expected[:MAC_BYTES]), mac)

    def response_headers(self, index, label, request, response_headers) -> list:
        if label == "hit":                  # the client presented a valid cookie for it
            return []
        line = f"Set-Cookie: {self.name}={self.values[index]}{self.attributes}"
        return [line.encode("latin-1")]


class LearnCookie(_Wrapper):
    """learn=COOKIE: the backend's session id -> server, learned from its Set-Cookie."""

    uses_clock = True

    def __init__(self, balancer, cfg):
        super().__init__(balancer, cfg)
        self.name = cfg.learn
        self.lname = cfg.learn.lower()
        self.table = balancer.state.table(*table_spec(balancer.upstream),
                                          balancer.upstream.cluster_key)

    def session(self, request):
        header = request.header("cookie") if request is not None else None
        value = cookie_value(header, self.name, MAX_SESSION_ID)
        return None if value is None else value.encode("latin-1", "replace")

    def lookup(self, request, now):
        session = self.session(request)
        if session is None:
            return None
        sid = self.table.get(session, now)
        if sid is None:
            return None
        return self.b.index_of_sid.get(sid, -1)

    def record(self, request, sid, now, first):
        session = self.session(request)
        if session is not None:                  # keep an unknown/moved session together
            return self.remember(self.table, session, sid, now, first)
        return None

    def response_headers(self, index, label, request, response_headers) -> list:
        """Record session ids the backend sets; response_headers: (name, value) pairs."""
        for name, value in response_headers or ():
            if _text(name).lower() != "set-cookie":
                continue
            first = _text(value)[:MAX_COOKIE_HEADER].split(";", 1)[0]
            key, sep, session = first.partition("=")
            session = session.strip().strip('"')
            if sep and key.strip() == self.name and 0 < len(session) <= MAX_SESSION_ID:
                self.learn(session.encode("latin-1", "replace"), self.b.sids[index])
        return []


    def learn(self, session: bytes, sid: int) -> None:
        """The backend gave ``session`` to server ``sid``: it replaces any record (and
        a cluster hears of it only when it is news, not on every response)."""
        now = self.b.clock()
        if self.announce is not None and self.table.get(session, now) == sid:
            return
        self.remember(self.table, session, sid, now, False)


class ConsistentHash(_Wrapper):
    """ketama ring with weight-proportional virtual nodes; walk on to the next server."""

    def __init__(self, balancer, cfg):
        super().__init__(balancer, cfg)
        self.parts = cfg.key.parts
        points = []
        for i in balancer.primary:
            server = balancer.servers[i]
            for j in range(max(1, server.weight) * VNODES_PER_WEIGHT // 4):
                digest = hashlib.md5(f"{server.url}-{j}".encode()).digest()
                points.extend((p, i) for p in struct.unpack("<4I", digest))
        points.sort()
        self.points = [p for p, _ in points]
        self.owners = [i for _, i in points]
        self.distinct = len(balancer.primary)

    def key(self, request) -> bytes:
        if request is None:
            return b""
        value = "".join((request.variable(text) or "") if is_variable else text
                        for is_variable, text in self.parts)
        return value[:4096].encode("utf-8", "surrogateescape")

    def ring_owner(self, key: bytes) -> int:
        """Position on the ring of the first point at or after the key's hash."""
        h = struct.unpack("<I", hashlib.md5(key).digest()[:4])[0]
        pos = bisect.bisect_left(self.points, h)
        return pos if pos < len(self.points) else 0

    def decide(self, request, tried):
        b = self.b
        now = None
        if self.points:
            pos = self.ring_owner(self.key(request))
            seen = set()
            n = len(self.points)
            for step in range(n):
                index = self.owners[(pos + step) % n]
                if index in seen:
                    continue
                if b.eligible(index, tried, now):
                    return index, "hit" if not seen else "repick"
                seen.add(index)
                if len(seen) == self.distinct:
                    break
        index = b.pick_index(tried, now)                 # only backups can be left
        if index is None:
            return None
        return index, "repick"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
