"""The gevent worker process: accept, serve connections in greenlets, heartbeat.

The master forks a worker and calls ``run_worker``; everything gevent happens from
here on, so the master never imports gevent.  The worker never re-reads the
configuration file: it serves the frozen Config it was forked with.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time

import gevent
from gevent import socket as gsocket
from gevent.lock import Semaphore

from mplb import logs
from mplb.workers.accesslog import AccessLog
from mplb.workers.handover import (HandoverServer, adopt_tunnel, close_unadoptable,
                              hand_over_tunnels)
from mplb.workers.headers import HeadPlan
from mplb.workers.http import ClientConnection
from mplb.workers.router import Router
from mplb.workers.tunnelrecord import TunnelRecord
from mplb.workers.upstream import UpstreamPool

log = logging.getLogger("mplb.worker")

HEARTBEAT_INTERVAL = 1.0
EXIT_BOOT_FAILURE = 3          # the master stops instead of re-forking forever
RELAY_BUFFER_SIZE = 65536


class WorkerContext:
    """What the master hands a worker at fork time."""

    def __init__(self, config, listen_sockets, control_fd, shared, slot, number,
                 generation, master_pid, verbose):
        self.config = config
        self.listen_sockets = listen_sockets      # {listen key: (socket, Listen)}
        self.control_fd = control_fd
        self.shared = shared
        self.slot = slot
        self.number = number
        self.generation = generation
        self.master_pid = master_pid
        self.verbose = verbose


class Worker:
    """Per-process state shared by all connections of this worker."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.config = config = ctx.config
        self.shared = ctx.shared
        self.slot = ctx.slot
        self.router = Router(config)
        self.pool = UpstreamPool()
        self.stopping = False
        self.connections = set()
        self.connection_count = 0
        self.capacity = Semaphore(config.worker_connections)
        self._buffers = []
        self._plans = {}
        self._counter_words = {}      # server url -> shm word indexes (count_exchange)
        self.accepted_since_trim = 0
        self._defaults = {}
        self.access_log = AccessLog(config.access_log)
        self.balancers = self._init_balancers()
        self.tls = self._init_tls()

    # -- set-up ------------------------------------------------------------
    def _init_balancers(self):
        from mplb.balancing import init_upstream
        return {name: init_upstream(upstream, self.shared, self.slot)
                for name, upstream in self.config.upstreams.items()}

    def _init_tls(self):
        """One server-side SSL context per ssl listen, from its first virtual server."""
        contexts = {}
        for vserver in self.config.servers:
            for listen in vserver.listens:
                if listen.ssl and listen.key not in contexts and vserver.ssl_certificate:
                    from gevent import ssl
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    context.load_cert_chain(vserver.ssl_certificate, vserver.ssl_certificate_key)
                    context.set_alpn_protocols(["http/1.1"])
                    contexts[listen.key] = context
        return contexts

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
            plan = self._plans[id(location)] = HeadPlan(location.settings)
        return plan

    def take_buffer(self):
        return self._buffers.pop() if self._buffers else bytearray(RELAY_BUFFER_SIZE)

    def give_buffer(self, buffer):
        if len(self._buffers) < 64:
            self._buffers.append(buffer)

    # -- accounting ----------------------------------------------------------
    def count_exchange(self, server, sent_upstream, received_upstream):
        """Request and byte counters; failures are counted by the balancer's free()."""
        shared = self.shared
        if shared is None:
            return
        words = self._counter_words.get(server.url)
        if words is None:
            words = self._counter_words[server.url] = shared.exchange_words(self.slot,
                                                                            server.url)
        requests, bytes_in, bytes_out, worker_requests = words
        q = shared.q
        q[requests] += 1
        q[bytes_in] += received_upstream
        q[bytes_out] += sent_upstream
        q[worker_requests] += 1

    def log_access(self, conn, request, status, sent, exchange, response):
        if self.access_log.enabled:
            server = getattr(exchange, "last_server", None) if exchange is not None else None
            self.access_log.request(conn, request, status, sent, server,
                                    response.status if response is not None else None)

    def log_upgrade(self, conn, request, upstream, pick):
        if log.isEnabledFor(logging.DEBUG):
            persistence = upstream.persistence.kind
            decision = f" {pick.persistence}" if pick.persistence else ""
            log.debug("upgrade %s %s client=%s:%s upstream=%s server=%s persistence=%s%s",
                      request.method, request.url.decode("latin-1", "replace"),
                      conn.client_ip, conn.client_port, upstream.name, pick.server.hostport,
                      persistence, decision)

    def render_status(self, request):
        from mplb import status
        return status.render(self.shared, self.config, request)

    # -- tunnels ---------------------------------------------------------------
    def open_tunnel(self, conn, request, backend_sock, pick, balancer, settings,
                    client_pending, backend_pending, bytes_in, bytes_out, start_tunnel):
        """Hand both sockets to a tunnel; the connection slot is freed when it ends."""
        server = pick.server
        if self.shared is not None:
            self.shared.tunnel_opened(self.slot, server.url)
            self.shared.count_request(self.slot, server.url)
        on_close = TunnelRecord.for_request(self, conn, request, pick, balancer,
                                            self._upstream_name(balancer), bytes_in, bytes_out)
        start_tunnel(conn.sock, backend_sock, client_pending, backend_pending, settings,
                     on_close)

    def _upstream_name(self, balancer):
        for name, candidate in self.balancers.items():
            if candidate is balancer:
                return name
        return ""

    def tunnel_closed(self, record, reason, backend_failed, tunnel_in, tunnel_out):
        """A tunnel ended (or moved to another worker): undo its accounting, log it."""
        server = record.pick.server
        record.balancer.free(record.pick, backend_failed)
        shared = self.shared
        if shared is not None:
            shared.tunnel_closed(self.slot, server.url)
            # shm counts bytes from the server as "in": the client's bytes go out.
            shared.add_bytes(self.slot, server.url, tunnel_out, tunnel_in)
        self._release_connection(record.holds_capacity)
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

    def adopt_tunnel(self, client_fd, backend_fd, state, up_tail, down_tail) -> None:
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
        upstream = self.config.upstreams.get(state.get("upstream", ""))
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
        balancer = self.balancers[upstream.name]
        pick = balancer.adopt(index)
        settings = self._settings_for(state, upstream.name)
        if self.shared is not None:
            self.shared.tunnel_opened(self.slot, pick.server.url)
        self.connection_count += 1
        holds = self.capacity.acquire(blocking=False)
        if self.shared is not None:
            self.shared.worker_connections(self.slot, 1)
        record = TunnelRecord.from_state(self, pick, balancer, holds, state)
        adopt_tunnel(client, backend, dict(state, client_rx=0, client_tx=0), up_tail,
                     down_tail, settings, record)

    def _settings_for(self, state, upstream_name):
        """Route the tunnel's original request under the new configuration."""
        key = tuple(state.get("listen", ()))
        if key in self.router.names:
            url = state.get("url", "/")
            path = url.split("?", 1)[0] if url.startswith("/") else "/"
            vserver, location = self.router.route(key, state.get("host", ""), path)
            if location is not None and location.upstream == upstream_name:
                return location.settings
            return vserver.settings
        return self.config.servers[0].settings if self.config.servers else None

    # -- connections --------------------------------------------------------------
    def handle(self, sock, addr, listen):
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            context = self.tls.get(listen.key)
            if context is not None:
                sock = self._tls_handshake(context, sock, listen)
                if sock is None:
                    return
            conn = ClientConnection(self, sock, addr, listen)
            self.connections.add(conn)
            conn.serve()
        except Exception:   # noqa: BLE001 - one bad connection never takes the worker down
            log.exception("unexpected error on connection from %s", addr[0])
            sock.close()
        finally:
            self.connections.discard(conn)
            if conn is None or not conn.handed_off:
                self._release_connection(True)

    def _tls_handshake(self, context, sock, listen):
        sock.settimeout(self.default_settings(listen).client_header_timeout)
        try:
            tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            tls_sock.do_handshake()
            return tls_sock
        except (OSError, ValueError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
            return None

    def _release_connection(self, holds_capacity):
        self.connection_count -= 1
        if holds_capacity:
            self.capacity.release()
        if self.shared is not None:
            self.shared.worker_connections(self.slot, -1)

    def accept_loop(self, lsock, listen):
        """Accept until stopping; past worker_connections wait for a free slot."""
        while not self.stopping:
            self.capacity.acquire()
            if self.stopping:
                self.capacity.release()
                return
            try:
                sock, addr = lsock.accept()
            except OSError as exc:
                self.capacity.release()
                if self.stopping:
                    return
                log.error("accept() failed: %s", exc)
                gevent.sleep(0.1)     # EMFILE and friends: back off instead of spinning
                continue
            self.connection_count += 1
            self.accepted_since_trim += 1
            if self.shared is not None:
                self.shared.worker_connections(self.slot, 1)
            gevent.spawn(self.handle, sock, addr, listen)

    # -- lifecycle -------------------------------------------------------------------
    def heartbeat_loop(self):
        """Prove to the master that the event loop runs; leave if the master is gone."""
        fd = self.ctx.control_fd
        while True:
            if os.getppid() != self.ctx.master_pid:
                log.error("master process is gone, worker exiting")
                self.fast_stop()
            try:
                os.write(fd, b"h")
            except BlockingIOError:
                pass
            except OSError:
                self.fast_stop()
            self.access_log.flush()         # a quiet worker still writes its lines out
            if self.accepted_since_trim >= TRIM_AFTER_ACCEPTS:
                self.accepted_since_trim = 0
                release_free_memory()
            gevent.sleep(HEARTBEAT_INTERVAL)

    def graceful_stop(self):
        """Stop accepting, finish in-flight requests, then tunnels (bounded by config)."""
        if self.stopping:
            return
        self.stopping = True
        for lsock in self.listeners:
            lsock.close()
        gevent.spawn(self._drain)

    def _drain(self):
        from mplb.workers import tunnel
        deadline = self.config.worker_shutdown_timeout
        started = time.monotonic()
        while True:
            stopping_for = time.monotonic() - started
            for conn in list(self.connections):
                if conn.closable_on_shutdown(stopping_for):
                    conn.sock.close()
            movable = tunnel.movable_tunnels()
            if movable:
                targets = self._handover_targets()
                if targets:
                    moved = hand_over_tunnels(self, targets, movable)
                    log.info("handed %d tunnel(s) over to the new generation", moved)
            busy = len(self.connections) + tunnel.live_tunnel_count()
            if not busy:
                break
            if deadline is not None and time.monotonic() - started >= deadline:
                tunnel.close_all_tunnels("shutdown", 1001)
                break
            gevent.sleep(0.05)
        self.exit(0)

    def _handover_targets(self):
        """Pids of live workers of a newer generation (from the shared worker table)."""
        if self.shared is None:
            return []
        return [w["pid"] for w in self.shared.workers()
                if w["generation"] > self.ctx.generation and w["pid"] != os.getpid()
                and _alive(w["pid"])]

    def fast_stop(self):
        self.exit(0)

    def exit(self, code):
        if _PROFILE["profiler"] is not None:
            _PROFILE["profiler"].disable()
            _PROFILE["profiler"].dump_stats(
                os.path.join(_PROFILE["dir"], f"worker-{os.getpid()}.prof"))
        self.access_log.flush()
        logging.shutdown()
        os._exit(code)

    def run(self):
        self.listeners = []
        for key, (raw_sock, listen) in self.ctx.listen_sockets.items():
            # Take the inherited descriptor itself (no dup), so closing it on QUIT
            # really stops this worker listening.
            lsock = gsocket.socket(fileno=raw_sock.detach())
            self.listeners.append(lsock)
            gevent.spawn(self.accept_loop, lsock, listen)
        gevent.signal_handler(signal.SIGQUIT, self.graceful_stop)
        gevent.signal_handler(signal.SIGTERM, self.fast_stop)
        gevent.signal_handler(signal.SIGUSR1, self.reopen_logs)
        # fork_worker left signals blocked until these handlers exist; any QUIT or TERM
        # sent meanwhile is delivered now, to them.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        self.start_handover_server()
        try:
            os.write(self.ctx.control_fd, b"r")      # ready: the master may retire the old
        except OSError:
            self.fast_stop()
        heartbeat = gevent.spawn(self.heartbeat_loop)
        heartbeat.join()

    def start_handover_server(self):
        try:
            self.handover = HandoverServer(self, self.ctx.master_pid)
        except OSError as exc:
            log.error("cannot listen for tunnel handovers: %s", exc)
            self.handover = None

    def reopen_logs(self):
        logs.reopen()
        self.access_log.reopen()


_PROFILE = {"profiler": None, "dir": None}
TRIM_AFTER_ACCEPTS = 256


def _load_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory():
    """Give freed heap pages back to the kernel after a burst of connections.

    Thousands of handshakes at once leave their buffers and greenlet stacks freed but
    scattered through the heap; glibc keeps such pages until asked.  Long-lived tunnels
    would otherwise pay for the burst that opened them.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def run_worker(ctx):
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        try:
            from setproctitle import setproctitle
            setproctitle(f"mplb: worker process #{ctx.number}")
        except ImportError:
            pass
        gevent.reinit()
        # What exists now (config, modules) lives as long as the worker: keep it out of
        # every collection, and collect the young generation less often.
        gc.freeze()
        gc.set_threshold(7000, 20, 20)
        try:
            worker = Worker(ctx)
        except Exception as exc:   # noqa: BLE001 - reported to the master by exit code
            log.error("worker boot failed: %s", exc)
            logging.shutdown()
            os._exit(EXIT_BOOT_FAILURE)
        if ctx.shared is not None:
            ctx.shared.worker_started(ctx.slot, os.getpid(), ctx.generation)
        if os.environ.get("MPLB_PROFILE_DIR"):      # scripts/profile: cProfile per worker
            import cProfile
            _PROFILE["dir"] = os.environ["MPLB_PROFILE_DIR"]
            _PROFILE["profiler"] = cProfile.Profile(time.process_time)
            _PROFILE["profiler"].enable()
        worker.run()
    except SystemExit as exc:
        code = exc.code or 0
    except BaseException:   # noqa: BLE001 - the child must never return into the master code
        log.exception("worker crashed")
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)
