"""One client connection: parse requests with httptools and answer them in order.

The parser callbacks only collect (uvicorn's split): they append Request objects to a
queue and body chunks to the request being read.  Two drivers do the I/O.  A plain
connection starts on the fast path (workers.fastpath: the common exchange on the loop's
callbacks); whatever that does not handle continues here, in a greenlet: the loop in
``serve`` works through the queue after each ``feed_data``, starting the upstream
exchange when a head is complete, streaming body chunks as they arrive, and relaying
the response once the request is complete.  When it next waits for a request with
nothing of it read, a plain connection goes back to the fast path.  Pipelined requests
are thus answered in order, and no body is ever held whole in memory.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import deque

import httptools
from gevent import get_hub
from gevent.event import Event
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from mplb.workers.netio import peek, recv_into
from mplb.workers.proxy import ClientGone, UpstreamExchange
from mplb.workers.request import BadRequest, Request
from mplb.workers.requestheaders import SPECIAL_LENGTHS, SPECIAL_REQUEST_HEADERS
from mplb.workers.exchange import Exchange
from mplb.workers.localanswer import LocalAnswer, StatusAnswer
from mplb.workers.responses import CONTINUE_100, local_response

log = logging.getLogger("mplb.http")

MAX_HEADERS = 256                  # more header lines than this is hostile: 431
RECV_SIZE = 16384
# One receive buffer for every client connection of the worker: bytes read into it
# are fed to the parser (whose callbacks copy what they keep) before the greenlet can
# switch, so no connection needs its own.  An idle keep-alive connection holds no
# buffer, and a new connection costs no 16 KiB allocation and zero-fill.
_RECV_BUFFER = bytearray(RECV_SIZE)
_RECV_VIEW = memoryview(_RECV_BUFFER)


# One shared string per common method and version instead of a new one per request:
# a tunnel's record keeps both for its whole life.
METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH",
                                        "OPTIONS", "TRACE", "CONNECT")}
VERSION_NAMES = {v: v for v in ("1.1", "1.0")}

FIRST_REQUEST_GRACE = 1.0


def _has_pending_data(sock) -> bool:
    """Request bytes wait unread (TLS: already decrypted, or still in the kernel)."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return True
    return bool(peek(sock))


class CloseConnection(Exception):
    """Stop serving this connection (after any response already written)."""


class HandedOver(Exception):
    """Thrown into an idle connection's greenlet: its socket now goes to another worker
    (a reload); stop serving it and leave the socket open."""


