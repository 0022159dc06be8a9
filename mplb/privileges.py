"""Least privilege: who the workers run as, and the one-way switch to that user.

The master keeps the privileges it was started with: binding ports below 1024, opening
log files, reading TLS keys and doing all of that again at a reload need them.  Workers
parse every stranger's bytes, so when the master is root each forked worker gives root
up for good (the ``user`` directive; ``nobody`` by default) once it is built, before its
event loop reads the first client byte (mplb.workers.process).  Names are resolved when
the configuration is loaded: a typo fails at ``-t``, and a worker never calls the name
service after a fork from the threaded master.
"""
from __future__ import annotations

import grp
import os
import pwd

DEFAULT_USER = "nobody"
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38


class PrivilegeError(OSError):
    """The switch did not leave the process where it must be; the worker must not run."""


def running_as_root() -> bool:
    return os.geteuid() == 0


def lookup(user: str, group: str | None) -> tuple:
    """``(uid, gid, group name)`` of ``user`` and ``group`` (default: the user's primary
    group); raises LookupError with the message an operator should read."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f'unknown user "{user}"') from None
    if group is None:
        try:
            return entry.pw_uid, entry.pw_gid, grp.getgrgid(entry.pw_gid).gr_name
        except KeyError:
            return entry.pw_uid, entry.pw_gid, str(entry.pw_gid)
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid, group
    except KeyError:
        raise LookupError(f'unknown group "{group}"') from None


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary group, for good.

    Order matters: groups and gid can only be changed while still root.  All three ids
    (real, effective, saved) change, so nothing is left to switch back to; the process
    also stops being dumpable (another process of the same user cannot ptrace it, read
    its memory or open its descriptors through /proc) and can never gain privileges
    again through exec.  Raises PrivilegeError if the result is not exactly that.
    """
    prctl = _prctl_function()               # loaded first: the new user may not read it
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)              # after the switch, which resets it
    check_dropped(uid, gid)


def check_dropped(uid: int, gid: int) -> None:
    """Raise PrivilegeError unless the process is ``uid``/``gid`` and cannot get root back."""
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
            or os.getgroups():
        raise PrivilegeError(f"privileges not dropped: uids {os.getresuid()}, gids "
                             f"{os.getresgid()}, groups {os.getgroups()}")
    if uid == 0:
        return                          # "user root;": nothing to give up
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("privileges not dropped: root could be regained")


def _prctl_function():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(option: int, value: int) -> None:
        if libc.prctl(option, value, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise PrivilegeError(errno, f"prctl({option}): {os.strerror(errno)}")
    return prctl
