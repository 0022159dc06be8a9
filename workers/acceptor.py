"""Accepting client connections, at most worker_connections at a time.

The acceptor owns the worker's listen sockets and its connection slots: a connection
holds a slot from accept until it closes, until the tunnel it became ends, or until it
moves to another worker.  Past ``worker_connections`` it stops accepting until a slot
frees.  A plain listen accepts in its watcher's callback and serves each connection on
the fast path (workers.fastpath: a Lane, no greenlet); a TLS listen accepts in a
greenlet that shakes hands and serves the connection there (workers.http).  A Lane
hands its connection to a greenlet whenever the fast path does not cover what comes
(``serve_in_greenlet``), and gets it back when the greenlet next waits for a request.

On reload a retiring worker hands every plain-TCP client connection to the new
generation, which adopts it (``adopt``) and serves its next request under the new
configuration.  A connection moves only at a request boundary, with nothing of its
next request read: a busy one stops itself there (``queue_move``), one already waiting
for its next request is stopped in that wait.  The socket moves with whatever the
client has sent meanwhile (still unread in the kernel) and the state the new worker
needs (requests served so far, the listen it came from), so no request is lost or
served twice.
"""
from __future__ import annotations

import _socket
import contextlib
import logging
import os
import socket

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.lock import Semaphore

from mplb.workers.fastpath import Lane
from mplb.workers.handover import hand_over
from mplb.workers.http import ClientConnection

log = logging.getLogger("mplb.worker")

ACCEPTS_PER_WAKEUP = 64        # fairness: a burst of connections yields to the others


