"""One request forwarded upstream: pick, connect, send, relay the response.

An ``UpstreamExchange`` is created when a request head is complete.  It picks a
server through the upstream's balancer, takes a pooled connection (or connects,
retrying other servers as ``proxy_next_upstream`` allows), sends the pre-rendered
head in one write, streams body chunks as they arrive, and relays the response.
Bodies with a Content-Length are copied without the parser once the head is out
(large ones spliced through a pipe, workers/bodysplice.py).
"""
from __future__ import annotations

import logging
import socket
import time

from httptools import HttpParserError, HttpParserUpgrade

from mplb.workers.bodysplice import SPLICE_BODY_MIN, splice_body
from mplb.workers.bodysplice import available as splice_available
from mplb.workers.netio import recv_into, send_all
from mplb.workers.responsehead import ResponseHead, render_response_head
from mplb.workers.responses import local_response
from mplb.workers.upstream import ConnectFailed

log = logging.getLogger("mplb.proxy")

MAX_RESPONSE_HEAD = 65536
# Response heads are read into one buffer per worker: its bytes are parsed (the
# callbacks copy what they keep) before the greenlet can switch.  Body copies that
# may wait on a slow client take a buffer of their own (Worker.take_buffer).
_HEAD_BUFFER = bytearray(65536)
_HEAD_VIEW = memoryview(_HEAD_BUFFER)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_monotonic = time.monotonic


class ClientGone(Exception):
    """Writing to the client failed: nothing more can be said on this connection."""


class UpstreamFailed(Exception):
    """The upstream exchange failed before the response head reached the client."""

    def __init__(self, status, reason, retryable=False, kind="error"):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.kind = kind          # the proxy_next_upstream condition this failure is