class ClientConnection:
    """State of one accepted client connection, served by a Lane or a greenlet."""

    def __init__(self, worker, sock, addr, listen):
        self.worker = worker
        self.sock = sock
        self.listen = listen
        self.listen_key = listen.key
        self.client_ip = addr[0]
        self.client_port = addr[1]
        self.scheme = "https" if listen.ssl else "http"
        self._server_addr = None
        self.served = 0
        self.queue = deque()
        self.current = None
        self.head_pending = 0          # head bytes fed since the current head began
        self.exchange = None
        self.handed_off = False        # the socket now belongs to a tunnel or a worker
        self.greenlet = None           # the greenlet serving it (set by the acceptor)
        self.idle_waiter = None        # set while it waits with no request begun
        self.holds_capacity = True     # it holds one of worker_connections' slots
        self.to_lane = False           # its greenlet ended to serve it on the fast path
        self.lane = None               # the Lane serving it on the fast path, if one is
        self.last_route_key = None     # (target, Host, version) routed last, and where to
        self.last_route = None
        self.head_blocks = {}          # HeadPlan -> its connection-level header lines
        self.settings0 = settings = worker.default_settings(listen)
        self._set_limits(settings.large_client_header_buffers)
        self.head_deadline = time.monotonic() + settings.client_header_timeout
        self.parser = httptools.HttpRequestParser(self)

    # -- addresses (variables) -------------------------------------------
    def _local(self):
        if self._server_addr is None:
            self._server_addr = self.sock.getsockname()[:2]
        return self._server_addr

    @property
    def server_ip(self):
        return self._local()[0]

    @property
    def server_port(self):
        return self._local()[1]

    @property
    def default_host(self):
        return self.server_ip

    def between_requests(self) -> bool:
        """No request in progress and nothing of the next one parsed yet."""
        current = self.current
        return not (self.queue or (current is not None and not current.complete)
                    or self.handed_off)

    def closable_on_shutdown(self, stopping_for: float) -> bool:
        """Safe to close on graceful shutdown: between requests, with nothing received.

        A request already in the socket buffer is served (closing would answer it with a
        reset), and a connection accepted just before the stop gets a second to send its
        first request.
        """
        if not self.between_requests():
            return False
        if not self.served and stopping_for < FIRST_REQUEST_GRACE:
            return False
        return not _has_pending_data(self.sock)

    @property
    def movable(self) -> bool:
        """A plain-TCP connection can move to another worker; a TLS session cannot."""
        return self.scheme == "http"

    def hand_off(self) -> bool:
        """Stop serving an idle connection whose socket moves to another worker.

        Only a connection waiting for its next request, nothing of it read, may move
        (one that stopped itself at a request boundary already has).  The decision runs
        in the hub, where no wake-up can slip in between the check and the end of the
        wait: HandedOver is thrown into that very wait, and bytes the client sent
        meanwhile stay in the kernel, with the socket.  True when the serving greenlet
        has ended and the socket is free to move.
        """
        # The serving greenlet, held here: it clears conn.greenlet as it ends.
        greenlet = self.greenlet
        if self.handed_off:                # it stopped itself (or its Lane stopped)
            if greenlet is not None:
                greenlet.join(1.0)
                return greenlet.dead
            return True
        waiter = self.idle_waiter
        if waiter is None or not self.between_requests():
            return False
        decided = Event()

        def end_wait_if_still_idle():
            if self.idle_waiter is waiter and self.between_requests():
                self.handed_off = True
                waiter.throw(HandedOver)      # runs the greenlet to its end, right here
            decided.set()
        get_hub().loop.run_callback(end_wait_if_still_idle)
        decided.wait()
        return self.handed_off and (greenlet is None or greenlet.dead)

    # -- httptools callbacks ----------------------------------------------
    def on_message_begin(self):
        self.current = Request(self)
        self.queue.append(self.current)

    def on_url(self, url):
        request = self.current
        request.url += url
        if len(request.url) > self.line_limit:
            raise BadRequest(414, "request line too long")

    def on_header(self, name, value):
        request = self.current
        size = len(name) + len(value) + 4
        request.head_size += size
        if size > self.line_limit or request.head_size > self.head_limit:
            raise BadRequest(431, "header too large")
        headers = request.headers
        headers.append((name, value))
        if len(headers) > MAX_HEADERS:
            raise BadRequest(431, "too many headers")
        if len(name) in SPECIAL_LENGTHS:
            handler = SPECIAL_REQUEST_HEADERS.get(name.lower())
            if handler is not None:
                handler(request, value)

    def on_headers_complete(self):
        request = self.current
        parser = self.parser
        request.headers_done = True
        method = parser.get_method()
        request.method = METHOD_NAMES.get(method) or method.decode("ascii")
        version = parser.get_http_version()
        request.version = version = VERSION_NAMES.get(version, version)
        if version != "1.1" and version != "1.0":
            # HTTP/0.9 (no version in the request line) or a major version we do not speak.
            raise BadRequest(505 if version[:1] not in ("0", "1") else 400, "bad version")
        if request.chunked and version == "1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")   # nginx rule
        request.keep_alive = parser.should_keep_alive()
        request.is_upgrade = (request.is_upgrade and request.method == "GET"
                              and request.version == "1.1"
                              and any(len(n) == 7 and n.lower() == b"upgrade"
                                      for n, _ in request.headers))
        self.head_pending = 0

    def on_body(self, body):
        request = self.current
        request.body_bytes += len(body)
        request.body_chunks.append(body)

    def on_message_complete(self):
        self.current.complete = True

    # -- the loop ----------------------------------------------------------
    def serve(self, step=None):
        """Serve requests until the client leaves, an error closes, a tunnel takes over,
        or the connection goes back to the fast path; ``step`` first: what the fast
        path left for the greenlet to do."""
        try:
            if step is not None:
                step()
                if self.handed_off:
                    return
            self._serve()
        except (CloseConnection, ClientGone, HandedOver):
            pass
        except (ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
            log.debug("client %s:%s closed: %s", self.client_ip, self.client_port, exc)
        finally:
            if self.exchange is not None:
                self.exchange.abort()
            if not (self.handed_off or self.to_lane):
                self.sock.close()
            if not self.to_lane:
                self.release()

    def release(self):
        """The connection is over here (closed, tunnelled, or moving to another worker):
        drop what it parsed.  The parser and the requests point back at the connection,
        and a cycle waits for a full collection, which comes rarely once thousands of
        tunnels fill the oldest generation: each idle tunnel kept ~5 KiB of such garbage
        (scripts/bench_tunnel_memory.py --probe)."""
        self.parser = None
        self.queue.clear()
        self.current = None
        self.exchange = None
        self.lane = None

    def _set_limits(self, limits):
        """large_client_header_buffers (number, size): a line's and a head's bound."""
        self.limits = limits
        self.line_limit = limits[1]
        self.head_limit = limits[0] * limits[1]

    def _serve(self):
        sock = self.sock
        buffer = _RECV_BUFFER
        view = _RECV_VIEW
        settings = self.settings0
        head_deadline = self.head_deadline
        lane_ok = self.movable and self.worker.fast_path
        while True:
            current = self.current
            mid_head = current is not None and not current.headers_done
            between_requests = False
            if current is not None and current.headers_done and not current.complete:
                timeout = settings.client_body_timeout
            elif mid_head or not self.served:
                timeout = head_deadline - time.monotonic()
                if timeout <= 0:
                    self._reply_error(408)
                    return
            else:
                # A response just went out: the next request is rarely there already.
                timeout = settings.keepalive_timeout
                between_requests = True
            # Waiting with nothing of a request parsed: a reload may move the connection.
            idle = (current is None or current.complete) and not self.queue
            if idle and self.worker.handing_over and self.movable:
                self.handed_off = True          # move now, before reading any byte
                self.worker.acceptor.queue_move(self)
                return
            if idle and lane_ok:
                self.head_deadline = head_deadline
                self.to_lane = True             # the next request goes the fast way
                return
            try:
                count = recv_into(sock, buffer, 0, timeout, between_requests,
                                  self if idle else None)
            except socket.timeout:
                if mid_head or current is not None and not current.complete:
                    self._reply_error(408)
                return
            if not count:
                return
            if not mid_head:
                head_deadline = time.monotonic() + settings.client_header_timeout
            try:
                self.parser.feed_data(view[:count])
            except HttpParserUpgrade as upgrade:
                self._on_parser_upgrade(bytes(view[upgrade.args[0]:count]))
                if self.handed_off:
                    return
                continue
            except HttpParserCallbackError as exc:
                error = exc.__context__
                self._fail_parse(error.status if isinstance(error, BadRequest) else 400)
                return
            except HttpParserError:
                self._fail_parse(400)
                return
            status = self.head_overflow(count)
            if status:
                self._fail_parse(status)
                return
            self._process()

    def head_overflow(self, count) -> int:
        """431 when the head being read outgrows large_client_header_buffers, else 0.

        httptools buffers a partial header line itself: bound what it holds.  Bytes no
        callback has seen yet are one unfinished header line (the URL is reported as it
        arrives); head_pending may also hold up to one recv of earlier pipelined
        requests, hence the slack.
        """
        current = self.current
        if current is None or current.headers_done:
            return 0
        self.head_pending += count
        if self.head_pending > (self.limits[0] + 1) * self.limits[1]:
            return 431
        unseen = self.head_pending - len(current.url) - current.head_size
        return 431 if unseen > self.limits[1] + RECV_SIZE else 0

    # -- what the fast path (workers.fastpath) asks of the connection ---------------
    def note_bytes(self, count):
        """Bytes arrived: a new request head's client_header_timeout starts with them."""
        current = self.current
        if current is None or current.headers_done:
            self.head_deadline = time.monotonic() + self.settings0.client_header_timeout

    def head_timeout_left(self) -> float:
        return max(0.0, self.head_deadline - time.monotonic())

    def handing_over_now(self) -> bool:
        """A reload is moving idle connections, and this one can move."""
        if self.worker.handing_over and self.movable:
            self.handed_off = True
            return True
        return False

    def begin_fast(self, request):
        """The exchange of a complete request, prepared for the fast path to run
        (``fast`` set), or for the greenlet (a local answer, a failure)."""
        exchange = self._begin(request, fast=True)
        limit = exchange.settings.client_max_body_size if exchange.settings else 0
        if limit and request.body_bytes > limit:
            exchange.abort()
            return LocalAnswer(self, 413)
        return exchange

    def request_done(self, keep_alive) -> bool:
        """The first queued request was answered; whether the connection goes on."""
        self.queue.popleft()
        self.exchange = None
        self.served += 1
        return keep_alive

    def process_in_greenlet(self):
        self._process()

    def finish_in_greenlet(self, request, pick=None, **finish):
        """Carry on the exchange the fast path began: connect to its server first (no
        idle pooled connection), or finish it (see UpstreamExchange.finish)."""
        exchange = self.exchange
        if pick is not None:
            if exchange.open_picked(pick):
                exchange.connect_and_send()
            if request.body_chunks:
                exchange.send_body(request)
        if not self.request_done(exchange.finish(request, **finish)):
            raise CloseConnection()
        self._process()

    def fail_parse(self, status):
        self._fail_parse(status)
        raise CloseConnection()

    def on_parser_upgrade_in_greenlet(self, rest):
        self._on_parser_upgrade(rest)
        if not self.handed_off:
            self._process()

    def _fail_parse(self, status):
        """Answer queued complete requests first, then the error, and close."""
        while self.queue and self.queue[0].complete:
            self._process_one(self.queue[0])
        self.queue.clear()
        self._reply_error(status)

    def _reply_error(self, status):
        try:
            self.sock.sendall(local_response(status, keep_alive=False))
        except OSError:
            pass

    # -- request processing ------------------------------------------------
    def _process(self):
        while self.queue and self.queue[0].headers_done:
            if not self._process_one(self.queue[0]):
                return

    def _process_one(self, request) -> bool:
        """Advance the first queued request; False when it needs more client data.

        The fast path may have begun it already (``self.exchange`` is then set)."""
        if self.exchange is None:
            self.exchange = self._begin(request)
        exchange = self.exchange
        limit = exchange.settings.client_max_body_size if exchange.settings else 0
        if limit and request.body_bytes > limit:
            exchange.abort()
            self.exchange = LocalAnswer(self, 413)
            exchange = self.exchange
        if not request.complete and isinstance(exchange, LocalAnswer):
            # Answer now rather than read a body nobody wants; the framing is lost.
            exchange.finish(request, force_close=True)
            raise CloseConnection()
        if request.body_chunks:
            exchange.send_body(request)
        if not request.complete:
            return False
        keep_alive = exchange.finish(request)
        self.queue.popleft()
        self.exchange = None
        self.served += 1
        if not keep_alive:
            raise CloseConnection()
        return True

    def _begin(self, request, fast=False) -> Exchange:
        """Route the request and return its exchange (upstream, or local answer); with
        ``fast`` an upstream exchange is only prepared, for the fast path to run."""
        worker = self.worker
        if request.method == "CONNECT":
            return LocalAnswer(self, 405)       # a reverse proxy does not tunnel CONNECT
        key = (request.url, request.host_value, request.version)
        if key == self.last_route_key:          # a keep-alive client asks the same again
            vserver, location = self.last_route
        else:
            try:
                uri = request.uri
            except (ValueError, UnicodeDecodeError):
                return LocalAnswer(self, 400)
            host = request.host
            if not host and request.version == "1.1" and request.header("host") is None:
                return LocalAnswer(self, 400)
            vserver, location = worker.router.route(self.listen_key, host, uri)
            self.last_route_key, self.last_route = key, (vserver, location)
        if location is None:
            return LocalAnswer(self, 404, settings=vserver.settings)
        settings = location.settings
        if settings.large_client_header_buffers is not self.limits:
            self._set_limits(settings.large_client_header_buffers)
        if settings.access_rules and not self._allowed(settings.access_rules):
            return LocalAnswer(self, 403, settings=settings)
        limit = settings.client_max_body_size
        if limit and (request.content_length or 0) > limit:
            return LocalAnswer(self, 413, settings=settings)
        if location.return_code is not None:
            return LocalAnswer(self, location.return_code, settings=settings, location=location)
        if location.status:
            return StatusAnswer(self, settings)
        if location.upstream is None:
            return LocalAnswer(self, 404, settings=settings)
        if fast:
            return UpstreamExchange(self, request, location, worker, connect=False)
        if request.expect_continue and not request.complete:
            self.sock.sendall(CONTINUE_100)
        return UpstreamExchange(self, request, location, worker)

    def _allowed(self, rules):
        ip = ipaddress.ip_address(self.client_ip)
        for rule in rules:
            if rule.matches(ip):
                return rule.allow
        return True

    def keep_alive_after(self, request, settings=None) -> bool:
        """Whether the response to ``request`` may leave the connection open."""
        if not request.keep_alive:
            return False
        worker = self.worker
        if worker.stopping and not (worker.handing_over and self.movable):
            return False          # stopping for good, or a TLS connection that cannot move
        if settings is None:
            settings = (getattr(self.exchange, "settings", None)
                        or self.worker.default_settings(self.listen))
        return self.served + 1 < settings.keepalive_requests

    # -- upgrades ------------------------------------------------------------
    def _on_parser_upgrade(self, rest):
        """llhttp paused after a head with Upgrade and Connection: upgrade (or CONNECT).

        ``rest`` holds the bytes after that head.  Requests pipelined before it are
        answered first, in order.  Then it is a tunnel if it is an upgrade by mplb's
        rule (GET, HTTP/1.1), and plain HTTP otherwise: its body (which llhttp did not
        parse) and any later requests are read on, and the connection stays usable.
        """
        request = self.current
        while self.queue and self.queue[0] is not request:
            self._process_one(self.queue[0])
        if not self.queue:
            raise CloseConnection()
        if request.method == "CONNECT":
            LocalAnswer(self, 405).finish(request, force_close=True)
            raise CloseConnection()      # what follows a CONNECT head is not HTTP
        if request.is_upgrade:
            self._start_upgrade(request, rest)
        else:
            self._resume_plain(request, rest)

    def _resume_plain(self, request, rest):
        """Carry on after a request that carried upgrade headers but is plain HTTP.

        llhttp reported it complete without reading its body; a fresh parser, primed
        with a head that has only the body's framing, reads the body into ``request``
        (through :class:`_BodyAfterPause`) and then parses what follows as usual.
        """
        if request.content_length or request.chunked:
            request.complete = False
            self.parser = httptools.HttpRequestParser(_BodyAfterPause(self, request))
            framing = (b"Transfer-Encoding: chunked" if request.chunked
                       else b"Content-Length: %d" % request.content_length)
            self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        else:
            self.parser = httptools.HttpRequestParser(self)
        self._feed_pending(rest)

    def _start_upgrade(self, request, client_pending):
        """Tunnel an upgrade request, or serve what the backend answered instead."""
        request.complete = True
        if self.exchange is None:
            # The parser stopped at the head before _process ran: route it now.
            self.exchange = self._begin(request)
        if not isinstance(self.exchange, UpstreamExchange):
            # Answered by mplb itself (an error, return, status): answer and close.
            self.exchange.finish(request, force_close=True)
            raise CloseConnection()
        exchange = self.exchange
        self.exchange = None
        self.queue.popleft()
        tunnelled, keep_alive = exchange.finish_upgrade(request, client_pending)
        if tunnelled:
            self.handed_off = True
            return
        self.served += 1
        # The backend refused the upgrade: carry on with a fresh parser.
        if not keep_alive:
            raise CloseConnection()
        self.parser = httptools.HttpRequestParser(self)
        self.current = None
        if client_pending:
            self._feed_pending(client_pending)

    def _feed_pending(self, data):
        """Feed bytes that followed a paused head, with _serve's error handling."""
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._on_parser_upgrade(data[upgrade.args[0]:])
            return
        except HttpParserCallbackError as exc:
            error = exc.__context__
            self._fail_parse(error.status if isinstance(error, BadRequest) else 400)
            raise CloseConnection()
        except HttpParserError:
            self._fail_parse(400)
            raise CloseConnection()
        self._process()


class _BodyAfterPause:
    """Parser callbacks after a paused plain request: its body first, then as usual.

    The parser they serve was primed with a synthetic head (the paused request's body
    framing only); its head callbacks are swallowed, the body goes to the paused
    request, and from the next message on every callback is the connection's own.
    Only a connection that sent such a request ever pays for this indirection.
    """

    def __init__(self, conn, request):
        self.conn = conn
        self.request = request          # None once its body is complete

    def on_message_begin(self):
        if self.request is None:
            self.conn.on_message_begin()

    def on_url(self, url):
        if self.request is None:
            self.conn.on_url(url)

    def on_header(self, name, value):
        if self.request is None:
            self.conn.on_header(name, value)

    def on_headers_complete(self):
        if self.request is None:
            self.conn.on_headers_complete()

    def on_body(self, body):
        self.conn.on_body(body)          # conn.current is the paused request until its end

    def on_message_complete(self):
        if self.request is None:
            self.conn.on_message_complete()
        else:
            self.request.complete = True
            self.request = None
