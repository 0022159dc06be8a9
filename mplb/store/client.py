"""Connections to the store: redis-py clients that never outlive a fork.

The master forks workers while its store threads hold connections.  A worker must not
keep them: a copy of the subscriber's socket would keep a dead subscription alive in the
server, and a copy of any socket keeps a connection the master has dropped.  Every
socket these clients open is recorded; a fork waits while one is being opened, and the
child detaches and closes all of them (without a shutdown, which would cut the
master's own connection).  No retries and no backoff inside redis-py: every call is one
try bounded by ``timeout``, and the caller decides what a failure means.
"""
from __future__ import annotations

import os
import threading
import weakref

import redis
from redis.backoff import NoBackoff
from redis.connection import Connection, SSLConnection
from redis.retry import Retry

_SOCKETS = weakref.WeakSet()
_GUARD = threading.Lock()         # held while a socket is opened and recorded


class _Recorded:
    """Mixin: record each socket the connection opens (see the module docstring)."""

    def _connect(self):
        with _GUARD:
            sock = super()._connect()
            _SOCKETS.add(sock)
        return sock


class RecordedConnection(_Recorded, Connection):
    pass


class RecordedSSLConnection(_Recorded, SSLConnection):
    pass


def _close_in_child() -> None:
    """After a fork, in the child: let go of every store socket (the master keeps its)."""
    global _GUARD
    _GUARD = threading.Lock()
    for sock in list(_SOCKETS):
        try:
            os.close(sock.detach())
        except (OSError, ValueError):
            pass
    _SOCKETS.clear()


os.register_at_fork(before=lambda: _GUARD.acquire(),
                    after_in_parent=lambda: _GUARD.release(),
                    after_in_child=_close_in_child)

Error = (redis.RedisError, OSError)


def connect(store, timeout: float = None) -> redis.Redis:
    """A client for the ``SharedStore`` ``store``; nothing is sent until first use."""
    timeout = store.timeout if timeout is None else timeout
    options = dict(host=store.host, port=store.port, db=store.db, username=store.username,
                   password=store.password, socket_timeout=timeout,
                   socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                   health_check_interval=0, client_name="mplb", max_connections=2)
    if store.tls:
        options["ssl_cert_reqs"] = "required"
        pool = redis.ConnectionPool(connection_class=RecordedSSLConnection, **options)
    else:
        pool = redis.ConnectionPool(connection_class=RecordedConnection, **options)
    return redis.Redis(connection_pool=pool)


def close(client) -> None:
    """Drop a client's connections (master side, when the store is left or replaced)."""
    if client is not None:
        try:
            client.connection_pool.disconnect()
        except Error:
            pass
