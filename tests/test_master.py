"""The master's reload state machine, driven through fork, ready, rollback and stop.

No process is forked: a fake ``ProcessOps`` hands out pids and control sockets, records
the signals the master sends and reports exits when a test says so (gunicorn tests its
arbiter the same way).  The configuration, the listen sockets and the shared segment
are real.
"""
import signal
import socket

import pytest

from mplb.config import load
from mplb.master import EXIT_BOOT_FAILURE, Master
from tests.harness import free_port


class FakeOps:
    """Stands in for fork, kill and waitpid."""

    def __init__(self):
        self.next_pid = 4_000_000            # above any real pid: never signals a process
        self.children = {}                   # pid -> the worker's end of its control pair
        self.signals = []                    # (pid, signum) the master sent
        self.exits = []                      # (pid, status) waitpid reports next

    def fork(self, master, slot, number):
        parent, child = socket.socketpair()
        parent.setblocking(False)
        pid = self.next_pid
        self.next_pid += 1
        self.children[pid] = child
        return pid, parent

    def kill(self, pid, signum):
        assert pid >= 4_000_000, "the master signalled a real process"
        self.signals.append((pid, signum))

    def waitpid(self, pid, options):
        return self.exits.pop(0) if self.exits else (0, 0)

    # -- what a worker would do ------------------------------------------------------
    def ready(self, *pids):
        for pid in pids:
            self.children[pid].send(b"r")

    def exit(self, pid, code=0):
        self.exits.append((pid, code << 8))
        self.children.pop(pid).close()

    def sent(self, signum):
        return {pid for pid, sig in self.signals if sig == signum}


CONF = """
worker_processes {workers};
upstream app {{
    persistence ip_hash table_size={table};
    {servers}
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass app; }}
}}
"""


class Arbiter:
    """A real Master over FakeOps, its configuration file and a private shm directory."""

    def __init__(self, tmp_path, workers=2):
        self.tmp_path = tmp_path
        self.port = free_port()
        self.workers = workers
        self.path = str(tmp_path / "mplb.conf")
        self.write(servers=["127.0.0.1:9001"])
        self.ops = FakeOps()
        self.master = Master(load(self.path), self.path, ops=self.ops, shm_dir=str(tmp_path))
        self.master.start()

    def write(self, servers, table=1024):
        text = CONF.format(workers=self.workers, table=table, port=self.port,
                           servers="\n    ".join(f"server {s};" for s in servers))
        with open(self.path, "w") as handle:
            handle.write(text)

    def pids(self, generation=None, retiring=None):
        return {w.pid for w in self.master.workers.values()
                if (generation is None or w.generation == generation)
                and (retiring is None or w.retiring == retiring)}

    def step(self, *signums):
        self.master.pending_signals.extend(signums)
        return self.master.run_once(0)


@pytest.fixture
def arbiter(tmp_path):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM,
                                                    signal.SIGINT, signal.SIGUSR1, signal.SIGTTIN,
                                                    signal.SIGTTOU, signal.SIGCHLD)}
    wakeup = signal.set_wakeup_fd(-1)
    made = Arbiter(tmp_path)
    try:
        yield made
    finally:
        made.master.cleanup()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(wakeup)


def test_reload_retires_the_old_generation_only_once_the_new_one_is_ready(arbiter):
    old = arbiter.pids(generation=1)
    assert len(old) == 2
    arbiter.ops.ready(*old)
    arbiter.step()
    arbiter.step(signal.SIGHUP)
    new = arbiter.pids(generation=2)
    assert len(new) == 2 and arbiter.master.reload is not None
    arbiter.ops.ready(next(iter(new)))
    arbiter.step()
    assert not arbiter.ops.sent(signal.SIGQUIT)          # one new worker is not ready yet
    arbiter.ops.ready(*new)
    arbiter.step()
    assert arbiter.ops.sent(signal.SIGQUIT) == old
    assert arbiter.master.reload is None
    assert arbiter.master.shared.generation == 2 and arbiter.master.shared.reloads == 1


def test_rolled_back_generation_number_is_never_given_again(arbiter):
    """A rollback must not hand its number to the next reload: a leftover worker of the
    rolled-back generation would pass for the new one (and receive tunnels)."""
    arbiter.ops.ready(*arbiter.pids())
    arbiter.step(signal.SIGHUP)
    failed = sorted(arbiter.pids(generation=2))
    arbiter.ops.exit(failed[0], EXIT_BOOT_FAILURE)
    arbiter.step()
    assert arbiter.master.generation == 1 and arbiter.master.reload is None
    leftover = failed[1]
    assert leftover in arbiter.ops.sent(signal.SIGTERM)
    arbiter.step(signal.SIGHUP)
    assert arbiter.master.reload.new.generation == 3
    new = arbiter.pids(generation=3)
    assert len(new) == 2 and leftover not in new
    arbiter.ops.ready(leftover)                         # the leftover says ready: irrelevant
    arbiter.step()
    assert arbiter.master.reload is not None and not arbiter.pids(generation=1, retiring=True)
    arbiter.ops.ready(*new)
    arbiter.step()
    assert arbiter.master.shared.generation == 3


