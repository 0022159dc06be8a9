"""Socket reads and writes for the hot path.

gevent's ``sendall`` costs a ``getsockopt`` and a timer set-up per call even when the
kernel takes every byte at once, which is what nearly always happens for heads and
small bodies.  ``send_all`` tries one plain non-blocking ``send`` on the underlying
socket first and falls back to gevent's cooperative ``sendall`` for the rest.
"""
from __future__ import annotations

import socket

from gevent import socket as gsocket

_PLAIN = gsocket.socket
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def send_all(sock, data, timeout) -> None:
    """Write all of ``data`` to a gevent socket, waiting at most ``timeout`` per stall."""
    if type(sock) is _PLAIN:          # TLS sockets must go through their SSL object
        try:
            sent = sock._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    sock.settimeout(timeout)
    sock.sendall(data)


def recv_into(sock, buffer, nbytes=0) -> int:
    """gevent's ``recv_into`` without its Python layer when bytes are already there."""
    if type(sock) is _PLAIN:
        try:
            return sock._sock.recv_into(buffer, nbytes)
        except BlockingIOError:
            pass
    # TLS sockets read nothing when told nbytes=0: pass a size only when there is one.
    return sock.recv_into(buffer, nbytes) if nbytes else sock.recv_into(buffer)


def peek(sock):
    """What waits unread on a gevent socket, left in place: None when nothing does,
    ``b""`` at end of stream (or on a failed socket), else the first byte.  Never blocks."""
    try:
        return sock._sock.recv(1, _PEEK)
    except BlockingIOError:
        return None
    except (OSError, ValueError):
        return b""
