"""Listen sockets: bound by the master (before any fork, while it may be root) and
inherited by every worker; a reload keeps the sockets whose address stays."""
from __future__ import annotations

import errno
import socket

from mplb.errors import StartupError


def bind_listens(config, existing):
    """Bind every listen of ``config``, reusing sockets in ``existing`` with the same key."""
    sockets = {}
    try:
        for listen in config.listens:
            if listen.key in existing:
                sockets[listen.key] = (existing[listen.key][0], listen)
                continue
            sockets[listen.key] = (bind_one(listen), listen)
    except StartupError:
        for key, (sock, _) in sockets.items():
            if key not in existing:
                sock.close()
        raise
    return sockets


def bind_one(listen):
    family = socket.AF_INET6 if listen.family_is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(listen.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EACCES:
            reason = "permission denied"
        raise StartupError(f"cannot bind {listen}: {reason}")
    return sock
