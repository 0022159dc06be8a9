"""The upstream's response head: collected by httptools callbacks, rendered for the client.

A ``ResponseHead`` lives as long as its upstream connection: the callbacks only
collect, rendering the header lines to relay as they arrive, and the object with its
parser serves the connection's next response too.  ``render_response_head`` turns it
into the client's head in one join: hop-by-hop headers removed, framing, persistence
cookies and the client's Connection header added.
"""
from __future__ import annotations

from httptools import HttpResponseParser

from mplb.workers.headers import HOP_BY_HOP, connection_tokens
from mplb.workers.responses import reason_phrase

MAX_RESPONSE_HEADERS = 256
RESPONSE_SKIP = HOP_BY_HOP | {b"content-length"}


def _response_connection(response, value):
    named = connection_tokens(value) - {b"close", b"keep-alive", b"upgrade"}
    if named:
        response.connection_named = named


def _response_content_length(response, value):
    response.content_length = value


def _response_transfer_encoding(response, value):
    response.chunked = True


def _response_upgrade(response, value):
    response.upgrade = value


# What the response callback does with the headers mplb never relays as received.
RESPONSE_SPECIAL = {b"connection": _response_connection,
                    b"content-length": _response_content_length,
                    b"transfer-encoding": _response_transfer_encoding,
                    b"upgrade": _response_upgrade}
RESPONSE_SKIP_LENGTHS = frozenset(len(name) for name in RESPONSE_SKIP)


class ResponseHead:
    """httptools callbacks for the responses on one upstream connection; they only collect.

    Header lines to relay are rendered as they arrive (``lines``), so the client head
    is one join.  The object and its parser serve the connection's next response too
    (``reset``) when the parser saw this one to its end.
    """

    __slots__ = ("parser", "status", "status_text", "headers_done", "complete", "parsed",
                 "keep_alive", "content_length", "chunked", "connection_named", "upgrade",
                 "headers", "lines", "body")

    def __init__(self):
        self.parser = HttpResponseParser(self)
        self.reset()

    def reset(self):
        """Forget the last response (or an interim 1xx); the next one uses the same parser."""
        self.status = 0
        self.status_text = b""
        self.headers_done = False
        self.complete = False            # the response's end reached (by the parser or a count)
        self.parsed = False              # the parser itself saw the end: it may parse the next
        self.keep_alive = False
        self.content_length = None       # raw bytes of the Content-Length value
        self.chunked = False
        self.connection_named = None     # extra hop-by-hop names from Connection
        self.upgrade = None
        self.headers = []
        self.lines = []
        self.body = []

    def on_status(self, text):
        self.status_text += text

    def on_header(self, name, value):
        # The head's total size is bounded by what _read_head agrees to receive.
        self.headers.append((name, value))
        if len(name) in RESPONSE_SKIP_LENGTHS:
            lname = name.lower()
            if lname in RESPONSE_SKIP:
                handler = RESPONSE_SPECIAL.get(lname)
                if handler is not None:
                    handler(self, value)
                return
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self):
        if len(self.headers) > MAX_RESPONSE_HEADERS:
            raise ValueError("upstream response has too many headers")
        self.headers_done = True
        parser = self.parser
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        self.complete = self.parsed = True


def render_response_head(response, framing, extra, keep_client, upgrade=False) -> bytes:
    """The client-facing response head: hop-by-hop removed, framing and cookies added."""
    status = response.status
    text = response.status_text or reason_phrase(status).encode()
    out = [b"HTTP/1.1 %d " % status, text, b"\r\n"]
    if response.connection_named:
        skip = RESPONSE_SKIP | response.connection_named
        for name, value in response.headers:
            if name.lower() not in skip:
                out += (name, b": ", value, b"\r\n")
    else:
        out += response.lines
    if upgrade:
        out += [b"Upgrade: ", response.upgrade or b"websocket",
                b"\r\nConnection: upgrade\r\n"]
    else:
        out.append(framing)
    out += extra
    if keep_client is not None:
        out.append(b"Connection: keep-alive\r\n" if keep_client else b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)
