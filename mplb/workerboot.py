"""Forking a worker: the one place where master code hands over to the data plane.

Kept apart from mplb.master so that the master module itself never imports gevent:
``workers.worker`` (and with it gevent) is imported only inside the forked child.
"""
from __future__ import annotations

import os
import signal
import socket


def fork_worker(master, slot, number):
    """Fork a worker for ``slot``; return ``(pid, master end of the control socket)``."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent_end.setblocking(False)
    pid = os.fork()
    if pid:
        child_end.close()
        return pid, parent_end
    # -- child ------------------------------------------------------------------
    try:
        parent_end.close()
        signal.set_wakeup_fd(-1)
        for worker in master.workers.values():
            worker.control.close()
        if master.selector is not None:
            master.selector.close()
        os.close(master.wakeup_read)
        child_end.setblocking(False)
        from workers.worker import WorkerContext, run_worker
        ctx = WorkerContext(
            config=master.config, listen_sockets=dict(master.sockets),
            control_fd=child_end.fileno(), shared=master.shared, slot=slot, number=number,
            generation=master.generation, master_pid=os.getppid(), verbose=master.verbose)
        run_worker(ctx)
    finally:
        os._exit(1)