class UpstreamExchange:
    """A request on its way to an upstream server and its response on the way back
    (an Exchange, workers.exchange)."""

    pick = None
    sock = None
    reused = False
    reader = None                # the upstream connection's ResponseHead, when kept
    failure = None               # UpstreamFailed before anything reached the client
    body_sent = 0
    bytes_in = 0
    bytes_out = 0
    last_server = None
    opened_at = 0.0              # when the connection to the current pick began
    head_seconds = None          # connect start -> response head (the histogram)

    def __init__(self, conn, request, location, worker, connect=True):
        """Prepare the exchange; with ``connect``, pick, connect and send the head now
        (the fast path, workers.fastpath, does those steps itself, without waiting)."""
        self.conn = conn
        self.worker = worker
        self.location = location
        self.settings = location.settings
        self.plan, self.upstream, self.balancer = worker.proxying(location)
        self.tried = set()
        self.request = request
        if request.chunked and self.plan.http10:
            self.failure = UpstreamFailed(411, "chunked body to an HTTP/1.0 upstream")
            return
        framing = b""
        if request.content_length is not None:
            framing = b"Content-Length: %d\r\n" % request.content_length
        elif request.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        self.framing = framing
        if connect:
            self.connect_and_send()

    # -- connecting ------------------------------------------------------------
    def connect_and_send(self):
        """Pick and connect, moving on to other servers as proxy_next_upstream allows."""
        request = self.request
        while True:
            pick = self.balancer.get(request, frozenset(self.tried))
            if pick is None:
                if self.failure is None:
                    self.failure = self.no_live_upstreams()
                return
            self.tried.add(pick.index)
            if not self.open_picked(pick):
                return

    def open_picked(self, pick) -> bool:
        """Connect to the picked server and send the head.  True only after a failure
        (recorded) that proxy_next_upstream allows to try another server for."""
        try:
            self._open(pick)
            return False
        except ConnectFailed as exc:
            self.balancer.free(pick, True)
            kind = "timeout" if exc.timed_out else "error"
            status = 504 if exc.timed_out else 502
            self.failure = UpstreamFailed(status, str(exc))
            log.error("connect() to %s failed (%s) while connecting to upstream, client: %s",
                      pick.server.hostport, exc, self.conn.client_ip)
            settings = self.settings
            max_tries = settings.proxy_next_upstream_tries or len(self.upstream.servers)
            return kind in settings.proxy_next_upstream and len(self.tried) < max_tries

    def no_live_upstreams(self):
        log.error('no live upstreams while connecting to upstream "%s", client: %s',
                  self.upstream.name, self.conn.client_ip)
        return UpstreamFailed(502, "no live upstreams")

    def _open(self, pick):
        """Connect to the picked server and send the head (once more on a stale reuse)."""
        worker = self.worker
        server = pick.server
        head = self.plan.render(self.request, server, self.framing)
        self.opened_at = _monotonic()
        self.head_seconds = None
        for _ in range(2):
            sock, reused, reader = worker.pool.acquire(
                server, self.settings.proxy_connect_timeout, verify=bool(self.framing))
            try:
                send_all(sock, head, self.settings.proxy_send_timeout)
            except OSError as exc:
                sock.close()
                if reused:
                    continue
                raise ConnectFailed(f"send failed: {exc}")
            self.pick, self.sock, self.reused, self.reader = pick, sock, reused, reader
            self.head = head
            self.bytes_in += len(head)
            self.failure = None
            return
        raise ConnectFailed("upstream closed the connection")

    # -- request body ------------------------------------------------------------
    def send_body(self, request):
        chunks = request.body_chunks
        if self.failure is not None or self.sock is None:
            chunks.clear()
            return
        if request.chunked:
            data = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
        else:
            data = b"".join(chunks)
        chunks.clear()
        try:
            send_all(self.sock, data, self.settings.proxy_send_timeout)
        except socket.timeout:
            self._fail_midway(504, "upstream timed out while sending request")
        except OSError as exc:
            self._fail_midway(502, f"upstream failed while sending request: {exc}")
        self.body_sent += len(data)
        self.bytes_in += len(data)

    def _fail_midway(self, status, reason):
        self.failure = UpstreamFailed(status, reason)
        self._release(failed=True, reusable=False)

    # -- response ----------------------------------------------------------------
    def finish(self, request, force_close=False, head=None, failure=None) -> bool:
        """Relay the response; return whether the client connection stays open.

        The fast path hands an exchange over here when it needs waiting it does not
        do: ``head`` is a response head it already read (``(response, received)``),
        ``failure`` one it met before anything reached the client.
        """
        if failure is not None:
            self.recover(request, failure)
        elif self.failure is None and request.chunked and self.sock is not None:
            try:
                self.sock.sendall(b"0\r\n\r\n")
            except OSError as exc:
                self._fail_midway(502, f"upstream failed: {exc}")
        while True:
            if self.failure is not None:
                return self._answer_failure(request)
            try:
                return self._relay(request, force_close, head)
            except UpstreamFailed as exc:
                head = None
                self.recover(request, exc)

    def recover(self, request, exc):
        """A failure before the client saw anything: release the connection (counting a
        failure unless it was the client's doing), and try another server if allowed."""
        self._release(failed=exc.status != 0, reusable=False)
        self.failure = exc
        if exc.retryable and self._may_retry(request, exc):
            self.failure = None
            self.connect_and_send()

    def _may_retry(self, request, exc) -> bool:
        """proxy_next_upstream: only before the client saw anything, never replaying a body."""
        if self.body_sent or request.content_length or request.chunked:
            return False
        max_tries = self.settings.proxy_next_upstream_tries or len(self.upstream.servers)
        return exc.kind in self.settings.proxy_next_upstream and len(self.tried) < max_tries

    def _answer_failure(self, request) -> bool:
        failure = self.failure
        conn = self.conn
        log.error("%s, client: %s, request: \"%s %s\"", failure.reason, conn.client_ip,
                  request.method, request.url.decode("latin-1", "replace"))
        data = local_response(failure.status, keep_alive=False,
                              head_only=request.method == "HEAD")
        try:
            conn.sock.sendall(data)
        except OSError:
            raise ClientGone()
        self.worker.accounting.log_access(conn, request, failure.status, len(data), self, None)
        return False

    def _read_head(self, request):
        """Read until the response head is complete; returns (ResponseHead, bytes read)."""
        buffer, view = _HEAD_BUFFER, _HEAD_VIEW
        sock = self.sock
        response = self.reader
        if response is None:
            response = self.reader = ResponseHead()
        else:
            response.reset()
        timeout = self.settings.proxy_read_timeout
        received = 0
        while True:
            try:
                # The request just went out: its answer cannot be there yet.
                count = recv_into(sock, buffer, 0, timeout, not received)
            except socket.timeout:
                raise UpstreamFailed(504, "upstream timed out while reading response header",
                                     retryable=True, kind="timeout")
            except OSError as exc:
                raise UpstreamFailed(502, f"upstream reset while reading response header ({exc})",
                                     retryable=True)
            if not count:
                raise UpstreamFailed(502, "upstream prematurely closed connection while "
                                          "reading response header", retryable=True)
            received += count
            try:
                response.parser.feed_data(view[:count])
            except HttpParserUpgrade as upgrade:
                return response, received, bytes(view[upgrade.args[0]:count])
            except (HttpParserError, ValueError) as exc:
                raise UpstreamFailed(502, f"upstream sent invalid response ({exc})")
            if response.headers_done:
                if 100 <= response.status < 200:
                    if response.status == 101:
                        raise UpstreamFailed(502, "upstream sent 101 without an upgrade")
                    response.reset()
                    continue
                return response, received, None
            if received > MAX_RESPONSE_HEAD + len(buffer):
                raise UpstreamFailed(502, "upstream sent too big header")

    def _relay(self, request, force_close, head=None) -> bool:
        if head is None:
            response, received = self._read_head_fresh(request)[:2]
            self.head_seconds = _monotonic() - self.opened_at
        else:
            response, received = head              # timed where it was read
        status = response.status
        if status == 101:
            # Only finish_upgrade may relay a 101; here it would desynchronise the
            # client, and the connection must never go back to the pool.
            raise UpstreamFailed(502, "upstream sent 101 to a request that is not an upgrade")
        if status in (502, 503, 504):
            failure = UpstreamFailed(status, f"upstream answered {status}", retryable=True,
                                     kind=f"http_{status}")
            if self._may_retry(request, failure):
                raise failure
        return self._relay_body(request, response, received, force_close)

    def _read_head_fresh(self, request):
        """``_read_head``, once more on a new connection if a pooled one was stale."""
        if not self.reused:
            return self._read_head(request)
        try:
            return self._read_head(request)
        except UpstreamFailed as exc:
            if not exc.retryable or exc.status == 504 or self.body_sent:
                raise
            # The backend closed the idle connection before it saw our request.
            self.sock.close()
            self.sock = None
            self.reused = False
            self._reconnect_same()
            return self._read_head(request)

    def _reconnect_same(self):
        pick = self.pick
        try:
            self._open(pick)
        except ConnectFailed as exc:
            raise UpstreamFailed(502, str(exc), retryable=True)

    def client_head(self, request, response, force_close):
        """The response head the client gets: ``(head, keep_client, head_only, rechunk)``.

        Framing: a counted body keeps its Content-Length; a chunked or read-until-close
        body is re-chunked for an HTTP/1.1 client, or ends the connection for 1.0.
        """
        status = response.status
        head_only = request.method == "HEAD" or status in (204, 304)
        length = response.content_length
        keep_client = not force_close and self.conn.keep_alive_after(request, self.settings)
        if head_only:
            framing = b"Content-Length: %s\r\n" % length if length is not None else b""
        elif length is not None and not response.chunked:
            framing = b"Content-Length: %s\r\n" % length
        elif request.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""
            keep_client = False
        balancer = self.balancer
        extra = (balancer.response_headers(self.pick, request, response.headers)
                 if balancer.persistence is not None else ())
        return (render_response_head(response, framing, extra, keep_client), keep_client,
                head_only, framing.startswith(b"Transfer"))

    def _relay_body(self, request, response, received, force_close) -> bool:
        head, keep_client, head_only, rechunk = self.client_head(request, response,
                                                                 force_close)
        length = response.content_length
        chunked_up = response.chunked
        body = b"".join(response.body)
        response.body.clear()
        if head_only and (body or chunked_up or length not in (None, b"0")):
            # The parser cannot know a response answers HEAD: a backend may (wrongly)
            # send the body it announced, now or a moment later.  The client must not
            # see it, and the connection is not pooled.
            body = b""
            response.keep_alive = False
        self.bytes_out += received
        sent = len(head)
        out = head + (b"%x\r\n%s\r\n" % (len(body), body) if rechunk and body else body)
        if head_only or response.complete:
            if rechunk and not head_only:
                out += b"0\r\n\r\n"
            self._send_client(out)
            response.complete = True
            return self._done(request, response, keep_client, sent + len(body))
        self._send_client(out)
        sent += len(body)
        # The rest of the body: a buffer of our own, since a send may wait with bytes in it.
        worker = self.worker
        buffer = worker.take_buffer()
        try:
            if length is not None and not chunked_up:
                remaining = int(length) - len(body)
                return self._copy_counted(request, response, remaining, buffer,
                                          memoryview(buffer), keep_client, sent)
            return self._copy_parsed(request, response, rechunk, buffer, memoryview(buffer),
                                     keep_client, sent)
        finally:
            worker.give_buffer(buffer)

    def _copy_counted(self, request, response, remaining, buffer, view, keep_client, sent):
        """A Content-Length body: copy exactly ``remaining`` bytes, no parsing."""
        sock = self.sock
        client = self.conn.sock
        if remaining >= SPLICE_BODY_MIN and splice_available(sock, client):
            result = splice_body(sock, client, remaining, self.settings.proxy_read_timeout,
                                 self.settings.client_body_timeout)
            if result is not None:
                moved, failed = result
                self.bytes_out += moved
                sent += moved
                if failed == "client":
                    self._release(failed=False, reusable=False)
                    raise ClientGone()
                if failed == "upstream":
                    return self._truncated(request, response, sent)
                response.complete = True
                return self._done(request, response, keep_client, sent)
        size = len(buffer)
        timeout = self.settings.proxy_read_timeout
        while remaining > 0:
            try:
                count = recv_into(sock, buffer, min(size, remaining), timeout)
            except OSError:
                count = 0
            if not count:
                return self._truncated(request, response, sent)
            remaining -= count
            self.bytes_out += count
            self._send_client(view[:count])
            sent += count
        response.complete = True       # the parser never saw these bytes: mark the end
        return self._done(request, response, keep_client, sent)

    def _copy_parsed(self, request, response, rechunk, buffer, view, keep_client, sent):
        """A chunked or read-until-close body: let the parser find its end."""
        sock = self.sock
        parser = response.parser
        timeout = self.settings.proxy_read_timeout
        while not response.complete:
            try:
                count = recv_into(sock, buffer, 0, timeout)
            except OSError:
                count = 0
            if not count:
                if response.chunked:
                    return self._truncated(request, response, sent)
                # A read-until-close body: the backend's close is its end.
                if rechunk:
                    self._send_client(b"0\r\n\r\n")
                response.keep_alive = False
                return self._done(request, response, keep_client, sent)
            self.bytes_out += count
            try:
                parser.feed_data(view[:count])
            except HttpParserError:
                return self._truncated(request, response, sent)
            if response.body:
                data = b"".join(response.body)
                response.body.clear()
                out = b"%x\r\n%s\r\n" % (len(data), data) if rechunk else data
                self._send_client(out)
                sent += len(data)
        if rechunk:
            self._send_client(b"0\r\n\r\n")
        return self._done(request, response, keep_client, sent)

    def _send_client(self, data):
        client = self.conn.sock
        try:
            send_all(client, data, self.settings.client_body_timeout)
        except OSError:
            self._release(failed=False, reusable=False)
            raise ClientGone()

    def _truncated(self, request, response, sent) -> bool:
        """The backend died mid-body: close the client so it sees the truncation."""
        log.error("upstream prematurely closed connection while reading upstream, client: %s",
                  self.conn.client_ip)
        self._release(failed=True, reusable=False)
        self.worker.accounting.log_access(self.conn, request, response.status, sent, self, response)
        return False

    def _done(self, request, response, keep_client, sent) -> bool:
        reusable = (response.keep_alive and response.complete and self.plan.keepalive
                    and self.upstream.keepalive > 0 and not request.upstream_close)
        self._release(failed=False, reusable=reusable)
        accounting = self.worker.accounting
        if accounting.logging:
            accounting.log_access(self.conn, request, response.status, sent, self, response)
        return keep_client

    def _release(self, failed, reusable):
        """Give the connection back (or close it) and tell the balancer, once."""
        pick, sock = self.pick, self.sock
        self.sock = None
        if sock is not None:
            reader = self.reader
            kept = reader if reusable and reader is not None and reader.parsed else None
            if reusable:
                self.worker.pool.release(pick.server, sock, self.upstream.keepalive, kept)
            else:
                sock.close()
            if reader is not None and kept is None:
                reader.parser = None       # parses nothing more: end the head<->parser cycle
                self.reader = None
        if pick is not None:
            self.pick = None
            self.balancer.free(pick, failed)
            self.worker.accounting.count_exchange(pick.server, self.bytes_in, self.bytes_out,
                                                  self.head_seconds)
            self.last_server = pick.server

    def abort(self):
        self._release(failed=False, reusable=False)

    # -- upgrades ------------------------------------------------------------------
    def finish_upgrade(self, request, client_pending) -> tuple:
        """Relay the backend's answer to an upgrade: ``(tunnelled, keep_alive)``.

        A 101 hands both sockets to a tunnel; any other answer is relayed as a plain
        response, after which the connection stays open only if ``keep_alive``.
        """
        worker = self.worker
        while True:
            if self.failure is not None:
                return False, self._answer_failure(request)
            try:
                response, received, backend_pending = self._read_head_fresh(request)
                break
            except UpstreamFailed as exc:
                # As for plain requests: another server when proxy_next_upstream allows.
                self._release(failed=True, reusable=False)
                self.failure = exc
                if exc.retryable and self._may_retry(request, exc):
                    self.failure = None
                    self.connect_and_send()
        self.head_seconds = _monotonic() - self.opened_at
        if backend_pending is None or response.status != 101:
            return False, self._relay_body(request, response, received, False)
        pick = self.pick
        worker.accounting.response_timed(pick.server, self.head_seconds)
        extra = self.balancer.response_headers(pick, request, response.headers)
        head = render_response_head(response, b"", extra, None, upgrade=True)
        self._send_client(head)
        self.bytes_out += received
        worker.accounting.log_upgrade(self.conn, request, self.upstream, pick)
        sock, self.sock, self.pick = self.sock, None, None
        self.reader = None
        response.parser = None          # the head and its parser point at each other
        worker.tunnels.open(self.conn, request, sock, pick, self.balancer, self.settings,
                            client_pending, backend_pending, self.bytes_in, self.bytes_out)
        return True, False
