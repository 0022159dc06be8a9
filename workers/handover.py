"""Handover on reload: live tunnels and idle keep-alive connections move to the new
generation, so nothing drops.

Every worker listens on an abstract Unix socket named after the master and its own pid.
A retiring worker sends each movable item (a plain-TCP tunnel: workers.tunnelbook; a
client connection between requests: workers.acceptor) to a worker of the serving
generation: its file descriptors (SCM_RIGHTS) with a JSON state naming its kind and
what the receiver needs to carry on under its own configuration.  The socket is
abstract (any local process may connect to it, or bind a name first), so both ends
check the other's credentials (SO_PEERCRED): a receiver takes descriptors only from a
child of our master, and a sender gives them only to the very worker it meant, itself
a child of our master.

Wire format, per item: ``sendmsg`` of a 12-byte header (three big-endian uint32: state
length, then the lengths of two byte strings the kind defines) carrying the fds, then
the JSON state and the two strings; the receiver answers ``k``.  The descriptors, once
sent, belong to the receiver: it adopts the item, or closes it.

A move (the sender's side of one item) offers ``export() -> (fds, state, a, b)``,
``handed_over()`` (the receiver owns it now) and ``keep(fds, state, a, b)`` (the
descriptors never left: carry on here, or close).
"""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct

import gevent
from gevent import socket as gsocket

log = logging.getLogger("mplb.handover")

HEADER = struct.Struct(">III")
MAX_STATE = 65536
MAX_TAIL = 4 * 1024 * 1024
MAX_FDS = 2
IO_TIMEOUT = 5.0


def socket_name(master_pid: int, worker_pid: int) -> bytes:
    return f"\0mplb.{master_pid}.handover.{worker_pid}".encode()


def peer_pid(sock) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return -1


def successor_pids(shared, generation) -> list:
    """Pids of the serving generation's workers, when it is newer than ``generation``.

    Never a rolled-back generation's leftover, and never a sibling that is retiring
    too (on QUIT the whole serving generation retires: nothing moves).
    """
    if shared is None or shared.generation <= generation:
        return []
    return [w["pid"] for w in shared.workers()
            if w["generation"] == shared.generation and w["pid"] != os.getpid()]


class HandoverServer:
    """Receives items from retiring sibling workers (runs in every worker).

    ``receivers`` maps a kind to ``(number of fds, adopt(fds, state, a, b))``.
    """

    def __init__(self, master_pid, receivers):
        self.receivers = receivers
        self.master_pid = master_pid
        self.sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(socket_name(master_pid, os.getpid()))
        self.sock.listen(64)
        self.greenlet = gevent.spawn(self._accept_loop)

    def close(self):
        self.greenlet.kill(block=False)
        self.sock.close()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            pid = peer_pid(conn)
            parent = parent_of(pid)
            if parent != self.master_pid:
                if parent == -1:       # a sibling that had nothing for us and has exited
                    log.debug("closed a handover connection from pid %d, which has exited",
                              pid)
                else:
                    log.warning("refused a handover from pid %d (not our sibling)", pid)
                conn.close()
                continue
            gevent.spawn(self._serve, conn)

    def _serve(self, conn):
        conn.settimeout(IO_TIMEOUT)
        try:
            while self._receive_one(conn):
                pass
        except (OSError, ValueError) as exc:
            log.error("handover connection failed: %s", exc)
        finally:
            conn.close()

    def _receive_one(self, conn) -> bool:
        fds = array.array("i")
        try:
            data, ancdata, _, _ = conn.recvmsg(HEADER.size,
                                               socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except socket.timeout:
            return True
        if not data:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        try:
            if len(data) < HEADER.size:
                data += _recv_exact(conn, HEADER.size - len(data))
            state_len, a_len, b_len = HEADER.unpack(data)
            if state_len > MAX_STATE or a_len > MAX_TAIL or b_len > MAX_TAIL:
                raise ValueError("malformed handover")
            body = _recv_exact(conn, state_len + a_len + b_len)
            state = json.loads(body[:state_len])
            receiver = self.receivers.get(state.get("kind")) if isinstance(state, dict) \
                else None
            if receiver is None or len(fds) != receiver[0]:
                raise ValueError("malformed handover")
            a, b = body[state_len:state_len + a_len], body[state_len + a_len:]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            receiver[1](list(fds), state, a, b)
        except Exception:        # noqa: BLE001 - one bad item never ends the channel
            log.exception("adopting a handed-over %s failed; it was closed", state["kind"])
        conn.sendall(b"k")
        return True


def _recv_exact(conn, size) -> bytes:
    chunks = []
    while size > 0:
        chunk = conn.recv(min(size, 262144))
        if not chunk:
            raise ValueError("handover peer closed early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def hand_over(master_pid, targets, moves) -> int:
    """Send ``moves`` to the worker pids in ``targets`` (round robin); return how many
    the receivers now own."""
    channels = _open_channels(master_pid, targets)
    if not channels:
        return 0
    moved = 0
    try:
        for number, move in enumerate(moves):
            if not channels:
                break                       # every receiver failed: retried next round
            channel = channels[number % len(channels)]
            sent, usable = _send_one(channel, move)
            moved += sent
            if not usable:                  # a dead receiver: stop feeding it
                channels.remove(channel)
                channel.close()
    finally:
        for channel in channels:
            channel.close()
    return moved


def _open_channels(master_pid, targets) -> list:
    """A connected handover socket to each reachable worker of ``targets``."""
    channels = []
    for pid in targets:
        sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(IO_TIMEOUT)
        try:
            sock.connect(socket_name(master_pid, pid))
        except OSError as exc:
            log.warning("cannot reach worker %d for a handover: %s", pid, exc)
            sock.close()
            continue
        listener = peer_pid(sock)
        if listener != pid or parent_of(listener) != master_pid:
            log.warning("the handover socket of worker %d is held by pid %d, not a worker "
                        "of this master: nothing sent to it", pid, listener)
            sock.close()
            continue
        channels.append(sock)
    return channels


def _send_one(channel, move) -> tuple:
    """Send one item: ``(moved, channel still usable)``; moved once the receiver owns it.

    Ownership passes with the descriptors: once ``sendmsg`` has carried them, the
    receiver may be serving already, so this worker lets go whatever happens next (a
    missing answer included).  Carrying on here too would make two processes serve one
    socket.  Only an item whose descriptors never left is kept.
    """
    exported = move.export()
    if exported is None:
        return False, True
    fds, state, a, b = exported
    body = json.dumps(state).encode()
    header = HEADER.pack(len(body), len(a), len(b))
    try:
        sent = channel.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
    except OSError as exc:
        log.error("handover of a %s failed, keeping it: %s", state["kind"], exc)
        move.keep(fds, state, a, b)
        return False, False
    for fd in fds:
        os.close(fd)
    move.handed_over()
    try:
        channel.sendall(header[sent:] + body + a + b)
        answer = channel.recv(1)
    except OSError as exc:
        answer = f"no answer ({exc})"
    if answer != b"k":
        log.error("handover: the receiving worker did not confirm (%s); the %s is in its "
                  "hands", answer, state["kind"])
        return True, False
    return True, True
