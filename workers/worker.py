"""What every connection of one worker process shares: the Worker.

It is built once after fork from the frozen Config (the worker never re-reads the file)
and is all a ClientConnection and an UpstreamExchange may use:

- ``config``, ``router``, ``balancers`` (by upstream name), ``pool`` (upstream
  keep-alive connections), ``tls`` (server SSL contexts by listen), ``stopping``;
- ``variables``: every variable as a function of the request (workers.variables);
- ``default_settings(listen)`` / ``default_limits(listen)``: what applies before routing;
- ``head_plan(location)``: the compiled upstream request head of a location;
- ``take_buffer()`` / ``give_buffer(buffer)``: relay buffers for bodies that may wait;
- ``render_status(request)``: the mplb_status answer;
- ``accounting`` (counters and logs), ``tunnels`` (the TunnelBook) and, for the
  process itself, ``acceptor`` and ``lifecycle``.
"""
from __future__ import annotations

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
        self.balancers = {name: init_upstream(upstream, self.shared, ctx.slot)
                          for name, upstream in config.upstreams.items()}
        self.tls = _server_contexts(config)
        self.accounting = Accounting(self.shared, ctx.slot, config.access_log)
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

    def head_plan(self, location):
        plan = self._plans.get(id(location))
        if plan is None:
            plan = self._plans[id(location)] = HeadPlan(location.settings, location,
                                                        self.variables)
        return plan

    def take_buffer(self):
        return self._buffers.pop() if self._buffers else bytearray(RELAY_BUFFER_SIZE)

    def give_buffer(self, buffer):
        if len(self._buffers) < SPARE_BUFFERS:
            self._buffers.append(buffer)

    def render_status(self, request):
        from mplb import status
        return status.render(self.shared, self.config, request)


def _server_contexts(config) -> dict:
    """One server-side SSL context per ssl listen, from its first virtual server."""
    contexts = {}
    for vserver in config.servers:
        for listen in vserver.listens:
            if listen.ssl and listen.key not in contexts and vserver.ssl_certificate:
                from gevent import ssl
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(vserver.ssl_certificate, vserver.ssl_certificate_key)
                context.set_alpn_protocols(["http/1.1"])
                contexts[listen.key] = context
    return contexts
