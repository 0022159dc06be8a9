"""Zero-copy relay of a counted response body: upstream socket -> pipe -> client socket.

Copying a large body through a Python buffer costs a recv, a send and two copies per
64 KiB; ``os.splice`` moves the pages through a pipe inside the kernel
(scripts/bench_relay.py measured about twice the throughput for tunnels).  Used for
plain TCP on both sides and bodies of at least ``SPLICE_BODY_MIN`` bytes.  A worker
keeps a few empty pipes for reuse; a pipe that may still hold bytes (a failed relay)
is closed instead.
"""
from __future__ import annotations

import fcntl
import os
import socket

from gevent import socket as gsocket

from mplb.workers.netio import wait_readable, wait_writable

SPLICE_BODY_MIN = 128 * 1024
PIPE_SIZE = 256 * 1024                  # asked of the kernel; the default is 64 KiB
IDLE_PIPES = 8
_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 0) | getattr(os, "SPLICE_F_MOVE", 0)
_idle = []                              # [(read fd, write fd, capacity)], all empty


def available(src, dst) -> bool:
    """splice applies: the platform has it and neither side is TLS."""
    return hasattr(os, "splice") and type(src) is gsocket.socket and type(dst) is gsocket.socket


def _take_pipe():
    if _idle:
        return _idle.pop()
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None                     # out of fds: the caller copies instead
    try:
        capacity = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        capacity = 65536
    return r, w, capacity


def _give_pipe(pipe, empty: bool) -> None:
    if empty and len(_idle) < IDLE_PIPES:
        _idle.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def splice_body(src, dst, remaining, read_timeout, send_timeout):
    """Move exactly ``remaining`` bytes from ``src`` to ``dst``.

    Returns ``(delivered, failed_side)``: failed_side is None on success, "upstream"
    when ``src`` ended, failed or went silent for ``read_timeout``, "client" when
    ``dst`` failed or took nothing for ``send_timeout``.  None when no pipe is free.
    """
    pipe = _take_pipe()
    if pipe is None:
        return None
    r, w, capacity = pipe
    src_fd, dst_fd = src.fileno(), dst.fileno()
    delivered = inpipe = 0
    failed = None
    try:
        while remaining or inpipe:
            if remaining and inpipe < capacity:
                try:
                    n = os.splice(src_fd, w, min(remaining, capacity - inpipe), flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except OSError:
                    failed = "upstream"
                    break
                if n == 0:
                    failed = "upstream"         # EOF before the announced length
                    break
                if n > 0:
                    remaining -= n
                    inpipe += n
                elif not inpipe:
                    try:
                        wait_readable(src, read_timeout)
                    except socket.timeout:
                        failed = "upstream"
                        break
                    continue
            try:
                m = os.splice(r, dst_fd, inpipe, flags=_FLAGS)
            except BlockingIOError:
                try:
                    wait_writable(dst, send_timeout)
                except socket.timeout:
                    failed = "client"
                    break
                continue
            except OSError:
                failed = "client"
                break
            inpipe -= m
            delivered += m
    finally:
        _give_pipe(pipe, empty=failed is None and not inpipe)
    return delivered, failed
