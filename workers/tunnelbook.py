"""The tunnels a worker holds, as its accounting sees them: opened, ended, adopted, moved.

``open`` turns an upgraded connection into a tunnel (workers.tunnel) with a
TunnelRecord as its close hook; ``ended`` undoes its accounting whichever way it ends.
On reload, a retiring worker moves its plain-TCP tunnels to the serving generation
(``hand_over``: one TunnelMove each, through workers.handover) and the receiving worker
``adopt``s them, routing each tunnel's original request again under its own
configuration.  Nothing read is lost: bytes not yet written (tails, bytes parked in a
splice pipe) travel with the state and the receiver writes them first.
"""
from __future__ import annotations

import logging
import time

from gevent import socket as gsocket

from mplb.workers import tunnel
from mplb.workers.handover import hand_over
from mplb.workers.tunnel import USE_SPLICE, Tunnel
from mplb.workers.tunnelrecord import TunnelRecord
from mplb.workers.wsframes import CLOSE_GOING_AWAY, OP_CLOSE, build_frame, close_payload

log = logging.getLogger("mplb.worker")


class TunnelBook:
    """Opening, ending, adopting and handing over the tunnels of one worker."""

    def __init__(self, worker):
        self.worker = worker
        self.accounting = worker.accounting
        self.acceptor = worker.acceptor

    def open(self, conn, request, backend_sock, pick, balancer, settings, client_pending,
             backend_pending, bytes_in, bytes_out) -> None:
        """Hand both sockets to a tunnel; the connection's slot is freed when it ends."""
        self.accounting.tunnel_opened(pick.server.url, upgrade_request=True)
        record = TunnelRecord.for_request(self, conn, request, pick, balancer, bytes_in,
                                          bytes_out)
        tunnel.start_tunnel(conn.sock, backend_sock, client_pending, backend_pending,
                            settings, record)

    def ended(self, record, reason, backend_failed, tunnel_in, tunnel_out) -> None:
        """A tunnel ended (or moved to another worker): undo its accounting, log it."""
        record.balancer.free(record.pick, backend_failed)
        self.accounting.tunnel_ended(record, reason, tunnel_in, tunnel_out)
        self.acceptor.release_slot(record.holds_capacity)

    # -- reload ------------------------------------------------------------------------
    def hand_over(self, targets) -> None:
        """Retiring: move every movable tunnel to the worker pids ``targets``."""
        moves = [TunnelMove(t) for t in tunnel.movable_tunnels()
                 if getattr(t.on_close, "meta", None) is not None]
        if moves and targets:
            moved = hand_over(self.worker.ctx.master_pid, targets, moves)
            log.info("handed %d tunnel(s) over to the new generation", moved)

    def adopt(self, fds, state, up_tail, down_tail) -> None:
        """Take over a tunnel from a retiring worker, or close it if its server is gone;
        the descriptors are this worker's from the call on, whatever happens."""
        client = gsocket.socket(fileno=fds[0])
        backend = gsocket.socket(fileno=fds[1])
        try:
            self._adopt(client, backend, state, up_tail, down_tail)
        except BaseException:
            client.close()
            backend.close()
            raise

    def _adopt(self, client, backend, state, up_tail, down_tail) -> None:
        config = self.worker.config
        upstream = config.upstreams.get(state.get("upstream", ""))
        index = None
        if upstream is not None:
            for number, server in enumerate(upstream.servers):
                if server.url == state.get("server"):
                    index = number
        if index is None:
            log.info("tunnel client=%s:%s: server %s is gone after reload, closing",
                     *state["client"], state.get("server"))
            close_unadoptable(client, backend, state, down_tail)
            return
        balancer = self.worker.balancers[upstream.name]
        pick = balancer.adopt(index)
        settings = self._settings_for(state, upstream.name)
        self.accounting.tunnel_opened(pick.server.url, upgrade_request=False)
        holds = self.acceptor.adopt_slot()
        record = TunnelRecord.from_state(self, pick, balancer, holds, state)
        adopt_tunnel(client, backend, dict(state, client_rx=0, client_tx=0), up_tail,
                     down_tail, settings, record)

    def _settings_for(self, state, upstream_name):
        """Route the tunnel's original request under the new configuration."""
        worker = self.worker
        key = tuple(state.get("listen", ()))
        if key in worker.router.names:
            url = state.get("url", "/")
            path = url.split("?", 1)[0] if url.startswith("/") else "/"
            vserver, location = worker.router.route(key, state.get("host", ""), path)
            if location is not None and location.upstream == upstream_name:
                return location.settings
            return vserver.settings
        return worker.config.servers[0].settings if worker.config.servers else None


class TunnelMove:
    """One tunnel on its way to another worker (a move, see workers.handover)."""

    def __init__(self, live_tunnel):
        self.tunnel = live_tunnel

    def export(self):
        """Stop relaying: the two fds, the state (identity, counters, frame tracking)
        and the bytes not yet written each way."""
        if not self.tunnel.movable():
            return None
        meta = self.tunnel.on_close.meta()
        client_fd, backend_fd, relay, up_tail, down_tail = self.tunnel.export()
        return [client_fd, backend_fd], dict(meta, kind="tunnel", **relay), up_tail, down_tail

    def handed_over(self) -> None:
        self.tunnel.handed_over()

    def keep(self, fds, state, up_tail, down_tail) -> None:
        """The descriptors never left: carry on relaying here."""
        on_close, self.tunnel.on_close = self.tunnel.on_close, None
        adopt_tunnel(gsocket.socket(fileno=fds[0]), gsocket.socket(fileno=fds[1]), state,
                     up_tail, down_tail, self.tunnel.settings, on_close)


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
    """Carry on a tunnel exported by ``Tunnel.export`` in another worker (or this one).

    Framing continues only when both the old tunnel tracked frames and the new settings
    ask for it: a tunnel that was never tracked has no known frame boundary.
    """
    framing = bool(state.get("trackers")) and bool(settings.proxy_websocket_keepalive)
    relay = Tunnel(client_sock, backend_sock, settings, on_close, USE_SPLICE, framing=framing)
    if framing:
        relay.up.tracker.restore(state["trackers"][0])
        relay.down.tracker.restore(state["trackers"][1])
    relay.client.rx, relay.client.tx = state.get("client_rx", 0), state.get("client_tx", 0)
    now = time.monotonic()
    for flow, tail in ((relay.up, up_tail), (relay.down, down_tail)):
        if tail:
            flow.tail = bytes(tail)
            flow.stall = now
    relay.start(b"", b"")
    return relay
