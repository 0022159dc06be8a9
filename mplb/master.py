"""The master process (the arbiter): sockets, shared memory, workers, signals.

The master never imports gevent and never proxies.  Signal handlers only record the
signal; ``signal.set_wakeup_fd`` wakes the loop, which dispatches each signal to one
small ``handle_<name>`` method.  Each pass of the loop also reads heartbeats, reaps
dead workers, kills silent ones and starts missing ones.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time

from mplb import logs
from mplb.errors import ConfigError, StartupError

log = logging.getLogger("mplb.master")

HEARTBEAT_TIMEOUT = 10.0     # a worker silent this long is killed and replaced
FAST_STOP_GRACE = 1.5        # TERM/INT: seconds before survivors get SIGKILL
RELOAD_READY_TIMEOUT = 15.0  # a new generation must report ready within this
EXIT_BOOT_FAILURE = 3        # mirrors workers.worker.EXIT_BOOT_FAILURE
SIGNALS = ("HUP", "QUIT", "TERM", "INT", "USR1", "TTIN", "TTOU", "CHLD")


class WorkerProcess:
    """The master's record of one forked worker."""

    def __init__(self, pid, slot, number, generation, control):
        self.pid = pid
        self.slot = slot
        self.number = number
        self.generation = generation
        self.control = control          # master end of the control socketpair
        self.last_heartbeat = time.monotonic()
        self.retiring = False
        self.ready = False              # it reported b"r": accepting and able to adopt
        self.kill_sent = None