def test_hup_while_stopping_is_ignored_and_the_stop_ends(arbiter):
    arbiter.ops.ready(*arbiter.pids())
    arbiter.step()
    forks = arbiter.ops.next_pid
    assert not arbiter.step(signal.SIGQUIT, signal.SIGHUP)
    assert arbiter.ops.next_pid == forks                # nothing forked
    assert arbiter.master.sockets == {} and arbiter.master.reload is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", arbiter.port), timeout=1).close()
    for pid in list(arbiter.pids()):
        arbiter.ops.exit(pid)
    assert arbiter.step(signal.SIGHUP)                  # still ignored; the stop finishes


def test_hup_during_a_reload_follows_it_unless_a_stop_comes_first(arbiter):
    arbiter.ops.ready(*arbiter.pids())
    arbiter.step(signal.SIGHUP, signal.SIGHUP)
    assert arbiter.master.reload_again
    arbiter.step(signal.SIGTERM)
    assert not arbiter.master.reload_again and arbiter.master.reload is None
    forks = arbiter.ops.next_pid
    for pid in list(arbiter.pids()):
        arbiter.ops.exit(pid)
    assert arbiter.step()
    assert arbiter.ops.next_pid == forks


def test_worker_slots_stay_within_the_segment_while_old_generations_linger(arbiter):
    """Retiring workers that never exit (TLS tunnels, no worker_shutdown_timeout) hold
    their slots; a reload that finds none free fails cleanly instead of writing past
    the segment's worker slots into other servers' counters."""
    shared = arbiter.master.shared
    sid = shared.server_id("http://127.0.0.1:9001")
    canary = shared.counter_word(0, sid, field=2)        # a requests counter
    shared.q[canary] = 12345
    arbiter.ops.ready(*arbiter.pids())
    for _ in range(shared.max_workers):
        before = arbiter.master.generation
        arbiter.step(signal.SIGHUP)
        if arbiter.master.reload is None:                # refused: no free slot
            assert arbiter.master.generation == before
            break
        arbiter.ops.ready(*arbiter.pids(generation=arbiter.master.generation))
        arbiter.step()
    else:
        pytest.fail("every reload found a free slot")
    assert all(w.slot < shared.max_workers for w in arbiter.master.workers.values())
    assert shared.q[canary] == 12345
    assert len(arbiter.pids(retiring=False)) == 2       # the serving generation is whole


def test_shared_memory_of_an_exited_generation_is_reclaimed(arbiter):
    shared = arbiter.master.shared
    arbiter.ops.ready(*arbiter.pids())
    arbiter.write(servers=["127.0.0.1:9002", "127.0.0.1:9003"], table=2048)
    arbiter.step(signal.SIGHUP)
    arbiter.ops.ready(*arbiter.pids(generation=2))
    arbiter.step()
    # Both generations run: both configurations' servers and tables are reserved.
    assert len(shared.server_urls()) == 3 and len(shared.tables()) == 2
    for pid in arbiter.pids(generation=1):
        arbiter.ops.exit(pid)
    arbiter.step()
    assert shared.server_urls() == ["http://127.0.0.1:9002", "http://127.0.0.1:9003"]
    assert list(shared.tables()) == ["app:ip_hash:2048"]
    assert shared.usage()["table_entries_used"] == 2048


def test_failed_reload_releases_what_it_reserved(arbiter):
    """The new configuration is valid and reserved, then a listen cannot be bound: the
    reload fails and its servers leave the segment again."""
    shared = arbiter.master.shared
    arbiter.ops.ready(*arbiter.pids())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        arbiter.write(servers=["127.0.0.1:9100"])
        with open(arbiter.path, "a") as handle:
            handle.write("server { listen 127.0.0.1:%d; location / { proxy_pass app; } }\n"
                         % taken.getsockname()[1])
        arbiter.step(signal.SIGHUP)
    finally:
        taken.close()
    assert arbiter.master.reload is None and arbiter.master.generation == 1
    assert shared.server_urls() == ["http://127.0.0.1:9001"]
