"""Log files the workers write: opened by the master, handed to workers as descriptors.

The master opens every log file (created with mode 0644 if missing) before it forks,
while it may still be root; workers inherit the descriptors and never open a log path,
so the user they run as needs no access to the log directory.  On USR1 the master
reopens each file by its path and passes the new descriptor to every worker over the
worker's control socket (SCM_RIGHTS), one message per file: one byte, ``e`` (error_log)
or ``a`` (access_log), carrying one descriptor.  (nginx instead makes the files owned by
the worker user and has the workers reopen the paths, which fails when the directory
is not open to that user, as /var/log subdirectories often are not.)
"""
from __future__ import annotations

import array
import logging
import os
import socket

from mplb import logs
from mplb.errors import StartupError

log = logging.getLogger("mplb.master")

ERROR_LOG, ACCESS_LOG = b"e", b"a"
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


def open_log(path: str) -> int:
    """A descriptor appending to ``path``; raises StartupError naming the file."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f'open() "{path}" failed ({exc.errno}: {exc.strerror})') from None


class AccessLogFiles:
    """The master's descriptors of the access logs that running generations write."""

    def __init__(self):
        self.fds = {}                    # path -> descriptor

    def open(self, path):
        """The descriptor for ``path`` (opened once, shared by generations), or None."""
        if path is None:
            return None
        if path not in self.fds:
            self.fds[path] = open_log(path)
        return self.fds[path]

    def fd_for(self, path):
        return self.fds.get(path) if path is not None else None

    def reopen(self) -> None:
        """USR1: open every path anew (a rotated file stays with its old descriptor)."""
        for path, old in list(self.fds.items()):
            try:
                self.fds[path] = open_log(path)
            except StartupError as exc:
                log.error("cannot reopen the access log: %s", exc)
                continue
            os.close(old)

    def keep(self, paths) -> None:
        """Close the descriptors of paths no running generation writes any more."""
        wanted = set(paths)
        for path in [path for path in self.fds if path not in wanted]:
            os.close(self.fds.pop(path))


def reopen_logs(access_logs, workers, configs) -> None:
    """USR1 in the master: reopen the error log and the access logs here, where they
    can be opened, and pass each worker the new descriptors of the files it writes."""
    logs.reopen()
    access_logs.reopen()
    error_fd = logs.error_log_fd()
    for worker in workers:
        if error_fd is not None:
            send_log(worker.control, ERROR_LOG, error_fd)
        config = configs.get(worker.generation)
        access_fd = access_logs.fd_for(config.access_log if config is not None else None)
        if access_fd is not None:
            send_log(worker.control, ACCESS_LOG, access_fd)


def send_log(control, kind: bytes, fd: int) -> bool:
    """Master: pass ``fd`` (``kind`` ERROR_LOG or ACCESS_LOG) to one worker."""
    try:
        control.sendmsg([kind], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [fd]))])
        return True
    except OSError as exc:
        log.error("cannot pass a log file to a worker: %s", exc)
        return False


def receive_log(control):
    """Worker: the next ``(kind, fd)`` from the master; ``None`` when the master is gone.

    A message without exactly one descriptor gives ``(kind, None)`` (whatever came is
    closed): the master sends nothing else, so it is ignored.
    """
    data, ancdata, _, _ = control.recvmsg(1, _FD_SPACE)
    if not data:
        return None
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return data, None
    return data, fds[0]
