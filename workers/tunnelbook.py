"""The tunnels a worker holds, as its accounting sees them: opened, ended, adopted, moved.

``open`` turns an upgraded connection into a tunnel (workers.tunnel) with a
TunnelRecord as its close hook; ``ended`` undoes its accounting whichever way it ends.
On reload, a retiring worker moves its tunnels to the serving generation
(``hand_over``, workers.handover) and the receiving worker ``adopt``s them, routing
each tunnel's original request again under its own configuration.
"""
from __future__ import annotations

import logging
import os

from gevent import socket as gsocket

from mplb.workers import tunnel
from mplb.workers.handover import adopt_tunnel, close_unadoptable, hand_over_tunnels
from mplb.workers.tunnelrecord import TunnelRecord

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
    def hand_over(self) -> None:
        """Retiring: move every movable tunnel to the workers of the serving generation."""
        movable = tunnel.movable_tunnels()
        if not movable:
            return
        targets = self._targets()
        if targets:
            moved = hand_over_tunnels(self.worker.ctx.master_pid, targets, movable)
            log.info("handed %d tunnel(s) over to the new generation", moved)

    def _targets(self) -> list:
        """Pids of the serving generation's workers, when it is newer than this one.

        Never a rolled-back generation's leftover, and never a sibling that is retiring
        too (on QUIT the whole serving generation retires: tunnels stay until they end).
        """
        worker = self.worker
        shared = worker.shared
        if shared is None or shared.generation <= worker.ctx.generation:
            return []
        return [w["pid"] for w in shared.workers()
                if w["generation"] == shared.generation and w["pid"] != os.getpid()]

    def adopt(self, client_fd, backend_fd, state, up_tail, down_tail) -> None:
        """Take over a tunnel from a retiring worker, or close it if its server is gone;
        the descriptors are this worker's from the call on, whatever happens."""
        client = gsocket.socket(fileno=client_fd)
        backend = gsocket.socket(fileno=backend_fd)
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
