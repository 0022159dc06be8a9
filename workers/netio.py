"""Socket reads and writes for the hot path.

gevent's ``sendall`` costs a ``getsockopt`` and a timer set-up per call even when the
kernel takes every byte at once, which is what nearly always happens for heads and
small bodies.  ``send_all`` tries one plain non-blocking ``send`` on the underlying
socket first and falls back to gevent's cooperative ``sendall`` for the rest.

Reads take their timeout as an argument: a socket's own timeout would cost a Python
``settimeout`` per call and a pure-Python ``gevent.Timeout`` object per wait, about a
tenth of a proxied request's CPU.  ``wait_readable`` parks on the socket's read
watcher (gevent's own ``hub.wait`` protocol, so closing the socket from another
greenlet still wakes the waiter) and enters its deadline in a table that one
repeating timer per worker sweeps every ``DEADLINE_TICK`` seconds: a timed wait costs
a dict insert and delete instead of a libev timer's creation, start and close.
Proxy timeouts are seconds long, so a tenth of a second of lateness is harmless.
"""
from __future__ import annotations

import socket
import time

from gevent import socket as gsocket
from gevent.hub import Waiter

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


DEADLINE_TICK = 0.1


class _Deadlines:
    """Waiters with a deadline, and the one timer that times them out."""

    def __init__(self):
        self.waiting = {}            # Waiter -> monotonic deadline
        self.loop = None             # the loop the sweep timer runs on
        self.timer = None

    def start(self, hub):
        """First timed wait of this process (a forked worker makes its own hub)."""
        self.loop = hub.loop
        self.timer = hub.loop.timer(DEADLINE_TICK, DEADLINE_TICK, ref=False)
        self.timer.start(self.sweep)

    def sweep(self):
        now = time.monotonic()
        expired = [waiter for waiter, deadline in self.waiting.items() if deadline <= now]
        for waiter in expired:
            # Throwing runs that greenlet until it blocks again; whatever it does then
            # may already have resumed and removed a later waiter of this list.
            if self.waiting.pop(waiter, None) is not None:
                waiter.throw(socket.timeout, "timed out")


_DEADLINES = _Deadlines()
_WAITING = _DEADLINES.waiting
_monotonic = time.monotonic


def _park(hub, watcher, timeout, holder=None) -> None:
    """Wait for ``watcher`` (a socket's read or write event) with an optional deadline.

    ``holder``: an object whose ``idle_waiter`` names this wait while it lasts, so the
    hub can end it with an exception exactly when it has not been woken yet (a
    connection moving to another worker between requests).
    """
    waiter = Waiter(hub)
    watcher.start(waiter.switch, waiter)
    if timeout is not None:
        if _DEADLINES.loop is not hub.loop:
            _DEADLINES.start(hub)
        _WAITING[waiter] = _monotonic() + timeout
    if holder is not None:
        holder.idle_waiter = waiter
    try:
        waiter.get()
    finally:
        watcher.stop()
        if timeout is not None:
            _WAITING.pop(waiter, None)
        if holder is not None:
            holder.idle_waiter = None


def wait_readable(sock, timeout) -> None:
    """Park the current greenlet until ``sock`` is readable; socket.timeout after
    ``timeout`` seconds (None: no limit)."""
    _park(sock.hub, sock._read_event, timeout)


def wait_writable(sock, timeout) -> None:
    """Park the current greenlet until ``sock`` can take more bytes (as wait_readable)."""
    _park(sock.hub, sock._write_event, timeout)


def recv_into(sock, buffer, nbytes=0, timeout=None, wait_first=False, holder=None) -> int:
    """Read into ``buffer`` from a gevent socket, waiting at most ``timeout`` seconds.

    ``wait_first``: the caller expects nothing to be there yet (a response just
    asked for, the next request on a keep-alive connection), so park before the
    first read: a read that fails with EAGAIN costs a system call and an OSError
    whose message CPython decodes from the locale, several microseconds each time.
    ``holder``: see ``_park`` (plain sockets only).
    """
    if type(sock) is _PLAIN:
        raw = sock._sock
        if wait_first:
            _park(sock.hub, sock._read_event, timeout, holder)
        while True:
            try:
                return raw.recv_into(buffer, nbytes)
            except BlockingIOError:
                _park(sock.hub, sock._read_event, timeout, holder)
    sock.settimeout(timeout)
    # TLS sockets read nothing when told nbytes=0: pass a size only when there is one.
    return sock.recv_into(buffer, nbytes) if nbytes else sock.recv_into(buffer)


def peek(sock):
    """What waits unread on a (gevent or plain) socket, left in place: None when nothing does,
    ``b""`` at end of stream (or on a failed socket), else the first byte.  Never blocks."""
    try:
        return getattr(sock, "_sock", sock).recv(1, _PEEK)
    except BlockingIOError:
        return None
    except (OSError, ValueError):
        return b""
