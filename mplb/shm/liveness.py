"""Whether a segment's master still lives, and removing the segments of dead ones.

The master holds a write lock on byte ``LOCK_LIVE`` of its segment file for as long as
it lives (taken in ``SharedState.create``, before the header is written).  The kernel
drops a process's POSIX locks when it dies, however it dies (SIGKILL included), so a
segment whose lock nobody holds belongs to no running master, whatever its pid now
names: a recycled pid running something else does not keep it alive.  Workers never
take that byte, and no process of a master opens the file a second time (closing any
descriptor of a file drops the process's locks on it).

``remove_stale_segments`` runs in a master before it creates its own segment.  It
removes only regular files named ``mplb.<pid>`` whose header is mplb's (magic, this
layout version, the same pid in the header) and whose lock is free; as a second guard it
keeps a file whose pid is a running process titled as an mplb master.  mplb-stats asks
``segment_owner`` to ignore a stale segment.
"""
from __future__ import annotations

import fcntl
import os
import re
import stat
import struct

from mplb.shm.layout import HDR_MASTER_PID, HDR_VERSION, HEADER_BYTES, MAGIC, VERSION
from mplb.shm.tables import LOCK_LIVE

MASTER_TITLE = "mplb: master process"       # the master's process title (mplb.cli sets it)
_NAME = re.compile(r"mplb\.([1-9][0-9]{0,9})")
_FLOCK = "hhqqi"                             # struct flock: type, whence, start, len, pid


def hold(fd: int) -> None:
    """Master: take the liveness lock of the segment it just created."""
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, LOCK_LIVE, os.SEEK_SET)


def holder(fd: int):
    """The pid holding the liveness lock of the file open at ``fd``, or None."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, LOCK_LIVE, 1, 0)
    kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if kind == fcntl.F_UNLCK else pid


def segment_owner(path: str):
    """The pid of the live master holding the segment at ``path``, or None when it is
    stale; raises OSError when the file cannot be opened."""
    fd = _open_segment(path)
    try:
        return holder(fd)
    finally:
        os.close(fd)


def remove_stale_segments(directory: str) -> list:
    """Remove the segments of masters that no longer run; return their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _NAME.fullmatch(name)
        path = os.path.join(directory, name)
        if match and _remove_if_stale(path, int(match.group(1))):
            removed.append(path)
    return removed


def _open_segment(path: str) -> int:
    """A read-only descriptor of a regular file at ``path`` (never through a symbolic
    link, never blocking on a FIFO someone planted)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _remove_if_stale(path: str, pid: int) -> bool:
    try:
        fd = _open_segment(path)
    except OSError:
        return False
    try:
        if not _is_mplb_segment(fd, pid) or holder(fd) is not None or _master_runs(pid):
            return False
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False                     # replaced meanwhile: not what was checked
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _is_mplb_segment(fd: int, pid: int) -> bool:
    header = os.pread(fd, HEADER_BYTES, 0)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        return False
    word = struct.Struct("<q").unpack_from
    return word(header, HDR_VERSION * 8)[0] == VERSION \
        and word(header, HDR_MASTER_PID * 8)[0] == pid


def _master_runs(pid: int) -> bool:
    """Whether ``pid`` is a running mplb master other than this process (a second
    guard: a live master also holds the lock)."""
    if pid == os.getpid():
        return False           # an earlier process with this pid: it cannot be running
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            title = handle.read(len(MASTER_TITLE))
    except OSError:
        return False
    return title == MASTER_TITLE.encode()
