"""Upgrade tunnels (WebSocket): callback-driven byte relay on the gevent loop.

Why callbacks and not two greenlets per tunnel: thousands of idle tunnels must cost
almost nothing.  A tunnel is a small object with one libev io watcher per socket;
reads go into ONE buffer shared by every tunnel of the worker (callbacks run one at a
time) and are sent on at once.  Only when a peer's send would block is the unsent tail
kept (bounded by the read size) and the other side's reading paused (backpressure)
until it drains.  Bulk flows move through a kernel pipe (workers.tunnelsplice); what
happens when nothing moves (timeouts, keepalive pings) is workers.tunnelsweep's.

A tunnel ends as soon as either side closes or resets (nginx does the same): the bytes
already read from that side are passed on, then both sockets close and the tunnel's
accounting is released at once.  A client that keeps its socket open after the backend
closed never keeps a tunnel, its counters or a graceful stop alive.

With keepalive off the tunnel never parses frames; with it on, workers.wsframes
tracks frame boundaries so mplb can inject Ping/Close frames between frames.
"""
from __future__ import annotations

import logging
import _socket
import ssl
import time

import gevent

from mplb.workers import tunnelsplice as splice
from mplb.workers.tunnelsweep import ensure_sweep, worker_token
from mplb.workers.wsframes import (CLOSE_GOING_AWAY, OP_CLOSE, FrameTracker, ProtocolError,
                                   build_frame, close_payload)

log = logging.getLogger("mplb.tunnel")

READ, WRITE = 1, 2
BUF_SIZE = 64 * 1024            # one shared read buffer per worker
READS_PER_WAKEUP = 8            # fairness: at most 8 reads per io callback
SPLICE_MIN = BUF_SIZE           # a read that fills the buffer marks a flow as bulk
USE_SPLICE = True               # scripts/bench_relay.py: splice wins for bulk flows

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError)
_buf = bytearray(BUF_SIZE)
_view = memoryview(_buf)
_live: set = set()              # live tunnels of this worker process


def start_tunnel(client_sock, backend_sock, client_pending: bytes, backend_pending: bytes,
                 settings, on_close, *, use_splice: bool | None = None) -> "Tunnel":
    """Take ownership of both sockets and relay until either side is done."""
    tunnel = Tunnel(client_sock, backend_sock, settings, on_close,
                    USE_SPLICE if use_splice is None else use_splice)
    tunnel.start(client_pending, backend_pending)
    return tunnel


def live_tunnel_count() -> int:
    return len(_live)


def movable_tunnels() -> list:
    """Live tunnels that can be handed to another worker (plain TCP, both ways open)."""
    return [t for t in _live if t.movable()]


def close_all_tunnels(reason: str = "shutdown", code: int = CLOSE_GOING_AWAY) -> int:
    """Close every live tunnel of this worker (graceful-stop deadline, fast stop)."""
    tunnels = list(_live)
    for tunnel in tunnels:
        tunnel.close(reason, code=code, best_effort=True)
    return len(tunnels)


class _End:
    """One side of the tunnel: its socket, io watcher, and keepalive state."""

    __slots__ = ("name", "sock", "ssl", "watcher", "events", "rx", "tx",
                 "last_rx", "ping_at", "masked")

    def __init__(self, name, sock, masked, now):
        self.name = name
        self.masked = masked          # frames we inject toward this side are masked
        self.ssl = getattr(sock, "_sslobj", None)
        if self.ssl is not None:      # TLS: keep the SSL object, drive it non-blocking
            sock.settimeout(0.0)
            self.sock = sock
        else:                         # plain: drop gevent's wrapper and its watchers
            self.sock = _socket.socket(fileno=sock.detach())   # unpatched: no watchers
            self.sock.setblocking(False)
        self.watcher = None
        self.events = 0
        self.rx = self.tx = 0
        self.last_rx = now            # one float for both ends until either receives
        self.ping_at = 0.0

    @property
    def fd(self) -> int:
        """The socket's descriptor (asked for when a watcher or a splice starts; not
        kept: an int object per end costs every idle tunnel)."""
        return self.sock.fileno()

    def recv_into(self, view) -> int:
        if self.ssl is None:
            return self.sock.recv_into(view)
        try:
            return self.ssl.read(len(view), view)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return 0

    def send(self, data) -> int:
        n = self.sock.send(data) if self.ssl is None else self.ssl.write(data)
        self.tx += n
        return n

    def has_buffered(self) -> bool:
        return self.ssl is not None and self.ssl.pending() > 0


