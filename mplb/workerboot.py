"""Forking a worker: the one place where master code hands over to the data plane.

Kept apart from mplb.master so that the master module itself never imports gevent:
``mplb.workers.process`` (and with it gevent) is imported only inside the forked child.
What needs root (listen sockets, log files, TLS keys) the master opened before the fork;
the child gives root up before its first client byte (``run_worker``).
"""
from __future__ import annotations

import os
import signal
import socket


MASTER_SIGNALS = {signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD}


def fork_worker(master, slot, number):
    """Fork a worker for ``slot``; return ``(pid, master end of the control socket)``."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent_end.setblocking(False)
    # Signals stay blocked across the fork: a QUIT sent to a newborn worker must wait
    # for the worker's own handlers, not run the master's in the child.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        child_end.close()
        return pid, parent_end
    # -- child ------------------------------------------------------------------
    try:
        for signum in MASTER_SIGNALS:                # still blocked; unblocked by the worker
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the master decides on Ctrl-C
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        parent_end.close()
        signal.set_wakeup_fd(-1)
        for worker in master.workers.values():
            worker.control.close()
        if master.selector is not None:
            master.selector.close()
        os.close(master.wakeup_read)
        master.shared.allocating = False     # workers find what the master reserved
        child_end.setblocking(False)
        from mplb.workers.process import WorkerContext, run_worker
        ctx = WorkerContext(
            config=master.config, listen_sockets=dict(master.sockets),
            control_fd=child_end.fileno(), shared=master.shared, slot=slot, number=number,
            generation=master.generation, master_pid=os.getppid(), verbose=master.verbose,
            access_log_fd=master.access_logs.fd_for(master.config.access_log))
        run_worker(ctx)
    finally:
        os._exit(1)
