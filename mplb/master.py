"""The master process (the arbiter): sockets, shared memory, workers, signals.

The master never imports gevent and never proxies.  Signal handlers only record the
signal; ``signal.set_wakeup_fd`` wakes the loop, which dispatches each signal to one
small ``handle_<name>`` method.  Each pass of the loop also reads heartbeats, reaps
dead workers, kills silent ones and starts missing ones.

Generations: every reload forks a new generation, numbered one above the highest
number ever given (numbers only grow, a rolled-back generation's included, so a
leftover worker can never pass for a newer one).  A reload in flight is one
:class:`Reload` record until its workers report ready (then the old generation
retires) or fail (then the new one retires and the old keeps serving).  Each running
generation's configuration is kept until its last worker exits; then whatever of
the shared segment no running generation uses is reclaimed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import signal
import threading
import time

from mplb import compiled, logs, reservation
from mplb.control import READ_CHUNK, ControlReader
from mplb.errors import ConfigError, StartupError
from mplb.listeners import bind_listens
from mplb.logfiles import AccessLogFiles, reopen_logs
from mplb.store import follow_config
from mplb.sampler import Sampler

log = logging.getLogger("mplb.master")

HEARTBEAT_TIMEOUT = 10.0     # a worker silent this long is killed and replaced
FAST_STOP_GRACE = 1.5        # TERM/INT: seconds before survivors get SIGKILL
RELOAD_READY_TIMEOUT = 15.0  # a new generation must report ready within this
EXIT_BOOT_FAILURE = 3        # mirrors mplb.workers.worker.EXIT_BOOT_FAILURE
SIGNALS = ("HUP", "QUIT", "TERM", "INT", "USR1", "TTIN", "TTOU", "CHLD")


class ProcessOps:
    """The master's only contact with other processes; tests drive it with a fake."""

    @staticmethod
    def fork(master, slot, number):
        from mplb.workerboot import fork_worker
        return fork_worker(master, slot, number)

    kill = staticmethod(os.kill)
    waitpid = staticmethod(os.waitpid)


class WorkerProcess:
    """The master's record of one forked worker."""

    def __init__(self, pid, slot, number, generation, control):
        self.pid = pid
        self.slot = slot
        self.number = number
        self.generation = generation
        self.control = control          # master end of the control socketpair
        self.reader = ControlReader()   # its frames (mplb.control)
        self.last_heartbeat = time.monotonic()
        self.retiring = False
        self.ready = False              # it reported b"r": accepting and able to adopt
        self.kill_sent = None


@dataclasses.dataclass
class Serving:
    """What a generation serves with: its number, configuration and listen sockets."""

    generation: int
    config: object
    sockets: dict


@dataclasses.dataclass
class Reload:
    """A reload in flight: the generation it started and what serves until it is ready."""

    new: Serving
    previous: Serving
    old_workers: list
    deadline: float


