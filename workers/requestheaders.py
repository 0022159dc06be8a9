"""Request headers that change how mplb handles a request, each checked as it arrives.

The parser's header callback looks a header up here by its lower-case name (and only
names of one of these lengths are lowercased, so a common header costs one set lookup);
the handler records what the header means on the Request, or raises BadRequest when it
makes the request one mplb must refuse (smuggling, an unknown expectation).
"""
from __future__ import annotations

from mplb.workers.headers import connection_tokens
from mplb.workers.request import BadRequest


def _connection_header(request, value):
    tokens = connection_tokens(value)
    named = tokens - {b"close", b"keep-alive", b"upgrade"}
    request.connection_named = (request.connection_named or frozenset()) | named
    if b"upgrade" in tokens:
        request.is_upgrade = True    # confirmed in on_headers_complete


def _expect_header(request, value):
    if value.lower() != b"100-continue":
        raise BadRequest(417, "unsupported expectation")
    request.expect_continue = True


def _transfer_encoding_header(request, value):
    if value.strip().lower() != b"chunked" or request.chunked:
        raise BadRequest(400, "unsupported transfer coding")
    request.chunked = True


def _content_length_header(request, value):
    request.content_length = int(value)


def _host_header(request, value):
    if request.host_seen:
        raise BadRequest(400, "duplicate Host header")   # nginx: 400
    request.host_seen = True
    request.host_value = value


def _forwarded_for_header(request, value):
    previous = request.forwarded_for
    request.forwarded_for = value if previous is None else previous + b", " + value


SPECIAL_REQUEST_HEADERS = {b"connection": _connection_header, b"expect": _expect_header,
                           b"transfer-encoding": _transfer_encoding_header,
                           b"content-length": _content_length_header, b"host": _host_header,
                           b"x-forwarded-for": _forwarded_for_header}
SPECIAL_LENGTHS = frozenset(len(name) for name in SPECIAL_REQUEST_HEADERS)