class _Flow:
    """One direction: bytes read from `src` go to `dst`."""

    __slots__ = ("src", "dst", "tail", "eof", "stall", "tracker", "pipe",
                 "inpipe", "pipe_used", "splice")

    def __init__(self, src, dst, tracker, splice):
        self.src, self.dst = src, dst
        self.tail = None              # unsent bytes waiting for dst to drain
        self.eof = False              # src sent EOF (or failed)
        self.stall = 0.0              # when the pending write last made progress
        self.tracker = tracker
        self.splice = splice          # allowed to use a pipe for bulk moves
        self.pipe = None              # (r, w) created lazily for bulk flows
        self.inpipe = 0
        self.pipe_used = 0.0

    def blocked(self) -> bool:
        return self.tail is not None or self.inpipe > 0


class Tunnel:
    """A live upgrade tunnel; see module docstring."""

    __slots__ = ("client", "backend", "up", "down", "settings", "on_close", "closed",
                 "reason", "backend_failed", "framing", "ending", "seq", "__weakref__")

    def __init__(self, client_sock, backend_sock, settings, on_close, use_splice,
                 framing=None):
        self.settings = settings
        self.on_close = on_close
        self.framing = bool(settings.proxy_websocket_keepalive) if framing is None else framing
        now = time.monotonic()
        self.client = _End("client", client_sock, False, now)
        self.backend = _End("backend", backend_sock, True, now)
        splice_ok = use_splice and not self.framing and splice.AVAILABLE
        prefix = worker_token() if self.framing else None
        self.up = _Flow(self.client, self.backend,
                        FrameTracker(prefix) if self.framing else None,
                        splice_ok and self.client.ssl is None and self.backend.ssl is None)
        self.down = _Flow(self.backend, self.client,
                          FrameTracker(prefix) if self.framing else None,
                          self.up.splice)
        self.closed = False
        self.reason = None
        self.backend_failed = False
        self.ending = False           # one side closed: flushing toward the other, then close
        self.seq = 0

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, client_pending: bytes, backend_pending: bytes) -> None:
        _live.add(self)
        ensure_sweep(self.settings, _live)
        loop = gevent.get_hub().loop
        for end, cb in ((self.client, _on_client_event), (self.backend, _on_backend_event)):
            end.watcher = loop.io(end.fd, READ)
            end.watcher.start(cb, self, pass_events=True)
            end.events = READ
        for flow, data in ((self.up, client_pending), (self.down, backend_pending)):
            if data and not self.closed:
                flow.src.rx += len(data)
                self._forward(flow, memoryview(data), time.monotonic())
        if not self.closed:
            self.rearm()
        for end, flow in ((self.client, self.up), (self.backend, self.down)):
            if end.has_buffered() and not self.closed:
                # TLS bytes already decrypted: no fd event will announce them.
                gevent.get_hub().loop.run_callback(self._handle, end, None, flow, READ)

    def close(self, reason: str, code: int | None = None, backend_failed: bool = False,
              best_effort: bool = False) -> None:
        """Close both sides once; with `code`, first say Close(code) where it is safe."""
        if self.closed:
            return
        self.closed = True
        _live.discard(self)
        reason = self.reason or reason
        self.backend_failed = self.backend_failed or backend_failed
        if code:
            self._say_close(self.down, code, best_effort)
            self._say_close(self.up, code, best_effort)
        for flow in (self.up, self.down):
            splice.close_pipe(flow)
            flow.tail = None
        for end in (self.client, self.backend):
            if end.watcher is not None:
                end.watcher.stop()
                end.watcher.close()
                end.watcher = None
            _drain_and_close(end)
        on_close, self.on_close = self.on_close, None
        try:
            on_close(reason, self.backend_failed, self.client.rx, self.client.tx)
        except Exception:  # the tunnel is gone either way; keep the loop alive
            log.exception("tunnel on_close callback failed")

    # ---- handover to another worker (reload) ---------------------------------------------
    def movable(self) -> bool:
        return (not self.closed and not self.ending and self.client.ssl is None
                and self.backend.ssl is None)

    def export(self):
        """Stop relaying; return ``(client_fd, backend_fd, state, up_tail, down_tail)``.

        Nothing read is lost: bytes not yet written (tails, and bytes parked in a splice
        pipe) travel with the state and the receiver writes them first.  The caller owns
        the two fds and must call ``handed_over`` (or ``close``) afterwards.
        """
        for end in (self.client, self.backend):
            if end.watcher is not None:
                end.watcher.stop()
                end.watcher.close()
                end.watcher = None
        _live.discard(self)
        tails = []
        for flow in (self.up, self.down):
            data = (flow.tail or b"") + (splice.take_pending(flow) if flow.pipe else b"")
            flow.tail = None
            tails.append(bytes(data))
        state = {"client_rx": self.client.rx, "client_tx": self.client.tx,
                 "trackers": [self.up.tracker.export(), self.down.tracker.export()]
                 if self.framing else None}
        client_fd = self.client.sock.detach()
        backend_fd = self.backend.sock.detach()
        self.closed = True
        return client_fd, backend_fd, state, tails[0], tails[1]

    def handed_over(self) -> None:
        """The sockets now live in another worker: release this worker's accounting."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close("handover", False, self.client.rx, self.client.tx)

    def _say_close(self, flow, code, best_effort):
        """Send Close(code) toward flow.dst only between frames (or best effort if unparsed)."""
        if flow.blocked():
            return
        if flow.tracker is not None:
            if flow.tracker.close_seen or not flow.tracker.at_boundary():
                return
        elif not best_effort:
            return
        try:
            flow.dst.send(build_frame(OP_CLOSE, close_payload(code), flow.dst.masked))
        except (OSError, ValueError):
            pass

    def write_failed(self, end, exc) -> None:
        """Writing to ``end`` failed: nothing more can reach it, close at once."""
        log.debug("tunnel %s error: %s", end.name, exc)
        if end is self.backend:
            self.close("backend error", code=CLOSE_GOING_AWAY if self.framing else None,
                       backend_failed=True)
        else:
            self.close("client error")

    def _read_failed(self, flow, exc) -> None:
        """Reading ``flow.src`` failed (a reset): end like an EOF, still passing on what
        was read from it before."""
        log.debug("tunnel %s error: %s", flow.src.name, exc)
        if self.reason is None:
            self.reason = "backend error" if flow.src is self.backend else "client error"
        if flow.src is self.backend:
            self.backend_failed = True
        self._on_eof(flow)

    # ---- io callbacks (_on_client_event, _on_backend_event) ----------------------------
    def _handle(self, end, inflow, outflow, revents):
        if self.closed:
            return
        if (revents == READ and outflow.tail is None and outflow.pipe is None
                and outflow.tracker is None and end.ssl is None and outflow.dst.ssl is None
                and not outflow.eof):
            self._relay_once(end, outflow)
            return
        if revents & WRITE and inflow.blocked():
            self._flush(inflow)
        if revents & READ and not self.closed and not outflow.eof and not outflow.blocked():
            self._pump(outflow)
            if not revents & WRITE and not outflow.eof and not outflow.blocked():
                return      # the common case: everything passed on, watchers stay as they are
        if not self.closed:
            self.rearm()

    def _relay_once(self, src, flow) -> None:
        """The common wake-up, inline: one read from a plain socket, sent on at once.

        Small WebSocket messages arrive one per wake-up; this path costs two system
        calls and no further Python calls.  Anything else (EOF, a short write, a full
        buffer that may mean a bulk flow) continues on the general path.
        """
        try:
            n = src.sock.recv_into(_view)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            return self._read_failed(flow, exc)
        if n == 0:
            self._on_eof(flow)
            if not self.closed:
                self.rearm()
            return
        now = time.monotonic()
        src.rx += n
        src.last_rx = now
        dst = flow.dst
        try:
            sent = dst.sock.send(_view[:n])
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            return self.write_failed(dst, exc)
        dst.tx += sent
        if sent == n and n < BUF_SIZE:
            return
        if sent < n:
            flow.tail = bytes(_view[sent:n])
            flow.stall = now
        else:                          # a full buffer: more is probably waiting
            if flow.splice and n == SPLICE_MIN:
                splice.open_pipe(flow, now)
            self._pump(flow)
        if not self.closed:
            self.rearm()

    def rearm(self) -> None:
        """Re-arm watchers: read a side unless backpressured/EOF; write while a tail waits."""
        for end, outflow, inflow in ((self.client, self.up, self.down),
                                     (self.backend, self.down, self.up)):
            want = 0
            if not outflow.eof and not outflow.blocked():
                want = READ
            if inflow.blocked():
                want |= WRITE
            if want != end.events:
                w = end.watcher
                w.stop()
                end.events = want
                if want:
                    w.events = want
                    w.start(_on_client_event if end is self.client else _on_backend_event,
                            self, pass_events=True)

    def _pump(self, flow) -> None:
        """Read what src has and pass it on immediately; stop on backpressure."""
        src = flow.src
        now = time.monotonic()
        for _ in range(READS_PER_WAKEUP):
            if flow.pipe is not None:
                if not self._splice_in(flow, now):
                    return
                continue
            try:
                n = src.recv_into(_view)
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                return self._read_failed(flow, exc)
            if n == 0:
                return self._on_eof(flow)
            src.rx += n
            src.last_rx = now
            if not self._forward(flow, _view[:n], now) or self.closed:
                return
            if n < BUF_SIZE and not src.has_buffered():
                return
            if flow.splice and n == SPLICE_MIN:
                splice.open_pipe(flow, now)
        if src.has_buffered():        # TLS bytes already decrypted: no fd event will come
            gevent.get_hub().loop.run_callback(self._handle, src, None, flow, READ)

    def _forward(self, flow, data, now) -> bool:
        """Send `data` to flow.dst; keep the unsent tail. Returns False when blocked/closed."""
        if flow.tracker is not None:
            try:
                data = flow.tracker.feed(data)
            except ProtocolError as exc:
                self.write_failed(flow.src, exc)
                return False
            if flow.tracker.pongs:
                flow.tracker.pongs = 0
                flow.src.ping_at = 0.0
            if not data:
                return True
        try:
            sent = flow.dst.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.write_failed(flow.dst, exc)
            return False
        if sent == len(data):
            return True
        flow.tail = bytes(data[sent:])
        flow.stall = now
        return False

    def _flush(self, flow) -> None:
        """dst became writable: push the tail (or the pipe) and resume reading when empty."""
        dst = flow.dst
        try:
            if flow.inpipe:
                n = splice.pour(flow)
            else:
                n = dst.send(flow.tail)
                flow.tail = flow.tail[n:] or None
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            return self.write_failed(dst, exc)
        if n:
            flow.stall = time.monotonic()
        if not flow.blocked() and flow.eof:
            self._finish(flow)

    def _splice_in(self, flow, now) -> bool:
        """One bulk move through the flow's pipe; False when blocked, ended or failed."""
        outcome, exc = splice.splice_through(flow, BUF_SIZE * 4, now)
        if outcome == splice.MOVED:
            return True
        if outcome == splice.EOF:
            self._on_eof(flow)
        elif outcome == splice.READ_FAILED:
            self._read_failed(flow, exc)
        elif outcome == splice.WRITE_FAILED:
            self.write_failed(flow.dst, exc)
        return False

    # ---- the end -----------------------------------------------------------------------
    def _on_eof(self, flow) -> None:
        """``flow.src`` closed (or reset): finish passing on its bytes, then end."""
        flow.eof = True
        self.ending = True
        if self.reason is None:
            self.reason = "client closed" if flow.src is self.client else "backend closed"
        if not flow.blocked():
            self._finish(flow)

    def _finish(self, flow) -> None:
        """Everything ``flow.src`` sent reached ``flow.dst``: say goodbye and close both.

        With framing, a client whose backend vanished without a Close frame gets
        Close(1001) between frames; then both sockets close (a FIN each, not a reset).
        """
        if flow is self.down and self.framing:
            self._say_close(flow, CLOSE_GOING_AWAY, False)
        self.close(self.reason)

    def send_raw(self, flow, frame, now) -> bool:
        """Send a frame mplb injects (no tracking); a partial send becomes the tail."""
        try:
            sent = flow.dst.send(frame)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.write_failed(flow.dst, exc)
            return False
        if sent < len(frame):
            flow.tail = frame[sent:]
            flow.stall = now
        return True


def _on_client_event(revents, tunnel) -> None:
    """The client's watcher fired.  Module functions with the tunnel as the watcher's
    argument, not bound methods: no method object per watcher (idle tunnels are many)."""
    tunnel._handle(tunnel.client, tunnel.down, tunnel.up, revents)


def _on_backend_event(revents, tunnel) -> None:
    tunnel._handle(tunnel.backend, tunnel.up, tunnel.down, revents)


def _drain_and_close(end) -> None:
    """Read what is queued (bounded) before close so the kernel sends FIN, not RST."""
    try:
        for _ in range(4):
            if end.recv_into(_view) <= 0:
                break
    except (OSError, ValueError):
        pass
    try:
        end.sock.close()
    except OSError:
        pass
