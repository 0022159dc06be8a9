"""Responses mplb writes itself: error pages, ``return``, and response-head helpers."""
from __future__ import annotations

from http import HTTPStatus


def reason_phrase(status: int) -> str:
    if status == 499:
        return "Client Closed Request"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def local_response(status: int, body: bytes = None, *, keep_alive: bool,
                   content_type: bytes = b"text/plain", extra: list = (),
                   head_only: bool = False) -> bytes:
    """A complete response; the default body is a short text naming the status."""
    phrase = reason_phrase(status)
    if body is None:
        body = b"" if status in (204, 304) else f"{status} {phrase}\n".encode()
    lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode(), b"Server: mplb\r\n"]
    if status not in (204, 304) and status >= 200:
        lines += [b"Content-Type: ", content_type, b"\r\n",
                  b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
    lines += extra
    lines.append(b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def redirect_response(status: int, location: bytes, *, keep_alive: bool,
                      head_only=False) -> bytes:
    """``location``: the header value, already free of CR, LF and NUL."""
    body = f"{status} {reason_phrase(status)}\n".encode()
    extra = [b"Location: ", location, b"\r\n"]
    return local_response(status, body, keep_alive=keep_alive, extra=extra, head_only=head_only)


CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