class Master:
    """Owns the listen sockets, the shared segment and the worker processes."""

    def __init__(self, config, config_path, verbose=False, workers_override=None,
                 pid_file=None, shm_dir="/dev/shm", ops=None):
        self.config = config
        self.config_path = config_path
        self.verbose = verbose
        self.workers_override = workers_override
        self.pid_file = pid_file or config.pid
        self.shm_dir = shm_dir
        self.ops = ops or ProcessOps()
        self.sockets = {}               # listen key -> (socket, Listen)
        self.access_logs = AccessLogFiles()   # opened here, inherited by the workers
        self.workers = {}               # pid -> WorkerProcess
        self.generation = 1             # the generation new workers join
        self.last_generation = 1        # the highest number ever given
        self.configs = {1: config}      # generation -> config, while it may have workers
        self.pending_signals = []
        self.stopping = None            # None, 'fast' or 'graceful'
        self.shared = None
        self.health = None
        self.store = None               # mplb.store.sync.StoreSync with a shared_store
        # The store threads write the segment too: reserving and reclaiming wait for them.
        self.shm_lock = threading.Lock()
        self.selector = None
        self.wakeup_read = None
        self.boot_failed = False
        self.reload = None              # a Reload waiting for its new generation
        self.reload_again = False       # HUP arrived during a reload
        self.slots_exhausted = False    # logged once until a slot frees up
        self.sampler = Sampler()        # the dashboard's once-a-second statistics

    @property
    def worker_count(self):
        return self.workers_override or self.config.worker_processes

    # -- start-up ------------------------------------------------------------
    def start(self):
        """Bind, create shared memory, fork workers; raises StartupError."""
        logs.warn_config(self.config)
        self.access_logs.open(self.config.access_log)
        self.sockets = bind_listens(self.config, {})
        self.shared = self._create_shared()
        self.shared.set_generation(self.generation)
        reservation.reserve(self.config, self.shared)
        self._write_pid()
        self._install_signals()
        self._start_health()
        self.apply_store(self.config)
        for _ in range(self.worker_count):
            self.spawn_worker()
        log.info("mplb started: %d worker(s), listening on %s; %s", self.worker_count,
                 ", ".join(str(listen) for _, listen in self.sockets.values()),
                 compiled.describe())

    def _create_shared(self):
        """The segment, once those of masters that no longer run are gone."""
        from mplb.persistence import table_entries_for
        from mplb.shm import SharedState, remove_stale_segments, segment_path
        for stale in remove_stale_segments(self.shm_dir):
            log.warning("removed %s: shared memory of an mplb master that no longer runs",
                        stale)
        path = segment_path(os.getpid(), self.shm_dir)
        max_workers = max(64, self.worker_count * 4)
        servers = sum(len(u.servers) for u in self.config.upstreams.values())
        try:
            # Room for a reload to reserve its own servers and tables while the running
            # generation keeps its own; reclaiming frees the older ones afterwards.
            # Untouched pool pages cost nothing: tmpfs allocates pages on first use.
            entries = 4 * table_entries_for(self.config.upstreams.values()) + 65536
            return SharedState.create(path, max_workers, max_servers=max(1024, 4 * servers),
                                      table_entries=entries)
        except OSError as exc:
            raise StartupError(f"cannot create shared memory {path}: {exc.strerror}")

    def _start_health(self):
        from mplb.health import HealthChecker
        self.health = HealthChecker(self.config, self.shared)
        self.health.start()

    def apply_store(self, config):
        """Join, keep, change or leave the shared store as ``config`` says."""
        self.store = follow_config(self.store, config, self.shared, self.health,
                                   self.shm_lock)

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
        """The lowest worker slot no live worker holds, or None when all are taken
        (retiring generations that linger hold theirs)."""
        used = {worker.slot for worker in self.workers.values()}
        return next((slot for slot in range(self.shared.max_workers) if slot not in used),
                    None)

    def spawn_worker(self):
        """Fork one worker of the current generation; None when no slot is free."""
        slot = self.free_slot()
        if slot is None:
            if not self.slots_exhausted:
                log.error("cannot start a worker: all %d worker slots are held by running "
                          "workers (retiring ones included; see worker_shutdown_timeout)",
                          self.shared.max_workers)
            self.slots_exhausted = True
            return None
        self.slots_exhausted = False
        number = slot
        self.shared.reset_worker_slot(slot)
        pid, control = self.ops.fork(self, slot, number)
        worker = WorkerProcess(pid, slot, number, self.generation, control)
        self.workers[pid] = worker
        self.shared.worker_started(slot, pid, self.generation)
        self.selector.register(control, selectors.EVENT_READ, worker)
        log.debug("started worker process %d (#%d, generation %d)", pid, number,
                  self.generation)
        return worker

    def reap_workers(self):
        reaped = False
        while True:
            try:
                pid, status = self.ops.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            reaped = True
            self._forget(worker)
            self._report_exit(worker, os.waitstatus_to_exitcode(status))
        if reaped:
            self.reclaim_shared()

    def _report_exit(self, worker, code):
        if code == EXIT_BOOT_FAILURE and self.reload is not None \
                and worker.generation == self.reload.new.generation:
            log.error("worker process %d of the new configuration failed to boot", worker.pid)
            self.roll_back_reload()
        elif code == EXIT_BOOT_FAILURE and not worker.retiring and not self.stopping:
            log.error("worker process %d failed to boot; stopping", worker.pid)
            self.boot_failed = True
            self.handle_term()
        elif not worker.retiring and not self.stopping:
            log.warning("worker process %d exited with code %s", worker.pid, code)
        else:
            log.debug("worker process %d exited with code %s", worker.pid, code)

    def _forget(self, worker):
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()
        self.shared.worker_stopped(worker.slot)

    def reclaim_shared(self):
        """Give back the shared memory of generations whose last worker has exited."""
        running = {worker.generation for worker in self.workers.values()}
        running.add(self.generation)
        for generation in list(self.configs):
            if generation not in running:
                del self.configs[generation]
        self.access_logs.keep(config.access_log for config in self.configs.values())
        with self.shm_lock:
            freed = reservation.reclaim(self.shared, self.configs.values())
        if any(freed.values()):
            log.debug("shared memory reclaimed: %d server(s), %d table(s), %d upstream(s)",
                      freed["servers"], freed["tables"], freed["upstreams"])

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
                data = worker.control.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                worker.last_heartbeat = time.monotonic()
                self._take_frames(worker, data)
            else:
                try:
                    self.selector.unregister(worker.control)
                except (KeyError, ValueError):
                    pass

    def _take_frames(self, worker, data):
        ready, entries, bad = worker.reader.feed(data)
        if ready:
            worker.ready = True
        if entries and self.store is not None:
            self.store.offer(entries)
        if bad:
            log.warning("worker process %d sent an unknown control frame", worker.pid)

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
            if self.spawn_worker() is None:
                break
        for worker in current[self.worker_count:]:
            self.retire(worker)

    def retire(self, worker):
        worker.retiring = True
        self._signal(worker.pid, signal.SIGQUIT)

    def _signal(self, pid, signum):
        try:
            self.ops.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- the loop ---------------------------------------------------------------------
    def run(self):
        """Run until stopped; returns the exit status."""
        try:
            while not self.run_once(self.sampler.wait()):
                pass
        finally:
            self.cleanup()
        return 1 if self.boot_failed else 0

    def run_once(self, timeout) -> bool:
        """One pass: wait up to ``timeout`` for signals or heartbeats, then act on them;
        True once a stop has finished."""
        ready = self.selector.select(timeout=timeout)
        self.read_heartbeats(ready)
        while self.pending_signals:
            self.dispatch(self.pending_signals.pop(0))
        self.reap_workers()
        if self.stopping:
            return self._stop_progress()
        self.kill_silent_workers()
        self.start_missing_workers()
        self.advance_reload()
        self.sampler.tick(self.shared)
        return False

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
        reopen_logs(self.access_logs, self.workers.values(), self.configs)

    def handle_ttin(self):
        self.workers_override = self.worker_count + 1
        log.info("worker processes: %d", self.worker_count)

    def handle_ttou(self):
        if self.worker_count > 1:
            self.workers_override = self.worker_count - 1
        log.info("worker processes: %d", self.worker_count)

    def handle_hup(self):
        if self.stopping:
            log.warning("reload ignored: mplb is stopping")
            return
        if self.reload is not None:
            log.warning("a reload is still in progress; this one follows it")
            self.reload_again = True
            return
        from mplb.config import load
        log.info("reloading configuration %s", self.config_path)
        try:
            config = load(self.config_path)
            logs.warn_config(config)
            with self.shm_lock:
                reservation.reserve(config, self.shared)
            self.access_logs.open(config.access_log)
            sockets = bind_listens(config, self.sockets)
        except (ConfigError, StartupError) as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.reclaim_shared()            # what the failed reload reserved
            return
        self.last_generation += 1
        new = Serving(self.last_generation, config, sockets)
        self.reload = Reload(new=new, previous=Serving(self.generation, self.config, self.sockets),
                             old_workers=[w for w in self.workers.values() if not w.retiring],
                             deadline=time.monotonic() + RELOAD_READY_TIMEOUT)
        self.generation, self.config, self.sockets = new.generation, config, sockets
        self.configs[new.generation] = config
        if self.health is not None:
            self.health.update_config(config)
        self.apply_store(config)
        for _ in range(self.worker_count):
            if self.spawn_worker() is None:
                log.error("reload failed: no free worker slot for the new generation")
                self.roll_back_reload()
                return

    def advance_reload(self):
        """Retire the old generation once every new worker reports it is ready."""
        reload = self.reload
        if reload is None:
            return
        new = [w for w in self.workers.values()
               if w.generation == reload.new.generation and not w.retiring]
        if len(new) >= self.worker_count and all(w.ready for w in new):
            self._complete_reload(reload)
        elif time.monotonic() > reload.deadline:
            log.error("new workers did not become ready within %ss", RELOAD_READY_TIMEOUT)
            self.roll_back_reload()

    def _complete_reload(self, reload):
        for key, (sock, _) in reload.previous.sockets.items():
            if key not in self.sockets:
                sock.close()
        # Published before the old workers hear QUIT: they hand their tunnels to
        # workers of exactly this generation.
        self.shared.set_generation(reload.new.generation)
        self.shared.count_reload()
        for worker in reload.old_workers:
            if worker.pid in self.workers:
                self.retire(worker)
        self.reload = None
        log.info("reloaded: generation %d serving", reload.new.generation)
        if self.reload_again:
            self.reload_again = False
            self.handle_hup()

    def roll_back_reload(self):
        """The new generation cannot serve: retire it and keep the old one."""
        reload, self.reload = self.reload, None
        if reload is None:
            return
        previous = reload.previous
        for worker in list(self.workers.values()):
            if worker.generation == reload.new.generation:
                self.retire(worker)
                self._signal(worker.pid, signal.SIGTERM)
        for key, (sock, _) in reload.new.sockets.items():
            if key not in previous.sockets:
                sock.close()
        self.generation, self.config, self.sockets = (previous.generation, previous.config,
                                                      previous.sockets)
        if self.health is not None:
            self.health.update_config(previous.config)
        self.apply_store(previous.config)
        log.error("reload rolled back: generation %d keeps serving", previous.generation)
        self.reclaim_shared()

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
        self.reload = None
        self.reload_again = False

    def cleanup(self):
        for worker in list(self.workers.values()):
            self._signal(worker.pid, signal.SIGKILL)
        if self.store is not None:
            self.store.stop()
            self.store = None
        if self.health is not None:
            self.health.stop()
        if self.shared is not None:
            self.shared.unlink()
            self.shared.close()
        self.access_logs.keep(())
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except OSError:
                pass
