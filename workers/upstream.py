"""Per-worker keep-alive pools of upstream connections.

Under steady load a request takes an idle connection and gives it back, so no
connect happens per request.  A connection idle for more than a second gets a
non-blocking peek before reuse (backends close idle keep-alive connections after
seconds, not milliseconds, so a busy pool skips that syscall); a reused connection
that fails before the first response byte is retried once on a fresh one by the caller.
"""
from __future__ import annotations

import socket
import time

from gevent import socket as gsocket

from mplb.workers.netio import peek

PEEK_AFTER_IDLE = 1.0


class ConnectFailed(Exception):
    """Connecting to an upstream server failed (refused, unreachable, timed out)."""

    def __init__(self, reason, timed_out=False):
        super().__init__(reason)
        self.timed_out = timed_out


def _is_reusable(sock) -> bool:
    """An idle connection is reusable when it has neither data nor EOF pending (stray
    bytes or EOF mean the backend closed it or misbehaved)."""
    return peek(sock) is None


class UpstreamPool:
    """Idle connections per server URL, most recently used first, bounded per server."""

    def __init__(self):
        self._idle = {}

    def acquire(self, server, connect_timeout, verify=False):
        """Return ``(sock, reused, reader)``; raise ConnectFailed when a new connect fails.

        ``reader`` is the connection's response parser state, kept when its last
        response was parsed to the end (else None: the caller makes a fresh one).
        ``verify``: always peek before reuse (a request with a body cannot be replayed
        on a fresh connection if the pooled one turns out to be closed).
        """
        pooled = self.take(server, verify)
        if pooled is not None:
            return pooled[0], True, pooled[1]
        return connect(server, connect_timeout), False, None

    def take(self, server, verify=False):
        """An idle connection to ``server`` as ``(sock, reader)``, or None (no connect:
        the fast path never waits for one)."""
        idle = self._idle.get(server.url)
        while idle:
            sock, since, reader = idle.pop()
            if (not verify and time.monotonic() - since < PEEK_AFTER_IDLE) \
                    or _is_reusable(sock):
                return sock, reader
            sock.close()
        return None

    def release(self, server, sock, limit, reader=None):
        """Keep a connection whose last response ended cleanly, up to ``limit`` idle."""
        idle = self._idle.setdefault(server.url, [])
        if len(idle) < limit:
            idle.append((sock, time.monotonic(), reader))
        else:
            sock.close()

    def close_all(self):
        for idle in self._idle.values():
            for sock, _, _ in idle:
                sock.close()
        self._idle.clear()


def connect(server, timeout):
    """A new TCP connection to ``server`` with TCP_NODELAY, or ConnectFailed."""
    family = socket.AF_INET6 if ":" in server.address else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((server.address, server.port))
    except socket.timeout:
        sock.close()
        raise ConnectFailed("upstream timed out while connecting", timed_out=True)
    except OSError as exc:
        sock.close()
        raise ConnectFailed(exc.strerror or str(exc))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
