"""What one worker counts and logs: shared-memory counters, the access log, -v lines.

The connection code reports each event once, here; nothing else in a worker writes
counters or log lines about requests and tunnels.  Failures are not counted here: the
balancer's ``free`` records them with the server's health.
"""
from __future__ import annotations

import logging
import time

from mplb.shm.layout import W_CONNECTIONS
from mplb.workers.accesslog import AccessLog

log = logging.getLogger("mplb.worker")


class Accounting:
    """Counters and log lines of one worker (``shared`` may be None: counted nowhere)."""

    def __init__(self, shared, slot, access_log_fd):
        self.shared = shared
        self.slot = slot
        self.access_log = AccessLog(access_log_fd)
        self.logging = self.access_log.enabled      # callers may skip log_access when off
        self._exchange_words = {}     # server url -> its words (see count_exchange)
        # This worker's connection count, one word written on every accept and close.
        self._q = shared.q if shared is not None else [0]
        self._connections = (shared.worker_word(slot, W_CONNECTIONS)
                             if shared is not None else 0)

    # -- client connections ------------------------------------------------------------
    def connection_opened(self) -> None:
        self._q[self._connections] += 1

    def connection_closed(self) -> None:
        self._q[self._connections] -= 1

    # -- requests ----------------------------------------------------------------------
    def count_exchange(self, server, sent_upstream, received_upstream) -> None:
        """One request to ``server`` and its bytes both ways."""
        shared = self.shared
        if shared is None:
            return
        words = self._exchange_words.get(server.url)
        if words is None:
            words = self._exchange_words[server.url] = shared.exchange_words(self.slot,
                                                                             server.url)
        requests, bytes_in, bytes_out, worker_requests = words
        q = shared.q
        q[requests] += 1
        q[bytes_in] += received_upstream
        q[bytes_out] += sent_upstream
        q[worker_requests] += 1

    def log_access(self, conn, request, status, sent, exchange, response) -> None:
        if self.access_log.enabled:
            server = getattr(exchange, "last_server", None) if exchange is not None else None
            self.access_log.request(conn, request, status, sent, server,
                                    response.status if response is not None else None)

    def log_upgrade(self, conn, request, upstream, pick) -> None:
        """The -v line of an upgrade: client, upstream, server, persistence decision."""
        if log.isEnabledFor(logging.DEBUG):
            persistence = upstream.persistence.kind
            decision = f" {pick.persistence}" if pick.persistence else ""
            log.debug("upgrade %s %s client=%s:%s upstream=%s server=%s persistence=%s%s",
                      request.method, request.url.decode("latin-1", "replace"),
                      conn.client_ip, conn.client_port, upstream.name, pick.server.hostport,
                      persistence, decision)

    # -- tunnels -----------------------------------------------------------------------
    def tunnel_opened(self, url, upgrade_request: bool) -> None:
        """A tunnel to ``url`` began here (an upgrade is also a request; an adopted
        tunnel was counted as one by the worker that opened it)."""
        if self.shared is not None:
            self.shared.tunnel_opened(self.slot, url)
            if upgrade_request:
                self.shared.count_request(self.slot, url)

    def tunnel_ended(self, record, reason, tunnel_in, tunnel_out) -> None:
        """A tunnel ended here, or left for another worker (``reason`` "handover")."""
        server = record.pick.server
        if self.shared is not None:
            self.shared.tunnel_closed(self.slot, server.url)
            # shm counts bytes from the server as "in": the client's bytes go out.
            self.shared.add_bytes(self.slot, server.url, tunnel_out, tunnel_in)
        if reason == "handover":
            log.debug("tunnel client=%s:%s server=%s handed over", *record.client,
                      server.hostport)
            return
        log.debug("tunnel client=%s:%s server=%s closed: %s", *record.client,
                  server.hostport, reason)
        if self.access_log.enabled:
            self.access_log.tunnel_line(record, server, time.monotonic() - record.opened,
                                        record.bytes_in + tunnel_in,
                                        record.bytes_out + tunnel_out)
