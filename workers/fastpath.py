"""The fast path: the common keep-alive HTTP exchange, driven by the loop's callbacks.

Why: waiting in a greenlet costs a switch, a watcher start and stop and a deadline
entry per wait, and an exchange waits at least twice (the client's next request, the
upstream's answer).  A Lane waits instead by arming a libev watcher whose callback
does the work, as the tunnels do: the client's readable event parses the request,
picks a server, writes the head to a pooled upstream connection and arms that
connection's watcher; its readable event parses the response head, renders it and
relays a counted body.  No greenlet and no switch on that path.

The common case only: a plain-TCP connection; a complete request without a body or
with a small counted one; a counted response (or none, HEAD/204/304) below the size
that is spliced.  Anything else goes to the greenlet code of workers.http and
workers.proxy, which handles everything (TLS, chunked or streamed bodies,
``Expect: 100-continue``, retries, upgrades, local answers, large bodies): the Lane
*escalates*, handing over the connection exactly where it stands (the parsed
requests, the exchange with its pick, its upstream connection and any response head
already read), and the greenlet carries on from there.  When that greenlet next
waits for a request with nothing of it read, the connection comes back to a Lane.
Behaviour is therefore the greenlet code's; the suite runs against both.

Timeouts are one deadline per Lane in a timing wheel (workers.deadlines).
"""
from __future__ import annotations

import logging
import time

import gevent
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from mplb.workers.bodysplice import SPLICE_BODY_MIN
from mplb.workers.deadlines import WHEEL
from mplb.workers.proxy import MAX_RESPONSE_HEAD, UpstreamExchange, UpstreamFailed
from mplb.workers.request import BadRequest
from mplb.workers.responsehead import ResponseHead
from mplb.workers.responses import local_response

log = logging.getLogger("mplb.http")

READ, WRITE = 1, 2
RECV_SIZE = 16384
SMALL_BODY = 65536              # a request body up to this, complete, goes the fast way
EMPTY = frozenset()
# One receive buffer for every Lane and one for upstream heads: bytes read into them are
# parsed (the parser callbacks copy what they keep) before any other callback runs.
_RECV = bytearray(RECV_SIZE)
_RECV_VIEW = memoryview(_RECV)
_HEAD = bytearray(65536)
_HEAD_VIEW = memoryview(_HEAD)
_monotonic = time.monotonic

# What a Lane is waiting for (its deadline's meaning).
FOR_REQUEST, FOR_MORE_HEAD, FOR_UPSTREAM, FOR_BODY, FOR_CLIENT = range(5)