class Master:
    """Owns the listen sockets, the shared segment and the worker processes."""

    def __init__(self, config, config_path, verbose=False, workers_override=None,
                 pid_file=None, shm_dir="/dev/shm"):
        self.config = config
        self.config_path = config_path
        self.verbose = verbose
        self.workers_override = workers_override
        self.pid_file = pid_file or config.pid
        self.shm_dir = shm_dir
        self.sockets = {}               # listen key -> (socket, Listen)
        self.workers = {}               # pid -> WorkerProcess
        self.generation = 1
        self.pending_signals = []
        self.stopping = None            # None, 'fast' or 'graceful'
        self.shared = None
        self.health = None
        self.selector = None
        self.boot_failed = False
        self.reload = None              # a reload waiting for its new generation to be ready
        self.reload_again = False       # HUP arrived during a reload

    @property
    def worker_count(self):
        return self.workers_override or self.config.worker_processes

    # -- start-up ------------------------------------------------------------
    def start(self):
        """Bind, create shared memory, fork workers; raises StartupError."""
        from setproctitle import setproctitle
        setproctitle(f"mplb: master process -conf {self.config_path}")
        self.sockets = bind_listens(self.config, {})
        self.shared = self._create_shared()
        self.shared.set_generation(self.generation)
        register_upstreams(self.config, self.shared)
        self._write_pid()
        self._install_signals()
        self._start_health()
        for _ in range(self.worker_count):
            self.spawn_worker()
        log.info("mplb started: %d worker(s), listening on %s", self.worker_count,
                 ", ".join(str(listen) for _, listen in self.sockets.values()))

    def _create_shared(self):
        from mplb.persistence import table_entries_for
        from mplb.shm import SharedState, segment_path
        path = segment_path(os.getpid(), self.shm_dir)
        max_workers = max(64, self.worker_count * 4)
        try:
            # Twice what the tables need now, so a reload can allocate its own tables.
            entries = 2 * table_entries_for(self.config.upstreams.values()) + 1024
            return SharedState.create(path, max_workers, table_entries=entries)
        except OSError as exc:
            raise StartupError(f"cannot create shared memory {path}: {exc.strerror}")

    def _start_health(self):
        from mplb.health import HealthChecker
        self.health = HealthChecker(self.config, self.shared)
        self.health.start()

    def _write_pid(self):
        if self.pid_file:
            try:
                with open(self.pid_file, "w") as handle:
                    handle.write(f"{os.getpid()}\n")
            except OSError as exc:
                raise StartupError(f'cannot write pid file "{self.pid_file}": {exc.strerror}')

    def _install_signals(self):
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.wakeup_read = read_fd
        signal.set_wakeup_fd(write_fd)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._record_signal)
        self.selector = selectors.DefaultSelector()
        self.selector.register(read_fd, selectors.EVENT_READ, None)

    def _record_signal(self, signum, frame):
        self.pending_signals.append(signum)

    # -- workers ------------------------------------------------------------------
    def free_slot(self):
        used = {worker.slot for worker in self.workers.values()}
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def spawn_worker(self):
        from mplb.workerboot import fork_worker
        slot = self.free_slot()
        number = slot
        self.shared.reset_worker_slot(slot)
        pid, control = fork_worker(self, slot, number)
        worker = WorkerProcess(pid, slot, number, self.generation, control)
        self.workers[pid] = worker
        self.shared.worker_started(slot, pid, self.generation)
        self.selector.register(control, selectors.EVENT_READ, worker)
        log.debug("started worker process %d (#%d, generation %d)", pid, number,
                  self.generation)
        return worker

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._forget(worker)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_BOOT_FAILURE and self.reload is not None \
                    and worker.generation == self.generation:
                log.error("worker process %d of the new configuration failed to boot", pid)
                self.roll_back_reload()
            elif code == EXIT_BOOT_FAILURE and not worker.retiring:
                log.error("worker process %d failed to boot; stopping", pid)
                self.boot_failed = True
                self.stopping = self.stopping or "fast"
            elif not worker.retiring and not self.stopping:
                log.warning("worker process %d exited with code %s", pid, code)
            else:
                log.debug("worker process %d exited with code %s", pid, code)

    def _forget(self, worker):
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()
        self.shared.worker_stopped(worker.slot)

    def read_heartbeats(self, ready):
        for key, _ in ready:
            worker = key.data
            if worker is None:
                try:
                    while os.read(self.wakeup_read, 256):
                        pass
                except BlockingIOError:
                    pass
                continue
            try:
                data = worker.control.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                worker.last_heartbeat = time.monotonic()
                if b"r" in data:
                    worker.ready = True
            else:
                try:
                    self.selector.unregister(worker.control)
                except (KeyError, ValueError):
                    pass

    def kill_silent_workers(self):
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if now - worker.last_heartbeat < HEARTBEAT_TIMEOUT:
                continue
            if worker.kill_sent is None:
                log.error("worker process %d stopped sending heartbeats; aborting it",
                          worker.pid)
                worker.kill_sent = now
                self._signal(worker.pid, signal.SIGABRT)
            elif now - worker.kill_sent > 2.0:
                self._signal(worker.pid, signal.SIGKILL)

    def start_missing_workers(self):
        if self.stopping or self.boot_failed:
            return
        current = [w for w in self.workers.values()
                   if not w.retiring and w.generation == self.generation]
        for _ in range(self.worker_count - len(current)):
            self.spawn_worker()
        for worker in current[self.worker_count:]:
            self.retire(worker)

    def retire(self, worker):
        worker.retiring = True
        self._signal(worker.pid, signal.SIGQUIT)

    @staticmethod
    def _signal(pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- the loop ---------------------------------------------------------------------
    def run(self):
        """Run until stopped; returns the exit status."""
        try:
            while True:
                ready = self.selector.select(timeout=1.0)
                self.read_heartbeats(ready)
                while self.pending_signals:
                    self.dispatch(self.pending_signals.pop(0))
                self.reap_workers()
                if self.stopping:
                    if self._stop_progress():
                        break
                    continue
                self.kill_silent_workers()
                self.start_missing_workers()
                self.advance_reload()
        finally:
            self.cleanup()
        return 1 if self.boot_failed else 0

    def dispatch(self, signum):
        name = signal.Signals(signum).name[3:].lower()
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_chld(self):
        pass      # reaping happens every pass

    def handle_term(self):
        if self.stopping != "fast":
            log.info("fast stop requested")
            self.stopping = "fast"
            self.stop_deadline = time.monotonic() + FAST_STOP_GRACE
            self._close_listens()
            for worker in self.workers.values():
                self._signal(worker.pid, signal.SIGTERM)

    handle_int = handle_term

    def handle_quit(self):
        if self.stopping:
            return
        log.info("graceful stop requested")
        self.stopping = "graceful"
        self._close_listens()
        for worker in self.workers.values():
            self.retire(worker)

    def handle_usr1(self):
        log.info("reopening logs")
        logs.reopen()
        for worker in self.workers.values():
            self._signal(worker.pid, signal.SIGUSR1)

    def handle_ttin(self):
        self.workers_override = self.worker_count + 1
        log.info("worker processes: %d", self.worker_count)

    def handle_ttou(self):
        if self.worker_count > 1:
            self.workers_override = self.worker_count - 1
        log.info("worker processes: %d", self.worker_count)

    def handle_hup(self):
        from mplb.config import load
        log.info("reloading configuration %s", self.config_path)
        if self.reload is not None:
            log.warning("a reload is still in progress; this one follows it")
            self.reload_again = True
            return
        try:
            config = load(self.config_path)
            register_upstreams(config, self.shared)
            sockets = bind_listens(config, self.sockets)
        except (ConfigError, StartupError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        self.reload = {
            "old_workers": [w for w in self.workers.values() if not w.retiring],
            "previous": (self.config, self.sockets, self.generation),
            "deadline": time.monotonic() + RELOAD_READY_TIMEOUT,
        }
        self.config = config
        self.sockets = sockets
        self.generation += 1
        if self.health is not None:
            self.health.update_config(config)
        for _ in range(self.worker_count):
            self.spawn_worker()

    def advance_reload(self):
        """Retire the old generation once every new worker reports it is ready."""
        reload = self.reload
        if reload is None:
            return
        new = [w for w in self.workers.values() if w.generation == self.generation]
        if new and all(w.ready for w in new):
            previous_sockets = reload["previous"][1]
            for key, (sock, _) in previous_sockets.items():
                if key not in self.sockets:
                    sock.close()
            for worker in reload["old_workers"]:
                if worker.pid in self.workers:
                    self.retire(worker)
            self.shared.set_generation(self.generation)
            self.shared.count_reload()
            self.reload = None
            log.info("reloaded: generation %d serving", self.generation)
            if self.reload_again:
                self.reload_again = False
                self.handle_hup()
        elif time.monotonic() > reload["deadline"]:
            log.error("new workers did not become ready within %ss", RELOAD_READY_TIMEOUT)
            self.roll_back_reload()

    def roll_back_reload(self):
        """The new generation cannot serve: retire it and keep the old one."""
        reload, self.reload = self.reload, None
        if reload is None:
            return
        config, sockets, generation = reload["previous"]
        for worker in list(self.workers.values()):
            if worker.generation == self.generation:
                self.retire(worker)
                self._signal(worker.pid, signal.SIGTERM)
        for key, (sock, _) in self.sockets.items():
            if key not in sockets:
                sock.close()
        self.config, self.sockets, self.generation = config, sockets, generation
        if self.health is not None:
            self.health.update_config(config)
        log.error("reload rolled back: generation %d keeps serving", generation)

    def _stop_progress(self) -> bool:
        """True once every worker has exited (or been killed after the fast-stop grace)."""
        if not self.workers:
            return True
        if self.stopping == "fast" and time.monotonic() > self.stop_deadline:
            for worker in self.workers.values():
                self._signal(worker.pid, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5
        return False

    def _close_listens(self):
        for sock, _ in self.sockets.values():
            sock.close()
        self.sockets = {}

    def cleanup(self):
        for worker in list(self.workers.values()):
            self._signal(worker.pid, signal.SIGKILL)
        if self.health is not None:
            self.health.stop()
        if self.shared is not None:
            self.shared.unlink()
            self.shared.close()
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass


def register_upstreams(config, shared):
    """Register servers and tables before forking, so a full segment fails here, once."""
    from mplb.balancing import init_upstream
    from mplb.errors import MplbError
    try:
        for upstream in config.upstreams.values():
            init_upstream(upstream, shared, 0)
    except MplbError as exc:
        raise StartupError(str(exc))


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
