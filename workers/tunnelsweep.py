"""Time for tunnels: timeouts, keepalive pings and idle pipes, on one timer per worker.

The relay in workers.tunnel runs when bytes arrive; this module handles what happens
when they do not.  One periodic timer per worker (its period a quarter of the shortest
timeout in use, between 50 ms and 1 s) walks the live tunnels: a flow stalled past
``proxy_send_timeout`` or a tunnel silent both ways past ``proxy_read_timeout`` is
closed, an idle bulk flow gives its pipe back, and with ``proxy_websocket_keepalive``
a peer silent for ``interval`` gets a Ping between frames; one that answers nothing
within ``proxy_read_timeout`` is dead and the tunnel closes.
"""
from __future__ import annotations

import os
import struct
import time

import gevent

from mplb.workers.tunnelsplice import reclaim_idle
from mplb.workers.wsframes import CLOSE_GOING_AWAY, OP_PING, PING_MAGIC, build_frame

_sweep = {"timer": None, "period": 0.0}
_token = {"pid": 0, "value": b""}


def worker_token() -> bytes:
    """Random per-process ping prefix so chained mplbs never eat each other's pongs."""
    if _token["pid"] != os.getpid():
        _token["pid"], _token["value"] = os.getpid(), PING_MAGIC + os.urandom(4)
    return _token["value"]


def _period_for(settings) -> float:
    shortest = min(settings.proxy_read_timeout, settings.proxy_send_timeout,
                   settings.proxy_websocket_keepalive_interval
                   if settings.proxy_websocket_keepalive else 1e9)
    return max(0.05, min(1.0, shortest / 4))


def ensure_sweep(settings, live) -> None:
    """Run the timer over ``live`` (a set of tunnels) often enough for ``settings``."""
    period = _period_for(settings)
    timer = _sweep["timer"]
    if timer is not None and period >= _sweep["period"]:
        return
    if timer is not None:
        timer.stop()
        timer.close()
    timer = gevent.get_hub().loop.timer(period, period, ref=False)
    timer.start(_run_sweep, live)
    _sweep["timer"], _sweep["period"] = timer, period


def _run_sweep(live) -> None:
    if not live:
        timer = _sweep["timer"]
        _sweep["timer"] = None
        if timer is not None:
            timer.stop()
            timer.close()
        return
    now = time.monotonic()
    for tunnel in list(live):
        if not tunnel.closed:
            sweep_tunnel(tunnel, now)


def sweep_tunnel(tunnel, now: float) -> None:
    """Timeouts, keepalive pings and pipe reclaim for one tunnel."""
    s = tunnel.settings
    for flow in (tunnel.up, tunnel.down):
        if flow.blocked() and now - flow.stall > s.proxy_send_timeout:
            return tunnel.close("send timeout", backend_failed=flow.dst is tunnel.backend)
        reclaim_idle(flow, now)
    last = max(tunnel.client.last_rx, tunnel.backend.last_rx)
    if now - last > s.proxy_read_timeout and not tunnel.ending:
        return tunnel.close("timeout", code=CLOSE_GOING_AWAY if tunnel.framing else None)
    if not tunnel.framing or tunnel.ending:
        return
    for end, toward in ((tunnel.client, tunnel.down), (tunnel.backend, tunnel.up)):
        if end.ping_at:
            if end.last_rx < end.ping_at and now - end.ping_at > s.proxy_read_timeout:
                return tunnel.close("keepalive timeout", code=CLOSE_GOING_AWAY,
                                    backend_failed=end is tunnel.backend)
            if end.last_rx >= end.ping_at:
                end.ping_at = 0.0
        if (not end.ping_at and now - end.last_rx >= s.proxy_websocket_keepalive_interval
                and toward.tracker.at_boundary() and not toward.blocked()):
            _ping(tunnel, end, toward, now)
            if tunnel.closed:
                return


def _ping(tunnel, end, toward, now) -> None:
    """Inject a Ping toward ``end`` (between frames: the caller checked the boundary)."""
    tunnel.seq = (tunnel.seq + 1) & 0xFFFFFFFF
    frame = build_frame(OP_PING, worker_token() + struct.pack(">I", tunnel.seq), end.masked)
    end.ping_at = now
    if tunnel.send_raw(toward, frame, now):
        tunnel.rearm()
