"""Accepting client connections, at most worker_connections at a time, one greenlet each.

The acceptor owns the worker's listen sockets and its connection slots: a connection
holds a slot from accept until it closes, or until the tunnel it became ends.  Past
``worker_connections`` the accept loops wait for a free slot instead of accepting.
"""
from __future__ import annotations

import logging
import socket

import gevent
from gevent import socket as gsocket
from gevent.lock import Semaphore

from mplb.workers.http import ClientConnection

log = logging.getLogger("mplb.worker")


class Acceptor:
    """The worker's listen sockets, connection slots and live client connections."""

    def __init__(self, worker):
        self.worker = worker
        self.accounting = worker.accounting
        self.capacity = Semaphore(worker.config.worker_connections)
        self.connections = set()        # ClientConnections being served
        self.accepted_since_trim = 0
        self.listeners = []

    def start(self, listen_sockets) -> None:
        """Accept on the inherited sockets (the descriptors themselves, not dups, so
        closing them on QUIT really stops this worker listening)."""
        for raw_sock, listen in listen_sockets.values():
            lsock = gsocket.socket(fileno=raw_sock.detach())
            self.listeners.append(lsock)
            gevent.spawn(self._accept_loop, lsock, listen)

    def stop(self) -> None:
        for lsock in self.listeners:
            lsock.close()

    def _accept_loop(self, lsock, listen):
        worker = self.worker
        while not worker.stopping:
            self.capacity.acquire()
            if worker.stopping:
                self.capacity.release()
                return
            try:
                sock, addr = lsock.accept()
            except OSError as exc:
                self.capacity.release()
                if worker.stopping:
                    return
                log.error("accept() failed: %s", exc)
                gevent.sleep(0.1)     # EMFILE and friends: back off instead of spinning
                continue
            self.accounting.connection_opened()
            self.accepted_since_trim += 1
            gevent.spawn(self._serve, sock, addr, listen)

    def adopt_slot(self) -> bool:
        """A tunnel handed over by a retiring sibling counts here too; it holds a slot
        only if one is free (it is never refused).  Returns whether it holds one."""
        self.accounting.connection_opened()
        return self.capacity.acquire(blocking=False)

    def release_slot(self, holds_capacity: bool) -> None:
        """A connection, or the tunnel it became, has ended."""
        if holds_capacity:
            self.capacity.release()
        self.accounting.connection_closed()

    def _serve(self, sock, addr, listen):
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = self.worker.tls.get(listen.key)
            if context is not None:
                sock = self._tls_handshake(context, sock, listen)
                if sock is None:
                    return
            conn = ClientConnection(self.worker, sock, addr, listen)
            self.connections.add(conn)
            conn.serve()
        except Exception:   # noqa: BLE001 - one bad connection never takes the worker down
            log.exception("unexpected error on connection from %s", addr[0])
            sock.close()
        finally:
            self.connections.discard(conn)
            if conn is None or not conn.handed_off:
                self.release_slot(True)

    def _tls_handshake(self, context, sock, listen):
        sock.settimeout(self.worker.default_settings(listen).client_header_timeout)
        try:
            tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls_sock.do_handshake()
            return tls_sock
        except (OSError, ValueError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
            return None

    def close_idle(self, stopping_for: float) -> None:
        """Graceful stop: close the connections that sit between requests."""
        for conn in list(self.connections):
            if conn.closable_on_shutdown(stopping_for):
                conn.sock.close()