class Lane:
    """One plain-TCP client connection, served from the loop's callbacks."""

    __slots__ = ("acceptor", "worker", "conn", "raw", "watcher", "waiting", "deadline",
                 "tick", "exchange", "request", "upstream", "response", "received",
                 "remaining", "keep_client", "sent", "tail", "closed", "__weakref__")

    def __init__(self, acceptor, conn, raw):
        self.acceptor = acceptor
        self.worker = acceptor.worker
        self.conn = conn                  # the ClientConnection: parser, queue, routing
        self.raw = raw                    # the plain socket (conn.sock too, in a Lane)
        self.watcher = gevent.get_hub().loop.io(raw.fileno(), READ)
        self.waiting = FOR_REQUEST
        self.deadline = 0.0
        self.tick = 0
        self.exchange = self.request = self.upstream = self.response = None
        self.received = self.remaining = self.sent = 0
        self.keep_client = False
        self.tail = None                  # response bytes the client has not taken yet
        self.closed = False

    # -- waiting for the client --------------------------------------------------------
    def wait_for_request(self):
        """Arm the client's read event; the deadline depends on what was parsed."""
        conn = self.conn
        current = conn.current
        if current is not None and not current.complete:
            self.waiting = FOR_MORE_HEAD
            timeout = conn.head_timeout_left()
        elif conn.served:
            self.waiting = FOR_REQUEST
            timeout = conn.settings0.keepalive_timeout
        else:
            self.waiting = FOR_MORE_HEAD
            timeout = conn.head_timeout_left()
        WHEEL.arm(self, _monotonic() + timeout)
        watcher = self.watcher
        if watcher.events != READ:
            watcher.stop()
            watcher.events = READ
        watcher.start(self.on_client_readable)

    def on_client_readable(self):
        try:
            self._on_client_readable()
        except Exception:  # noqa: BLE001 - one bad connection never takes the worker down
            self.crashed()

    def _on_client_readable(self):
        try:
            count = self.raw.recv_into(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("client %s:%s closed: %s", self.conn.client_ip, self.conn.client_port,
                      exc)
            return self.close()
        if not count:
            return self.close()
        conn = self.conn
        conn.note_bytes(count)
        try:
            conn.parser.feed_data(_RECV_VIEW[:count])
        except HttpParserUpgrade as upgrade:
            rest = bytes(_RECV_VIEW[upgrade.args[0]:count])
            return self.escalate(lambda: conn.on_parser_upgrade_in_greenlet(rest))
        except HttpParserCallbackError as exc:
            error = exc.__context__
            status = error.status if isinstance(error, BadRequest) else 400
            return self.escalate(lambda: conn.fail_parse(status))
        except HttpParserError:
            return self.escalate(lambda: conn.fail_parse(400))
        status = conn.head_overflow(count)
        if status:
            return self.escalate(lambda: conn.fail_parse(status))
        self.dispatch()

    def dispatch(self):
        """Start the first queued request if it is complete and the fast path's kind."""
        conn = self.conn
        queue = conn.queue
        if not queue or not queue[0].headers_done:
            if self.worker.handing_over and self.idle() and conn.handing_over_now():
                return self.move()
            return self.wait_for_request()
        request = queue[0]
        if not request.complete or request.chunked or request.expect_continue or \
                request.body_bytes > SMALL_BODY:
            return self.escalate(conn.process_in_greenlet)
        exchange = conn.begin_fast(request)
        conn.exchange = exchange
        if type(exchange) is not UpstreamExchange or exchange.failure is not None:
            return self.escalate(conn.process_in_greenlet)     # a local answer, an error
        self.watcher.stop()
        self.start_exchange(exchange, request)

    # -- the upstream --------------------------------------------------------------------
    def start_exchange(self, exchange, request):
        balancer = exchange.balancer
        pick = balancer.get(request, EMPTY)
        if pick is None:
            return self.escalate(lambda: self.conn.finish_in_greenlet(
                request, failure=exchange.no_live_upstreams()))
        exchange.tried.add(pick.index)
        server = pick.server
        framing = exchange.framing
        exchange.opened_at = _monotonic()      # the response-time histogram starts here
        pooled = self.worker.pool.take(server, verify=bool(framing))
        if pooled is None:                 # no idle connection: connect in the greenlet
            return self.escalate(lambda: self.conn.finish_in_greenlet(request, pick=pick))
        sock, reader = pooled
        head = exchange.plan.render(request, server, framing)
        data = head + b"".join(request.body_chunks) if request.body_chunks else head
        try:
            sent = sock._sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):              # a stale pooled connection, or a full buffer
            sock.close()
            return self.escalate(lambda: self.conn.finish_in_greenlet(request, pick=pick))
        request.body_chunks.clear()
        exchange.pick, exchange.sock, exchange.reused = pick, sock, True
        exchange.head = head
        exchange.bytes_in += sent
        exchange.body_sent = sent - len(head)
        if reader is None:
            reader = ResponseHead()
        else:
            reader.reset()
        exchange.reader = self.response = reader
        self.exchange, self.request, self.upstream = exchange, request, sock
        self.received = 0
        self.waiting = FOR_UPSTREAM
        WHEEL.arm(self, _monotonic() + exchange.settings.proxy_read_timeout)
        sock._read_event.start(self.on_upstream_readable)

    def on_upstream_readable(self):
        try:
            self._on_upstream_readable()
        except Exception:  # noqa: BLE001 - one bad connection never takes the worker down
            self.crashed()

    def _on_upstream_readable(self):
        sock = self.upstream
        try:
            count = sock._sock.recv_into(_HEAD)
        except BlockingIOError:
            return
        except OSError:
            count = 0
        if not count:                      # closed or reset: the greenlet reads it again
            return self.upstream_in_greenlet()
        response = self.response
        if self.waiting == FOR_BODY:
            return self.relay_body(_HEAD_VIEW[:count])
        self.received += count
        try:
            response.parser.feed_data(_HEAD_VIEW[:count])
        except HttpParserUpgrade:
            return self.upstream_in_greenlet(UpstreamFailed(
                502, "upstream sent 101 to a request that is not an upgrade"))
        except (HttpParserError, ValueError) as exc:
            return self.upstream_in_greenlet(UpstreamFailed(
                502, f"upstream sent invalid response ({exc})"))
        if not response.headers_done:
            if self.received > MAX_RESPONSE_HEAD + len(_HEAD):
                return self.upstream_in_greenlet(UpstreamFailed(
                    502, "upstream sent too big header"))
            return
        exchange = self.exchange
        exchange.head_seconds = _monotonic() - exchange.opened_at
        self.head_arrived(response)

    def head_arrived(self, response):
        """A whole response head: relay it here if it is the common kind."""
        exchange, request = self.exchange, self.request
        status = response.status
        length = response.content_length
        if (status < 200 or status in (502, 503, 504) or response.chunked or length is None
                and status not in (204, 304) and request.method != "HEAD"):
            return self.upstream_in_greenlet(None, True)     # 1xx, retries, re-chunking
        head, keep_client, head_only, _ = exchange.client_head(request, response, False)
        body = b"".join(response.body)
        response.body.clear()
        total = int(length) if length is not None and not head_only else 0
        if total >= SPLICE_BODY_MIN or (head_only and (body or length not in (None, b"0"))):
            response.body.append(body)
            return self.upstream_in_greenlet(None, True)     # spliced, or a stray body
        exchange.bytes_out += self.received
        self.keep_client = keep_client
        self.sent = len(head) + len(body)
        self.remaining = total - len(body)
        if self.remaining <= 0:
            response.complete = True
        self.send_to_client(head + body if body else head)

    def relay_body(self, data):
        """The rest of a counted body, as it comes (not parsed: counted)."""
        count = len(data)
        if count > self.remaining:          # more than announced: not ours to relay
            data = data[:self.remaining]
            count = self.remaining
            self.response.keep_alive = False
        self.remaining -= count
        self.exchange.bytes_out += count
        self.sent += count
        if self.remaining <= 0:
            self.response.complete = True   # the parser never saw these bytes: mark the end
        WHEEL.arm(self, _monotonic() + self.exchange.settings.proxy_read_timeout)
        self.send_to_client(bytes(data))

    # -- writing to the client ---------------------------------------------------------
    def send_to_client(self, data):
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self.client_gone()
        if sent < len(data):                # a slow client: wait until it takes more
            self.tail = data[sent:]
            self.upstream._read_event.stop()
            self.waiting = FOR_CLIENT
            WHEEL.arm(self, _monotonic() + self.exchange.settings.client_body_timeout)
            watcher = self.watcher
            watcher.stop()
            watcher.events = WRITE
            watcher.start(self.on_client_writable)
            return
        self.sent_all()

    def on_client_writable(self):
        try:
            self._on_client_writable()
        except Exception:  # noqa: BLE001 - one bad connection never takes the worker down
            self.crashed()

    def _on_client_writable(self):
        try:
            sent = self.raw.send(self.tail)
        except BlockingIOError:
            return
        except OSError:
            return self.client_gone()
        self.tail = self.tail[sent:] or None
        if self.tail is None:
            self.watcher.stop()
            self.sent_all()
        else:
            WHEEL.arm(self, _monotonic() + self.exchange.settings.client_body_timeout)

    def sent_all(self):
        """Everything so far reached the client: the exchange is done, or more body."""
        if not self.response.complete:
            self.waiting = FOR_BODY
            WHEEL.arm(self, _monotonic() + self.exchange.settings.proxy_read_timeout)
            self.upstream._read_event.start(self.on_upstream_readable)
            return
        self.upstream._read_event.stop()
        exchange, request = self.exchange, self.request
        keep = exchange._done(request, self.response, self.keep_client, self.sent)
        self.exchange = self.request = self.upstream = self.response = None
        if not self.conn.request_done(keep):
            return self.close()
        self.dispatch()

    # -- leaving the fast path -----------------------------------------------------------
    def upstream_in_greenlet(self, failure=None, head=False):
        """The exchange needs what only the greenlet code does: hand it over as it is."""
        self.upstream._read_event.stop()
        request = self.request
        kwargs = {"failure": failure} if failure is not None else {}
        if head:
            kwargs["head"] = (self.response, self.received)
        self.exchange = self.request = self.upstream = self.response = None
        self.escalate(lambda: self.conn.finish_in_greenlet(request, **kwargs))

    def escalate(self, step):
        """Serve this connection in a greenlet from here on, ``step`` first."""
        self.watcher.stop()
        WHEEL.disarm(self)
        self.closed = True
        self.acceptor.serve_in_greenlet(self.conn, step)

    def timed_out(self):
        try:
            self._timed_out()
        except Exception:  # noqa: BLE001 - one bad connection never takes the worker down
            self.crashed()

    def _timed_out(self):
        """Called by the deadline wheel when this Lane's deadline passed."""
        waiting = self.waiting
        if waiting == FOR_UPSTREAM:
            return self.upstream_in_greenlet(UpstreamFailed(
                504, "upstream timed out while reading response header", retryable=True,
                kind="timeout"))
        if waiting == FOR_BODY:
            log.error("upstream timed out while reading upstream, client: %s",
                      self.conn.client_ip)
            self.upstream._read_event.stop()
            self.exchange._truncated(self.request, self.response, self.sent)
            self.exchange = None
            return self.close()
        if waiting == FOR_CLIENT:
            return self.client_gone()
        current = self.conn.current
        if waiting == FOR_MORE_HEAD and current is not None and not current.complete:
            try:
                self.raw.send(local_response(408, keep_alive=False))
            except OSError:
                pass
        self.close()

    def crashed(self):
        log.exception("unexpected error on connection from %s", self.conn.client_ip)
        if self.upstream is not None:
            self.upstream._read_event.stop()
            self.upstream.close()
            self.upstream = None
        self.client_gone()

    def client_gone(self):
        """Writing to the client failed: release the exchange, close the connection."""
        if self.upstream is not None:
            self.upstream._read_event.stop()
        if self.exchange is not None:
            self.exchange.abort()
            self.exchange = None
        self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.watcher.stop()
        WHEEL.disarm(self)
        if self.conn.exchange is not None:
            self.conn.exchange.abort()
            self.conn.exchange = None
        try:
            self.raw.close()
        except OSError:
            pass
        self.acceptor.lane_closed(self)
        self.conn.release()

    def move(self):
        """A reload: this idle connection goes to the new generation."""
        self.watcher.stop()
        WHEEL.disarm(self)
        self.closed = True
        self.conn.handed_off = True
        self.acceptor.queue_move(self.conn)

    def idle(self) -> bool:
        """Waiting for a request with nothing of it read: free to move or close."""
        conn = self.conn
        current = conn.current
        return (not self.closed and self.exchange is None and not conn.queue
                and (current is None or current.complete))
