"""Accepting client connections, at most worker_connections at a time, one greenlet each.

The acceptor owns the worker's listen sockets and its connection slots: a connection
holds a slot from accept until it closes, until the tunnel it became ends, or until it
moves to another worker.  Past ``worker_connections`` the accept loops wait for a free
slot instead of accepting.

On reload a retiring worker hands every plain-TCP client connection to the new
generation, which adopts it (``adopt``) and serves its next request under the new
configuration.  A connection moves only at a request boundary, with nothing of its
next request read: a busy one stops itself there (``queue_move``), one already waiting
for its next request is stopped in that wait (``ClientConnection.hand_off``).  The
socket moves with whatever the client has sent meanwhile (still unread in the kernel)
and the state the new worker needs (requests served so far, the listen it came from),
so no request is lost or served twice.
"""
from __future__ import annotations

import logging
import os
import socket

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.lock import Semaphore

from mplb.workers.handover import hand_over
from mplb.workers.http import ClientConnection

log = logging.getLogger("mplb.worker")


class Acceptor:
    """The worker's listen sockets, connection slots and live client connections."""

    def __init__(self, worker):
        self.worker = worker
        self.accounting = worker.accounting
        self.capacity = Semaphore(worker.config.worker_connections)
        self.connections = set()        # ClientConnections being served
        self.to_move = []               # connections that stopped to move (a reload)
        self.move_ready = Event()       # wakes the drain when one is queued
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
            gevent.spawn(self._serve, sock, addr, listen, True, None)

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

    def _serve(self, sock, addr, listen, holds_capacity, moved):
        """Serve one connection: accepted here, or ``moved`` from a retiring sibling
        (its handover state: requests it has served so far)."""
        conn = None
        try:
            if moved is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                context = self.worker.tls.get(listen.key)
                if context is not None:
                    sock = self._tls_handshake(context, sock, listen)
                    if sock is None:
                        return
            conn = ClientConnection(self.worker, sock, addr, listen)
            conn.holds_capacity = holds_capacity
            conn.greenlet = gevent.getcurrent()
            if moved is not None:
                conn.served = moved["served"]
            self.connections.add(conn)
            conn.serve()
        except Exception:   # noqa: BLE001 - one bad connection never takes the worker down
            log.exception("unexpected error on connection from %s", addr[0])
            sock.close()
        finally:
            self.connections.discard(conn)
            if conn is None or not conn.handed_off:
                self.release_slot(holds_capacity)

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

    def close_idle(self, stopping_for: float, spare_tls: bool) -> None:
        """Graceful stop: close the connections that sit between requests.

        With ``spare_tls`` (a reload), TLS connections, which cannot move, are left
        to end by themselves: their next response says Connection: close (so no
        request is ever cut off), or their keepalive_timeout ends them.
        """
        for conn in list(self.connections):
            if spare_tls and not conn.movable:
                continue
            if conn.closable_on_shutdown(stopping_for):
                conn.sock.close()

    # -- reload ------------------------------------------------------------------------
    def queue_move(self, conn) -> None:
        """A connection stopped at a request boundary to move: the drain sends it."""
        self.to_move.append(conn)
        self.move_ready.set()

    def hand_over_idle(self, targets) -> int:
        """Move to ``targets`` the connections that stopped to move and those waiting
        for their next request."""
        queued, self.to_move = self.to_move, []
        waiting = [conn for conn in self.connections
                   if conn.movable and conn.idle_waiter is not None]
        moves = [ConnectionMove(self, conn) for conn in queued + waiting]
        if not moves:
            return 0
        moved = hand_over(self.worker.ctx.master_pid, targets, moves)
        log.info("handed %d idle connection(s) over to the new generation", moved)
        return moved

    def drop_queued(self) -> None:
        """No worker to move them to after all: close what stopped to move."""
        queued, self.to_move = self.to_move, []
        for conn in queued:
            conn.sock.close()
            self.release_slot(conn.holds_capacity)

    def adopt(self, fds, state, read_ahead, _unused) -> None:
        """Serve a connection a retiring sibling handed over, from its next request on.

        ``read_ahead`` is always empty: a connection moves only when nothing of its next
        request has been read (whatever the client sent waits in the socket).
        """
        sock = gsocket.socket(fileno=fds[0])
        listen = self.worker.listens.get(tuple(state.get("listen", ())))
        if listen is None or read_ahead:
            sock.close()               # its listen is gone: the client reconnects
            return
        # Retiring already (reloads in quick succession)?  Served all the same: it moves
        # on to the next generation, or ends with Connection: close on a full stop.
        holds = self.adopt_slot()
        client = tuple(state.get("client", ("", 0)))
        gevent.spawn(self._serve, sock, client, listen, holds,
                     {"served": int(state.get("served", 0))})


class ConnectionMove:
    """One idle client connection on its way to another worker (see workers.handover)."""

    def __init__(self, acceptor, conn):
        self.acceptor = acceptor
        self.conn = conn

    def export(self):
        """Stop serving the connection (it must still sit between requests) and give
        its socket away; None when it no longer can move."""
        conn = self.conn
        if not conn.hand_off():
            return None
        fd = conn.sock.detach()
        state = {"kind": "connection", "listen": list(conn.listen_key),
                 "client": [conn.client_ip, conn.client_port], "served": conn.served}
        return [fd], state, b"", b""

    def handed_over(self) -> None:
        self.acceptor.release_slot(self.conn.holds_capacity)

    def keep(self, fds, state, a, b) -> None:
        """The descriptor never left (the receiver is gone): close, as a stop would."""
        os.close(fds[0])
        self.acceptor.release_slot(self.conn.holds_capacity)
