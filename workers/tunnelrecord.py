"""What a worker remembers about one tunnel, in as few bytes as possible.

A ``TunnelRecord`` names the tunnel (client, request, upstream, server) for logs and for
a handover to the next generation, carries the accounting to undo when it ends, and is
itself the tunnel's ``on_close`` callback.  One slots object instead of a dict and a
closure: with thousands of idle tunnels per worker that difference is the point.
"""
from __future__ import annotations

import time

# Fields that travel with a handover (JSON) and come back through ``from_state``.
META = ("upstream", "server", "listen", "client", "method", "url", "version", "host",
        "user_agent", "opened", "bytes_in", "bytes_out")


_KEYS = {}


def _shared_key(key: tuple) -> tuple:
    """One tuple per listen for all its tunnels (a listen's key is built on each use)."""
    return _KEYS.setdefault(key, key)


class TunnelRecord:
    __slots__ = META + ("book", "pick", "balancer", "holds_capacity")

    def __init__(self, book, pick, balancer, holds_capacity, **meta):
        self.book = book              # the worker's TunnelBook, told when the tunnel ends
        self.pick = pick
        self.balancer = balancer
        self.holds_capacity = holds_capacity
        for name in META:
            setattr(self, name, meta[name])

    @classmethod
    def for_request(cls, book, conn, request, pick, balancer, bytes_in, bytes_out):
        return cls(book, pick, balancer, conn.holds_capacity, upstream=balancer.upstream.name,
                   server=pick.server.url, listen=_shared_key(conn.listen.key),
                   client=(conn.client_ip, conn.client_port), method=request.method,
                   url=request.url.decode("latin-1"), version=request.version,
                   host=request.host, user_agent=request.header("user-agent") or "",
                   opened=time.monotonic(), bytes_in=bytes_in, bytes_out=bytes_out)

    @classmethod
    def from_state(cls, book, pick, balancer, holds_capacity, state):
        """A record for a tunnel handed over by a retiring worker (bytes so far kept)."""
        meta = {name: state[name] for name in META}
        meta["listen"] = tuple(meta["listen"])
        meta["client"] = tuple(meta["client"])
        meta["bytes_in"] += state.get("client_rx", 0)
        meta["bytes_out"] += state.get("client_tx", 0)
        return cls(book, pick, balancer, holds_capacity, **meta)

    def meta(self) -> dict:
        """The JSON-able identity sent along with a handover."""
        return {name: getattr(self, name) for name in META}

    def __call__(self, reason, backend_failed, tunnel_in, tunnel_out):
        self.book.ended(self, reason, backend_failed, tunnel_in, tunnel_out)
