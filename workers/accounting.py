"""What one worker counts and logs: shared-memory counters, the access log, -v lines.

The connection code reports each event once, here; nothing else in a worker writes
counters or log lines about requests and tunnels.  Failures are not counted here: the
balancer's ``free`` records them with the server's health.
"""
from __future__ import annotations

import logging
import time
from bisect import bisect_left

from mplb.shm.layout import RESPONSE_BUCKETS, TUNNEL_BUCKETS, W_CONNECTIONS
from mplb.workers.accesslog import AccessLog

log = logging.getLogger("mplb.worker")

# A histogram's sum word (microseconds) follows its +Inf bucket (mplb.shm.layout).
RESPONSE_SUM = len(RESPONSE_BUCKETS) + 1


class Accounting:
    """Counters and log lines of one worker (``shared`` may be None: counted nowhere)."""

    def __init__(self, shared, slot, access_log_fd):
        self.shared = shared
        self.slot = slot
        self.access_log = AccessLog(access_log_fd)
        self.logging = self.access_log.enabled      # callers may skip log_access when off
        self._exchange_words = {}     # server url -> its words (see count_exchange)
        self._tunnel_words = {}       # server url -> its first tunnel-duration bucket
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
    def count_exchange(self, server, sent_upstream, received_upstream,
                       head_seconds=None) -> None:
        """One request to ``server``, its bytes both ways and, when a response head came,
        how long after connecting it came (the response-time histogram)."""
        shared = self.shared
        if shared is None:
            return
        words = self._exchange_words.get(server.url) or self._words(server.url)
        requests, bytes_in, bytes_out, worker_requests, response, response_sum = words
        q = shared.q
        q[requests] += 1
        q[bytes_in] += received_upstream
        q[bytes_out] += sent_upstream
        q[worker_requests] += 1
        if head_seconds is not None:         # inline: this is every request's path
            q[response + bisect_left(RESPONSE_BUCKETS, head_seconds)] += 1
            q[response_sum] += int(head_seconds * 1e6)

    def _words(self, url) -> tuple:
        """The words of ``url`` (shm.exchange_words) and its response-time sum word."""
        words = self.shared.exchange_words(self.slot, url)
        words = self._exchange_words[url] = words + (words[4] + RESPONSE_SUM,)
        return words

    def response_timed(self, server, head_seconds) -> None:
        """The response head of an upgrade (a 101) came ``head_seconds`` after connecting."""
        if self.shared is not None:
            words = self._exchange_words.get(server.url) or self._words(server.url)
            _observe(self.shared.q, words[4], RESPONSE_BUCKETS, head_seconds)

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
            if reason != "handover":         # the tunnel goes on in another worker
                self._time_tunnel(server.url, time.monotonic() - record.opened)
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

    def _time_tunnel(self, url, seconds) -> None:
        """A tunnel's whole life (opened at the upgrade, whichever worker held it)."""
        first = self._tunnel_words.get(url)
        if first is None:
            first = self._tunnel_words[url] = self.shared.histogram_word(self.slot, url,
                                                                         "tunnel")
        _observe(self.shared.q, first, TUNNEL_BUCKETS, max(0.0, seconds))


def _observe(q, first, bounds, seconds) -> None:
    """One observation: its bucket, and the sum word after the +Inf bucket."""
    q[first + bisect_left(bounds, seconds)] += 1
    q[first + len(bounds) + 1] += int(seconds * 1e6)