class Acceptor:
    """The worker's listen sockets, connection slots and live client connections."""

    def __init__(self, worker):
        self.worker = worker
        self.accounting = worker.accounting
        self.capacity = Semaphore(worker.config.worker_connections)
        self.connections = set()        # ClientConnections served by a greenlet
        self.lanes = set()              # ClientConnections' Lanes (the fast path)
        self.to_move = []               # connections that stopped to move (a reload)
        self.move_ready = Event()       # wakes the drain when one is queued
        self.accepted_since_trim = 0
        self.listeners = []             # (socket, Listen, watcher or None)

    def start(self, listen_sockets) -> None:
        """Accept on the inherited sockets (the descriptors themselves, not dups, so
        closing them on QUIT really stops this worker listening)."""
        loop = gevent.get_hub().loop
        for raw_sock, listen in listen_sockets.values():
            if listen.key in self.worker.tls or not self.worker.fast_path:
                lsock = gsocket.socket(fileno=raw_sock.detach())
                self.listeners.append((lsock, listen, None))
                gevent.spawn(self._accept_loop, lsock, listen)
                continue
            lsock = _socket.socket(fileno=raw_sock.detach())
            lsock.setblocking(False)
            watcher = loop.io(lsock.fileno(), 1)
            self.listeners.append((lsock, listen, watcher))
            watcher.start(self._on_acceptable, lsock, listen, watcher)

    def stop(self) -> None:
        for lsock, _, watcher in self.listeners:
            if watcher is not None:
                watcher.stop()
            lsock.close()

    # -- plain listens: accept in the callback --------------------------------------------
    def _on_acceptable(self, lsock, listen, watcher):
        worker = self.worker
        for _ in range(ACCEPTS_PER_WAKEUP):
            if worker.stopping:
                return
            if not self.capacity.acquire(blocking=False):
                watcher.stop()                # full: resume when a slot frees
                gevent.spawn(self._resume_accepting, lsock, listen, watcher)
                return
            try:
                sock, addr = lsock._accept()
            except BlockingIOError:
                self.capacity.release()
                return
            except OSError as exc:
                self.capacity.release()
                if not worker.stopping:
                    log.error("accept() failed: %s", exc)
                    watcher.stop()            # EMFILE and friends: back off
                    gevent.spawn_later(0.1, self._restart, lsock, listen, watcher)
                return
            self.accounting.connection_opened()
            self.accepted_since_trim += 1
            raw = _socket.socket(fileno=sock)
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.serve_on_lane(ClientConnection(worker, raw, addr, listen))

    def _resume_accepting(self, lsock, listen, watcher):
        self.capacity.acquire()
        self.capacity.release()
        self._restart(lsock, listen, watcher)

    def _restart(self, lsock, listen, watcher):
        if not self.worker.stopping:
            watcher.start(self._on_acceptable, lsock, listen, watcher)

    def serve_on_lane(self, conn) -> None:
        """Serve ``conn`` (its socket plain and non-blocking) on the fast path."""
        lane = Lane(self, conn, conn.sock)
        conn.greenlet = None
        conn.lane = lane
        self.lanes.add(lane)
        lane.dispatch()

    def lane_closed(self, lane) -> None:
        self.lanes.discard(lane)
        self.release_slot(lane.conn.holds_capacity)

    def serve_in_greenlet(self, conn, step) -> None:
        """A Lane cannot go on: a greenlet serves ``conn`` from ``step`` on."""
        lane = conn.lane
        conn.lane = None
        self.lanes.discard(lane)
        conn.sock = gsocket.socket(fileno=conn.sock.detach())
        gevent.spawn(self._serve_connection, conn, step)

    # -- TLS listens: accept in a greenlet ------------------------------------------------
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
            gevent.spawn(self._serve_accepted, sock, addr, listen)

    def _serve_accepted(self, sock, addr, listen):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = self.worker.tls.get(listen.key)
            if context is not None:
                sock = self._tls_handshake(context, sock, listen)
                if sock is None:
                    self.release_slot(True)
                    return
            conn = ClientConnection(self.worker, sock, addr, listen)
        except Exception:   # noqa: BLE001 - one bad connection never takes the worker down
            log.exception("unexpected error on connection from %s", addr[0])
            sock.close()
            self.release_slot(True)
            return
        self._serve_connection(conn, None)

    def _serve_connection(self, conn, step):
        """The greenlet of one connection, until it ends, moves, or goes back to a Lane."""
        conn.greenlet = gevent.getcurrent()
        self.connections.add(conn)
        try:
            conn.serve(step)
        except Exception:   # noqa: BLE001 - one bad connection never takes the worker down
            log.exception("unexpected error on connection from %s", conn.client_ip)
            conn.sock.close()
        finally:
            self.connections.discard(conn)
            conn.greenlet = None
        if conn.to_lane:
            conn.to_lane = False
            conn.sock = _socket.socket(fileno=conn.sock.detach())
            conn.sock.setblocking(False)
            self.serve_on_lane(conn)
        elif not conn.handed_off:
            self.release_slot(conn.holds_capacity)

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

    # -- slots ------------------------------------------------------------------------------
    def adopt_slot(self) -> bool:
        """A connection or tunnel handed over by a retiring sibling counts here too; it
        holds a slot only if one is free (it is never refused).  Whether it holds one."""
        self.accounting.connection_opened()
        return self.capacity.acquire(blocking=False)

    def release_slot(self, holds_capacity: bool) -> None:
        """A connection, or the tunnel it became, has ended."""
        if holds_capacity:
            self.capacity.release()
        self.accounting.connection_closed()

    # -- stopping and reloading -------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.connections or self.lanes or self.to_move)

    def close_idle(self, stopping_for: float, spare_tls: bool) -> None:
        """Graceful stop: close the connections that sit between requests.

        With ``spare_tls`` (a reload), TLS connections, which cannot move, are left
        to end by themselves: their next response says Connection: close (so no
        request is ever cut off), or their keepalive_timeout ends them.
        """
        for lane in list(self.lanes):
            if lane.idle() and lane.conn.closable_on_shutdown(stopping_for):
                lane.close()
        for conn in list(self.connections):
            if spare_tls and not conn.movable:
                continue
            if conn.closable_on_shutdown(stopping_for):
                conn.sock.close()

    def queue_move(self, conn) -> None:
        """A connection stopped at a request boundary to move: the drain sends it."""
        if conn.lane is not None:
            self.lanes.discard(conn.lane)
            conn.lane = None
        self.to_move.append(conn)
        self.move_ready.set()

    def hand_over_idle(self, targets) -> int:
        """Move to ``targets`` the connections that stopped to move and those waiting
        for their next request."""
        for lane in list(self.lanes):
            if lane.idle():
                lane.move()
        queued, self.to_move = self.to_move, []
        waiting = [conn for conn in self.connections
                   if conn.movable and conn.idle_waiter is not None and not conn.handed_off]
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
            conn.release()

    def adopt(self, fds, state, read_ahead, _unused) -> None:
        """Serve a connection a retiring sibling handed over, from its next request on.

        ``read_ahead`` is always empty: a connection moves only when nothing of its next
        request has been read (whatever the client sent waits in the socket).
        """
        raw = _socket.socket(fileno=fds[0])
        listen = self.worker.listens.get(tuple(state.get("listen", ())))
        if listen is None or read_ahead:
            raw.close()                # its listen is gone: the client reconnects
            return
        # Retiring already (reloads in quick succession)?  Served all the same: it moves
        # on to the next generation, or ends with Connection: close on a full stop.
        holds = self.adopt_slot()
        raw.setblocking(False)
        client = tuple(state.get("client", ("", 0)))
        conn = ClientConnection(self.worker, raw, client, listen)
        conn.holds_capacity = holds
        conn.served = int(state.get("served", 0))
        if self.worker.fast_path:
            self.serve_on_lane(conn)
        else:
            conn.sock = gsocket.socket(fileno=raw.detach())
            gevent.spawn(self._serve_connection, conn, None)


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
        if fd < 0:                       # closed meanwhile (the client left): nothing to move
            self.handed_over()
            return None
        state = {"kind": "connection", "listen": list(conn.listen_key),
                 "client": [conn.client_ip, conn.client_port], "served": conn.served}
        return [fd], state, b"", b""

    def handed_over(self) -> None:
        self.acceptor.release_slot(self.conn.holds_capacity)
        self.conn.release()

    def keep(self, fds, state, a, b) -> None:
        """The descriptor never left (the receiver is gone): close, as a stop would."""
        with contextlib.suppress(OSError):
            os.close(fds[0])
        self.handed_over()               # the slot comes back whatever: a stop must end

