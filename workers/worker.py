"""What every connection of one worker process shares: the Worker.

It is built once after fork from the frozen Config (the worker never re-reads the file)
and is all a ClientConnection and an UpstreamExchange may use:

- ``config``, ``router``, ``balancers`` (by upstream name), ``pool`` (upstream
  keep-alive connections), ``tls`` (server SSL contexts by listen), ``stopping`` and
  ``handing_over`` (retiring with a newer generation to take its connections);
- ``variables``: every variable as a function of the request (workers.variables);
- ``default_settings(listen)`` / ``default_limits(listen)``: what applies before routing;
- ``proxying(location)``: a proxying location's compiled upstream request head, its
  upstream and its balancer;
- ``take_buffer()`` / ``give_buffer(buffer)``: relay buffers for bodies that may wait;
- ``render_status(request)``: the mplb_status answer;
- ``accounting`` (counters and logs), ``tunnels`` (the TunnelBook) and, for the
  process itself, ``acceptor`` and ``lifecycle``.
"""
from __future__ import annotations

import os

from mplb.balancing import init_upstream
from mplb.workers.acceptor import Acceptor
from mplb.workers.accounting import Accounting
from mplb.workers.headers import HeadPlan
from mplb.workers.process import Lifecycle
from mplb.workers.router import Router
from mplb.workers.tunnelbook import TunnelBook
from mplb.workers.upstream import UpstreamPool
from mplb.workers.variables import VariableTable

RELAY_BUFFER_SIZE = 65536
SPARE_BUFFERS = 64


class Worker:
    """Per-process state shared by all connections of this worker."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.config = config = ctx.config
        self.shared = ctx.shared
        self.router = Router(config)
        self.variables = VariableTable(config, self.router)
        self.pool = UpstreamPool()
        self.stopping = False
        self.handing_over = False
        # The fast path (workers.fastpath) serves plain connections; MPLB_FAST_PATH=0
        # serves everything in greenlets (a debugging aid; behaviour is the same).
        self.fast_path = os.environ.get("MPLB_FAST_PATH", "1") != "0"
        self.listens = {listen.key: listen for listen in config.listens}
        self.balancers = {name: init_upstream(upstream, self.shared, ctx.slot)
                          for name, upstream in config.upstreams.items()}
        self.tls = _server_contexts(config)
        _import_status_page(config)
        self.accounting = Accounting(self.shared, ctx.slot, ctx.access_log_fd)
        self.acceptor = Acceptor(self)
        self.tunnels = TunnelBook(self)
        self.lifecycle = Lifecycle(self)
        self._buffers = []
        self._plans = {}
        self._defaults = {}

    def default_settings(self, listen):
        """Settings that apply before routing: the default server of the listen."""
        settings = self._defaults.get(listen.key)
        if settings is None:
            table = self.router.names[listen.key]
            settings = self._defaults[listen.key] = table.default.settings
        return settings

    def default_limits(self, listen):
        return self.default_settings(listen).large_client_header_buffers

    def proxying(self, location):
        """``(head plan, upstream, balancer)`` of a location that proxies."""
        found = self._plans.get(id(location))
        if found is None:
            name = location.upstream
            found = self._plans[id(location)] = (
                HeadPlan(location.settings, location, self.variables),
                self.config.upstreams[name], self.balancers[name])
        return found

    def take_buffer(self):
        return self._buffers.pop() if self._buffers else bytearray(RELAY_BUFFER_SIZE)

    def give_buffer(self, buffer):
        if len(self._buffers) < SPARE_BUFFERS:
            self._buffers.append(buffer)

    def render_status(self, request):
        from mplb import status
        return status.render(self.shared, self.config, request)


def _server_contexts(config) -> dict:
    """One server-side SSL context per ssl listen, from its first virtual server.

    The master loaded each certificate and key with the configuration (a worker may run
    as a user that cannot read the key); here the stdlib context only becomes gevent's
    class, whose ``wrap_socket`` makes cooperative sockets (it adds no state of its own).
    """
    contexts = {}
    for vserver in config.servers:
        for listen in vserver.listens:
            context = vserver.ssl_context
            if listen.ssl and listen.key not in contexts and context is not None:
                from gevent import ssl
                context.__class__ = ssl.SSLContext
                contexts[listen.key] = context
    return contexts


def _import_status_page(config) -> None:
    """Import the status page's modules now if a location serves it: a worker imports
    nothing once it has given root up (its user may be unable to read the code)."""
    if any(location.status for vserver in config.servers for location in vserver.locations):
        import mplb.dashboard  # noqa: F401
        import mplb.persistence  # noqa: F401
        import mplb.status  # noqa: F401
