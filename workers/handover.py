"""Tunnel handover on reload: live tunnels move to the new generation, nothing drops.

Every worker listens on an abstract Unix socket named after the master and its own pid.
A retiring worker stops relaying each plain-TCP tunnel (``Tunnel.export``), then sends
both file descriptors (SCM_RIGHTS) with the relay state (bytes not yet written, frame
tracking, counters, server identity) to a worker of the serving generation, which
carries on under its configuration.  The socket is abstract (any local process may
connect to it, or bind a name first), so both ends check the other's credentials
(SO_PEERCRED): a receiver takes descriptors only from a child of our master, and a
sender gives them only to the very worker it meant, itself a child of our master.

Wire format, per tunnel: ``sendmsg`` of a 12-byte header (three big-endian uint32:
state length, client-to-backend tail length, backend-to-client tail length) carrying the
two fds, then the JSON state and the two tails; the receiver answers ``k``.  The
descriptors, once sent, belong to the receiver: it adopts the tunnel, or closes it
(its server left the configuration, or the state did not arrive whole).
"""
from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import time

import gevent
from gevent import socket as gsocket

from mplb.workers.tunnel import USE_SPLICE, Tunnel
from mplb.workers.wsframes import CLOSE_GOING_AWAY, OP_CLOSE, build_frame, close_payload

log = logging.getLogger("mplb.handover")

HEADER = struct.Struct(">III")
MAX_STATE = 65536
MAX_TAIL = 4 * 1024 * 1024
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


class HandoverServer:
    """Receives tunnels from retiring sibling workers (runs in every worker)."""

    def __init__(self, worker, master_pid):
        self.worker = worker
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
            if parent_of(pid) != self.master_pid:
                log.warning("refused a tunnel handover from pid %d (not our sibling)", pid)
                conn.close()
                continue
            gevent.spawn(self._serve, conn)

    def _serve(self, conn):
        conn.settimeout(IO_TIMEOUT)
        try:
            while self._receive_one(conn):
                pass
        except (OSError, ValueError) as exc:
            log.error("tunnel handover connection failed: %s", exc)
        finally:
            conn.close()

    def _receive_one(self, conn) -> bool:
        fds = array.array("i")
        try:
            data, ancdata, _, _ = conn.recvmsg(HEADER.size, socket.CMSG_SPACE(2 * fds.itemsize))
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
            state_len, up_len, down_len = HEADER.unpack(data)
            if len(fds) != 2 or state_len > MAX_STATE or up_len > MAX_TAIL \
                    or down_len > MAX_TAIL:
                raise ValueError("malformed tunnel handover")
            body = _recv_exact(conn, state_len + up_len + down_len)
            state = json.loads(body[:state_len])
            up_tail = body[state_len:state_len + up_len]
            down_tail = body[state_len + up_len:]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        try:
            self.worker.tunnels.adopt(fds[0], fds[1], state, up_tail, down_tail)
        except Exception:        # noqa: BLE001 - one bad tunnel never ends the channel
            log.exception("adopting a handed-over tunnel failed; it was closed")
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


def hand_over_tunnels(master_pid, targets, tunnels) -> int:
    """Move ``tunnels`` to the worker pids in ``targets`` (round robin); return how many."""
    channels = _open_channels(master_pid, targets)
    if not channels:
        return 0
    moved = 0
    try:
        for number, tunnel in enumerate(tunnels):
            if not channels:
                break                       # every receiver failed: retried next round
            if not tunnel.movable():
                continue
            channel = channels[number % len(channels)]
            sent, usable = _send_one(channel, tunnel)
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
            log.warning("cannot reach worker %d for tunnel handover: %s", pid, exc)
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


def _send_one(channel, tunnel) -> tuple:
    """Send one tunnel: ``(moved, channel still usable)``; moved once the receiver owns it.

    Ownership passes with the descriptors: once ``sendmsg`` has carried them, the
    receiver may be relaying already, so this worker lets go whatever happens next (a
    missing answer included).  Resuming here too would make two processes relay one
    socket.  Only a tunnel whose descriptors never left is resumed locally.
    """
    meta_of = getattr(tunnel.on_close, "meta", None)
    if meta_of is None:
        return False, True
    meta = meta_of()
    client_fd, backend_fd, relay, up_tail, down_tail = tunnel.export()
    state = dict(meta, **relay)
    body = json.dumps(state).encode()
    header = HEADER.pack(len(body), len(up_tail), len(down_tail))
    try:
        sent = channel.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [client_fd, backend_fd]))])
    except OSError as exc:
        log.error("tunnel handover failed, keeping the tunnel: %s", exc)
        _resume_locally(tunnel, client_fd, backend_fd, state, up_tail, down_tail)
        return False, False
    os.close(client_fd)
    os.close(backend_fd)
    tunnel.handed_over()
    try:
        channel.sendall(header[sent:] + body + up_tail + down_tail)
        answer = channel.recv(1)
    except OSError as exc:
        answer = f"no answer ({exc})"
    if answer != b"k":
        log.error("tunnel handover: the receiving worker did not confirm (%s); the tunnel "
                  "is in its hands", answer)
        return True, False
    return True, True


def _resume_locally(tunnel, client_fd, backend_fd, state, up_tail, down_tail):
    on_close, tunnel.on_close = tunnel.on_close, None
    adopt_tunnel(gsocket.socket(fileno=client_fd), gsocket.socket(fileno=backend_fd), state,
                 up_tail, down_tail, tunnel.settings, on_close)


def close_unadoptable(client_sock, backend_sock, state: dict, down_tail: bytes) -> None:
    """A handed-over tunnel whose server left the configuration: say 1001 and close.

    The Close frame goes to the client only when its stream is known to sit at a frame
    boundary (framing was tracked); otherwise a TCP close is all that is safe.
    """
    trackers = state.get("trackers")
    toward_client = trackers[1] if trackers else None
    try:
        client_sock.settimeout(1.0)
        if down_tail:
            client_sock.sendall(down_tail)
        if toward_client and toward_client["need"] == 0 and not toward_client["head"] \
                and toward_client["held"] is None and not toward_client["close_seen"]:
            client_sock.sendall(build_frame(OP_CLOSE, close_payload(CLOSE_GOING_AWAY), False))
    except OSError:
        pass
    finally:
        client_sock.close()
        backend_sock.close()


def adopt_tunnel(client_sock, backend_sock, state: dict, up_tail: bytes, down_tail: bytes,
                 settings, on_close) -> Tunnel:
    """Carry on a tunnel exported by ``Tunnel.export`` in another worker.

    Framing continues only when both the old tunnel tracked frames and the new settings
    ask for it: a tunnel that was never tracked has no known frame boundary.
    """
    framing = bool(state.get("trackers")) and bool(settings.proxy_websocket_keepalive)
    tunnel = Tunnel(client_sock, backend_sock, settings, on_close, USE_SPLICE,
                    framing=framing)
    if framing:
        tunnel.up.tracker.restore(state["trackers"][0])
        tunnel.down.tracker.restore(state["trackers"][1])
    tunnel.client.rx, tunnel.client.tx = state.get("client_rx", 0), state.get("client_tx", 0)
    now = time.monotonic()
    for flow, tail in ((tunnel.up, up_tail), (tunnel.down, down_tail)):
        if tail:
            flow.tail = bytes(tail)
            flow.stall = now
    tunnel.start(b"", b"")
    return tunnel
