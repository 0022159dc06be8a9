"""The worker process: boot after fork, run, heartbeat, stop.

The master forks a worker and calls ``run_worker``; everything gevent happens from
here on, so the master never imports gevent.  ``Lifecycle`` is what the process does
with its time: start accepting, tell the master it is ready, prove every second that
its event loop runs, take the log files the master passes after USR1, and stop when
told (QUIT: finish in-flight work and hand tunnels over; TERM: now).

A worker of a root master gives root up (the ``user`` directive, mplb.privileges) once
it is built and prepared, before its event loop reads the first client byte; from then
on it opens no file by path (the master passes log files) and imports nothing new
(its user may be unable to read the Python installation, e.g. one under /root).
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time

import gevent
from gevent import socket as gsocket

from mplb import logfiles, logs
from mplb.control import HEARTBEAT, READY, ControlWriter
from mplb.privileges import drop_privileges
from mplb.shm.layout import W_STORE_DROPPED
from mplb.workers import tunnel
from mplb.workers.handover import HandoverServer, successor_pids
from mplb.workers.memprobe import start_memory_probe

log = logging.getLogger("mplb.worker")

HEARTBEAT_INTERVAL = 1.0
EXIT_BOOT_FAILURE = 3          # the master stops instead of re-forking forever
TRIM_AFTER_ACCEPTS = 256
DRAIN_TICK = 0.05


class WorkerContext:
    """What the master hands a worker at fork time."""

    def __init__(self, config, listen_sockets, control_fd, shared, slot, number,
                 generation, master_pid, verbose, access_log_fd=None):
        self.config = config
        self.listen_sockets = listen_sockets      # {listen key: (socket, Listen)}
        self.control_fd = control_fd
        self.control = ControlWriter(control_fd)  # every frame to the master goes here
        self.shared = shared
        self.slot = slot
        self.number = number
        self.generation = generation
        self.master_pid = master_pid
        self.verbose = verbose
        self.access_log_fd = access_log_fd        # opened by the master; None: off


class Lifecycle:
    """Start, heartbeat and stop of one worker process."""

    def __init__(self, worker):
        self.worker = worker
        self.ctx = worker.ctx
        self.handover = None

    def prepare(self):
        """Listen, take signals, open the handover socket: nothing runs until ``run``
        (no greenlet, no client byte, before the event loop first runs)."""
        worker = self.worker
        worker.acceptor.start(self.ctx.listen_sockets)
        gevent.signal_handler(signal.SIGQUIT, self.graceful_stop)
        gevent.signal_handler(signal.SIGTERM, self.fast_stop)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # new log files come from the master
        # fork_worker left signals blocked until these handlers exist; any QUIT or TERM
        # sent meanwhile is delivered now, to them.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        receivers = {"tunnel": (2, worker.tunnels.adopt),
                     "connection": (1, worker.acceptor.adopt)}
        try:
            self.handover = HandoverServer(self.ctx.master_pid, receivers)
        except OSError as exc:
            log.error("cannot listen for handovers: %s", exc)

    def run(self):
        """Report ready and serve until stopped."""
        self.ready_sent = False
        self.send_ready()                           # the master may retire the old now
        gevent.spawn(self.control_loop)
        gevent.spawn(self.heartbeat_loop).join()

    def send_ready(self):
        try:
            self.ready_sent = self.ctx.control.send(READY)
        except OSError:
            self.fast_stop()

    def heartbeat_loop(self):
        """Prove to the master that the event loop runs; leave if the master is gone."""
        control = self.ctx.control
        acceptor = self.worker.acceptor
        while True:
            if os.getppid() != self.ctx.master_pid:
                log.error("master process is gone, worker exiting")
                self.fast_stop()
            if not self.ready_sent:
                self.send_ready()
            try:
                control.send(HEARTBEAT)
            except OSError:
                self.fast_stop()
            self.worker.accounting.access_log.flush()   # a quiet worker writes its lines
            if acceptor.accepted_since_trim >= TRIM_AFTER_ACCEPTS:
                acceptor.accepted_since_trim = 0
                release_free_memory()
            gevent.sleep(HEARTBEAT_INTERVAL)

    def control_loop(self):
        """Take the log files the master reopened (USR1) over the control socket."""
        control = gsocket.socket(fileno=os.dup(self.ctx.control_fd))
        try:
            while True:
                message = logfiles.receive_log(control)
                if message is None:
                    return                    # the master is gone: heartbeats notice
                kind, fd = message
                if fd is None:
                    continue
                if kind == logfiles.ERROR_LOG:
                    logs.use_error_log_fd(fd)
                elif kind == logfiles.ACCESS_LOG:
                    self.worker.accounting.access_log.replace(fd)
                else:
                    os.close(fd)
        except OSError as exc:
            log.error("control socket failed: %s", exc)
        finally:
            control.close()

    def graceful_stop(self):
        """Stop accepting, finish in-flight requests, then tunnels (bounded by config).

        Retiring for a newer generation (a reload), hand it every plain-TCP connection
        between requests and every movable tunnel; stopping for good, close idle
        connections and let tunnels end.
        """
        worker = self.worker
        if worker.stopping:
            return
        worker.stopping = True
        worker.handing_over = bool(self._successors())
        worker.acceptor.stop()
        gevent.spawn(self._drain)

    def _successors(self) -> list:
        return successor_pids(self.worker.shared, self.ctx.generation)

    def _drain(self):
        worker = self.worker
        deadline = worker.config.worker_shutdown_timeout
        started = time.monotonic()
        while True:
            stopping_for = time.monotonic() - started
            targets = self._successors() if worker.handing_over else []
            if targets:
                worker.acceptor.hand_over_idle(targets)
            else:                      # stopping for good, or no successor after all
                worker.acceptor.drop_queued()
                worker.acceptor.close_idle(stopping_for, spare_tls=worker.handing_over)
            worker.tunnels.hand_over(targets)
            if not (worker.acceptor.busy() or tunnel.live_tunnel_count()):
                break
            if deadline is not None and time.monotonic() - started >= deadline:
                tunnel.close_all_tunnels("shutdown", 1001)
                break
            worker.acceptor.move_ready.wait(DRAIN_TICK)
            worker.acceptor.move_ready.clear()
        self.exit(0)

    def fast_stop(self):
        self.exit(0)

    def exit(self, code):
        stop_profiling()
        self.worker.accounting.access_log.flush()
        logging.shutdown()
        os._exit(code)


def run_worker(ctx):
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        try:
            from setproctitle import setproctitle
            setproctitle(f"mplb: worker process #{ctx.number}")
        except ImportError:
            pass
        gevent.reinit()
        # What exists now (config, modules) lives as long as the worker: keep it out of
        # every collection, and collect the young generation less often.
        gc.freeze()
        gc.set_threshold(7000, 20, 20)
        if ctx.shared is not None and ctx.config.shared_store is not None:
            connect_announcements(ctx)               # before the balancers exist
        try:
            from mplb.workers.worker import Worker
            worker = Worker(ctx)
            worker.lifecycle.prepare()
            start_profiling()
            start_memory_probe()
            if ctx.config.user is not None:
                drop_privileges(ctx.config.user.uid, ctx.config.user.gid)
        except Exception as exc:   # noqa: BLE001 - reported to the master by exit code
            log.error("worker boot failed: %s", exc)
            logging.shutdown()
            os._exit(EXIT_BOOT_FAILURE)
        if ctx.shared is not None:
            ctx.shared.worker_started(ctx.slot, os.getpid(), ctx.generation)
        worker.lifecycle.run()
    except SystemExit as exc:
        code = exc.code or 0
    except BaseException:   # noqa: BLE001 - the child must never return into the master code
        log.exception("worker crashed")
        code = 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def connect_announcements(ctx):
    """Cluster tables announce new entries to the master through the control socket;
    what a full socket drops is counted in this worker's record."""
    q, word = ctx.shared.q, ctx.shared.worker_word(ctx.slot, W_STORE_DROPPED)

    def count_drop():
        q[word] += 1

    ctx.control.count_drop = count_drop
    ctx.shared.announce = ctx.control.announce


# -- process-wide services ------------------------------------------------------------
_PROFILE = {"profiler": None, "file": None}


def start_profiling():
    """MPLB_PROFILE_DIR=DIR: cProfile each worker, one file per pid, written at exit
    (to a file opened now, before the worker gives root up)."""
    directory = os.environ.get("MPLB_PROFILE_DIR")
    if directory:
        import cProfile
        import marshal  # noqa: F401 - used at exit, when the worker may not import
        _PROFILE["file"] = open(os.path.join(directory, f"worker-{os.getpid()}.prof"), "wb")
        _PROFILE["profiler"] = cProfile.Profile(time.process_time)
        _PROFILE["profiler"].enable()


def stop_profiling():
    profiler, handle = _PROFILE["profiler"], _PROFILE["file"]
    if profiler is not None:
        import marshal
        profiler.disable()
        profiler.create_stats()                  # what Profile.dump_stats writes
        marshal.dump(profiler.stats, handle)
        handle.close()


def _load_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory():
    """Give freed heap pages back to the kernel after a burst of connections.

    Thousands of handshakes at once leave their buffers and greenlet stacks freed but
    scattered through the heap; glibc keeps such pages until asked.  Long-lived tunnels
    would otherwise pay for the burst that opened them.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
