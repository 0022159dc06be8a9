"""Exchanges mplb answers itself: errors, ``return``, and the mplb_status location.

Like an UpstreamExchange (workers.proxy) they are an Exchange (workers.exchange): the
connection feeds them the request's body and asks them to finish.
"""
from __future__ import annotations

from mplb.workers.headers import header_bytes
from mplb.workers.responses import local_response, redirect_response

# Errors after which the connection's framing cannot be trusted: answer and close.
CLOSING_STATUSES = frozenset({400, 408, 413, 414, 417, 431, 500, 502, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class LocalAnswer:
    """An Exchange answered by mplb itself (errors, ``return``)."""

    def __init__(self, conn, status, settings=None, location=None):
        self.conn = conn
        self.status = status
        self.settings = settings
        self.location = location

    def send_body(self, request):
        request.body_chunks.clear()   # discarded: nobody upstream wants it

    def finish(self, request, force_close=False) -> bool:
        conn = self.conn
        keep_alive = (not force_close and self.status not in CLOSING_STATUSES
                      and conn.keep_alive_after(request))
        head_only = request.method == "HEAD"
        location = self.location
        if location is not None and self.status in REDIRECTS:
            url = return_text(conn, request, location)
            data = redirect_response(self.status, header_bytes(url),
                                     keep_alive=keep_alive, head_only=head_only)
        elif location is not None:
            text = return_text(conn, request, location)
            body = text.encode() if text else None
            data = local_response(self.status, body, keep_alive=keep_alive, head_only=head_only)
        else:
            data = local_response(self.status, keep_alive=keep_alive, head_only=head_only)
        conn.sock.sendall(data)
        conn.worker.accounting.log_access(conn, request, self.status, len(data), None, None)
        return keep_alive

    def abort(self):
        pass


def return_text(conn, request, location) -> str:
    """The text or URL of ``return``, its variables filled in for this request."""
    value = location.return_value
    if value is None:
        return location.return_text
    return conn.worker.variables.compiled(value.parts)(request)


class StatusAnswer(LocalAnswer):
    """The ``mplb_status`` location: statistics as JSON, Prometheus text or HTML."""

    def __init__(self, conn, settings):
        super().__init__(conn, 200, settings=settings)

    def finish(self, request, force_close=False) -> bool:
        conn = self.conn
        keep_alive = not force_close and conn.keep_alive_after(request)
        status, content_type, body = conn.worker.render_status(request)
        data = local_response(status, body, keep_alive=keep_alive, content_type=content_type,
                              extra=[b"Cache-Control: no-store\r\n"],
                              head_only=request.method == "HEAD")
        conn.sock.sendall(data)
        conn.worker.accounting.log_access(conn, request, status, len(data), None, None)
        return keep_alive
