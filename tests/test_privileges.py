"""Least privilege: the ``user`` directive, workers that give root up for good, a private
shared segment, stale segments removed, a handover socket that refuses strangers.

The suite runs as root (here and in CI): the tests that need root skip when it is not.
A child that switches to ``nobody`` can import nothing new (the Python installation may
be unreadable to it), so everything it uses is imported at the top of this module.
"""
import array
import ctypes
import grp
import json
import os
import pwd
import select
import signal
import socket
import stat

import psutil
import pytest

from mplb import cli, privileges
from mplb.config import load
from mplb.errors import ConfigError
from mplb.shm import SharedState, remove_stale_segments, segment_path
from mplb.shm.layout import VERSION
from mplb.workers import handover
from tests.harness import (Backend, Mplb, Process, fake_segment, free_port, get,
                           mplb_command, wait_for)

pytestmark = pytest.mark.timeout(180)

root_only = pytest.mark.skipif(os.geteuid() != 0,
                               reason="only a root master switches its workers' user")
NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwnam("daemon")
NOGROUP = grp.getgrnam("nogroup").gr_gid
PR_GET_DUMPABLE = 3
SERVE = "server {{ listen 127.0.0.1:{port}; location / {{ return 200 ok; }} }}\n"


def write_conf(tmp_path, head, port=1):
    path = tmp_path / "mplb.conf"
    path.write_text(f"# line 1\n{head}\n" + SERVE.format(port=port))
    return str(path)


def in_child(function, *args, uid=None, gid=None, timeout=15.0):
    """``function(*args)`` in a forked child (as ``uid``/``gid`` when given); its JSON
    result, or ``{"error": ...}`` when it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            try:
                result = function(*args)
            except Exception as exc:   # noqa: BLE001 - reported to the parent
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    try:
        while select.select([read_end], [], [], timeout)[0]:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data, "the child gave no answer in time"
    return json.loads(data)


def as_nobody(function, *args):
    return in_child(function, *args, uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)


def try_read(path):
    """What reading ``path`` gives: "read", or the error's name."""
    try:
        with open(path, "rb") as handle:
            handle.read(16)
        return "read"
    except OSError as exc:
        return type(exc).__name__


def ids_of(pid):
    """(uids, gids, supplementary groups) of a process, read as root."""
    proc = psutil.Process(pid)
    with open(f"/proc/{pid}/status") as handle:
        groups = [line.split()[1:] for line in handle if line.startswith("Groups:")][0]
    return tuple(proc.uids()), tuple(proc.gids()), groups


# -- the directive ---------------------------------------------------------------------

@root_only
def test_user_names_are_resolved_at_load(tmp_path):
    user = load(write_conf(tmp_path, "")).user
    assert (user.name, user.uid, user.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    user = load(write_conf(tmp_path, "user daemon;")).user
    assert (user.uid, user.gid, user.group) == (DAEMON.pw_uid, DAEMON.pw_gid, "daemon")
    user = load(write_conf(tmp_path, "user daemon nogroup;")).user
    assert (user.uid, user.gid, user.group, user.line) == (DAEMON.pw_uid, NOGROUP,
                                                           "nogroup", 2)


@root_only
@pytest.mark.parametrize("head, message", [
    ("user no_such_mplb_user;", 'unknown user "no_such_mplb_user"'),
    ("user nobody no_such_mplb_group;", 'unknown group "no_such_mplb_group"'),
    ("user;", 'invalid number of arguments in "user" directive'),
    ("events { user nobody; }", '"user" directive is not allowed here'),
])
def test_a_bad_user_fails_at_load_naming_file_and_line(tmp_path, capsys, head, message):
    path = write_conf(tmp_path, head)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == f"{path}:2: {message}"
    assert cli.main(["-t", "-conf", path]) == 1
    assert f"{path}:2: {message}" in capsys.readouterr().err


def test_user_is_ignored_with_one_warning_when_the_master_is_not_root(tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr(privileges.os, "geteuid", lambda: 1000)
    assert load(write_conf(tmp_path, "")).user is None
    assert load(write_conf(tmp_path, "")).warnings == ()
    path = write_conf(tmp_path, "user no_such_mplb_user;")     # not even looked up
    config = load(path)
    assert config.user is None
    assert [str(warning) for warning in config.warnings] == [
        f'{path}:2: the "user" directive makes sense only if the master process runs as '
        f"root; ignored"]
    assert cli.main(["-t", "-conf", path]) == 0
    err = capsys.readouterr().err
    assert err.count("[warn]") == 1 and f"[warn] {path}:2: the \"user\" directive" in err


# -- the switch ------------------------------------------------------------------------

def _drop_and_report(uid, gid):
    privileges.drop_privileges(uid, gid)
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    with open("/proc/self/status") as handle:
        flags = dict(line.split(":", 1) for line in handle)
    dumpable = ctypes.CDLL(None).prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    return {"uids": os.getresuid(), "gids": os.getresgid(), "groups": os.getgroups(),
            "regained": regained, "dumpable": dumpable,
            "no_new_privs": flags["NoNewPrivs"].strip()}


@root_only
def test_drop_privileges_is_complete_and_one_way():
    got = in_child(_drop_and_report, NOBODY.pw_uid, NOGROUP)
    assert got == {"uids": [NOBODY.pw_uid] * 3, "gids": [NOGROUP] * 3, "groups": [],
                   "regained": False, "dumpable": 0, "no_new_privs": "1"}


def _check_half_drop(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, 0)                  # saved uid still root: root can come back
    try:
        privileges.check_dropped(uid, gid)
    except privileges.PrivilegeError as exc:
        return str(exc)
    return "accepted"


@root_only
def test_a_half_drop_is_refused():
    assert "privileges not dropped" in in_child(_check_half_drop, NOBODY.pw_uid, NOGROUP)


# -- real mplb: workers, the segment, reloads ---------------------------------------------

LB_CONF = """# privileges
error_log {dir}/error.log;
access_log {dir}/access.log;
upstream app {{
    persistence cookie secret={secret};
    server {backend};
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass app; }}
}}
"""
SECRET = "privilege-test-cookie-secret-4b1d"


def start_lb(backend, tmp_path, workers=1):
    """A real mplb (as root, without ``user``) in front of ``backend``; ``.port``, ``.text``."""
    port = free_port()
    text = LB_CONF.format(dir=tmp_path, secret=SECRET, backend=backend.url, port=port)
    mplb = Mplb(text, workers=workers, wait_ports=[port])
    mplb.port, mplb.text = port, text
    return mplb


def workers_as(mplb, uid, gid, count):
    """The workers once there are ``count``, every one of them ``uid``/``gid``."""
    expected = ((uid,) * 3, (gid,) * 3, [])

    def switched():
        pids = mplb.worker_pids()
        return len(pids) == count and all(ids_of(pid) == expected for pid in pids) and pids
    # A worker switches once built, before it reports ready: wait for that, not the fork.
    return set(wait_for(switched, message=f"{count} workers as {uid}/{gid}"))


@pytest.fixture
def backend():
    started = Backend("priv")
    yield started
    started.stop()


@root_only
def test_workers_run_as_user_through_ttin_respawn_and_reload(backend, tmp_path):
    mplb = start_lb(backend, tmp_path, workers=2)
    port, text = mplb.port, mplb.text
    try:
        assert psutil.Process(mplb.pid).uids().effective == 0
        first = workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 2)
        assert get(port)[0] == 200
        os.kill(mplb.pid, signal.SIGTTIN)
        killed = (workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 3) - first).pop()
        os.kill(killed, signal.SIGKILL)                              # respawned
        wait_for(lambda: killed not in mplb.worker_pids() and len(mplb.worker_pids()) == 3,
                 message="a worker respawned")
        workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 3)
        before = set(mplb.worker_pids())
        mplb.rewrite(text.replace("# privileges", "user daemon nogroup;"))
        os.kill(mplb.pid, signal.SIGHUP)
        wait_for(lambda: not before & set(mplb.worker_pids()), message="a new generation")
        serving = workers_as(mplb, DAEMON.pw_uid, NOGROUP, 3)
        assert get(port)[0] == 200
        mplb.rewrite(text.replace("# privileges", "user no_such_mplb_user;"))
        os.kill(mplb.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed" in mplb.output(), message="the reload to fail")
        assert f'{mplb.conf}:1: unknown user "no_such_mplb_user"' in mplb.output()
        assert set(mplb.worker_pids()) == serving and get(port)[0] == 200
        access = tmp_path / "access.log"                        # in a 0700 root directory
        wait_for(lambda: access.read_text().count('"GET / HTTP/1.1" 200') == 3,
                 message="every request in the access log")
    finally:
        mplb.stop()


@root_only
def test_the_segment_is_private_and_holds_no_secret(backend, tmp_path):
    mplb = start_lb(backend, tmp_path)
    port = mplb.port
    try:
        status, headers, _ = get(port)
        assert status == 200 and "mplb_session" in headers.get("set-cookie", "").lower()
        path = segment_path(mplb.pid)
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o600, 0)
        with open(path, "rb") as handle:
            assert SECRET.encode() not in handle.read()
        worker, = workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 1)
        # A process running as nobody, the workers' own user, reaches neither the file
        # nor, through /proc, the worker's descriptors (the worker is not dumpable) ...
        assert as_nobody(try_read, path) == "PermissionError"
        assert as_nobody(os.listdir, f"/proc/{worker}/fd")["error"].startswith(
            "PermissionError")
        # ... though it can read a world-readable file next to it (the check can fail).
        control = path + ".readable"
        with open(control, "wb") as handle:
            handle.write(b"x")
        os.chmod(control, 0o644)
        try:
            assert as_nobody(try_read, control) == "read"
        finally:
            os.unlink(control)
    finally:
        mplb.stop()


@root_only
def test_the_master_opens_the_log_files_a_bad_path_fails_start_and_reload(backend, tmp_path):
    bad = tmp_path / "missing" / "access.log"
    conf = tmp_path / "bad.conf"
    conf.write_text(f"access_log {bad};\n" + SERVE.format(port=free_port()))
    proc = Process(mplb_command() + ["-conf", str(conf), "-workers", "1"], name="badlog")
    try:
        assert proc.wait(timeout=30) == 1
        assert f'open() "{bad}" failed (2: No such file or directory)' in proc.output()
    finally:
        proc.stop()
    mplb = start_lb(backend, tmp_path)
    try:
        serving = workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 1)
        mplb.rewrite(mplb.text.replace(str(tmp_path / "access.log"), str(bad)))
        os.kill(mplb.pid, signal.SIGHUP)
        wait_for(lambda: "reload failed" in mplb.output(), message="the reload to fail")
        assert f'open() "{bad}" failed' in mplb.output()
        assert set(mplb.worker_pids()) == serving and get(mplb.port)[0] == 200
    finally:
        mplb.stop()


# -- the handover socket -------------------------------------------------------------------

def _hand_over_as_a_stranger(master_pid, worker_pid):
    """Connect to a worker's handover socket and send it two descriptors; report whether
    the worker kept them (the peer of the socket sent sees no end while it does)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(handover.socket_name(master_pid, worker_pid))
    kept, peer = socket.socketpair()
    header = handover.HEADER.pack(2, 0, 0)
    try:
        conn.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 array.array("i", [kept.fileno(), kept.fileno()]))])
        conn.sendall(b"{}")
        answer = conn.recv(1)
    except OSError as exc:
        answer = type(exc).__name__.encode()
    kept.close()
    peer.settimeout(10)
    return {"answer": answer.decode(), "descriptor_closed": peer.recv(1) == b"",
            "me": os.getpid()}


@root_only
def test_a_stranger_running_as_the_workers_user_cannot_hand_a_worker_descriptors(
        backend, tmp_path):
    mplb = start_lb(backend, tmp_path)
    port = mplb.port
    try:
        worker, = workers_as(mplb, NOBODY.pw_uid, NOBODY.pw_gid, 1)     # listening
        got = as_nobody(_hand_over_as_a_stranger, mplb.pid, worker)
        assert got.get("answer") in ("", "ConnectionResetError", "BrokenPipeError"), got
        assert got["descriptor_closed"], got
        wait_for(lambda: f"refused a handover from pid {got['me']}" in mplb.output(),
                 message="the refusal in the log")
        assert mplb.worker_pids() == [worker] and get(port)[0] == 200
    finally:
        mplb.stop()


def _squat(name, ready_fd, done_fd):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(8)
    os.write(ready_fd, b"r")
    select.select([done_fd], [], [], 30)
    return "done"


def squatter(master_pid, target_pid=None):
    """A child listening on the handover name of ``target_pid`` (default: its own pid);
    returns ``(pid, stop)``."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        name = handover.socket_name(master_pid, target_pid or os.getpid())
        try:
            _squat(name, ready_w, done_r)
        finally:
            os._exit(0)
    assert select.select([ready_r], [], [], 10)[0], "the squatter did not start"

    def stop():
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    return pid, stop


def test_a_sender_gives_descriptors_only_to_the_worker_it_meant():
    """Anyone may bind an abstract name first: the sender checks who listens.  This
    process plays the master; its children play workers."""
    target = 2 ** 22 + 7                       # a worker whose name another took first
    _, stop = squatter(os.getpid(), target)
    try:
        assert handover._open_channels(os.getpid(), [target]) == []
    finally:
        stop()
    pid, stop = squatter(os.getppid())          # a process that is not the master's child
    try:
        assert handover._open_channels(os.getppid(), [pid]) == []
    finally:
        stop()
    pid, stop = squatter(os.getpid())           # the very worker, a child of the master
    try:
        channels = handover._open_channels(os.getpid(), [pid])
        assert len(channels) == 1
        channels[0].close()
    finally:
        stop()


# -- stale segments ------------------------------------------------------------------------

def dead_pid():
    """A pid no process can have: above the kernel's largest."""
    with open("/proc/sys/kernel/pid_max") as handle:
        return int(handle.read()) + 1


def _hold_segment(path, ready_fd, done_fd):
    state = SharedState.create(path, max_workers=1, max_servers=1, table_entries=16)
    os.write(ready_fd, b"r")
    select.select([done_fd], [], [], 30)
    state.close()
    return "done"


def test_only_segments_of_dead_masters_are_removed(tmp_path):
    gone = dead_pid()
    stale = segment_path(gone, str(tmp_path))
    fake_segment(stale, gone)
    fake_segment(segment_path(gone + 1, str(tmp_path)), gone + 1, magic=b"NOTMPLB!")
    fake_segment(segment_path(gone + 2, str(tmp_path)), gone + 2, version=VERSION - 1)
    fake_segment(segment_path(gone + 3, str(tmp_path)), gone)          # another pid inside
    os.symlink(stale, str(tmp_path / f"mplb.{gone + 4}"))
    os.mkfifo(str(tmp_path / f"mplb.{gone + 5}"))
    (tmp_path / "mplb.notapid").write_bytes(b"x")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            _hold_segment(segment_path(os.getpid(), str(tmp_path)), ready_w, done_r)
        finally:
            os._exit(0)
    try:
        assert select.select([ready_r], [], [], 10)[0]
        before = sorted(os.listdir(tmp_path))
        assert remove_stale_segments(str(tmp_path)) == [stale]
        assert sorted(os.listdir(tmp_path)) == sorted(set(before) - {f"mplb.{gone}"})
    finally:
        os.write(done_w, b"x")
        os.waitpid(holder, 0)
    # The holder has exited without removing its file: its lock went with it.
    assert remove_stale_segments(str(tmp_path)) == [segment_path(holder, str(tmp_path))]


def test_a_running_master_keeps_its_segment_even_without_the_lock(tmp_path):
    """Second guard: a process titled as an mplb master keeps a file named after it."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            from setproctitle import setproctitle
            setproctitle("mplb: master process -conf test.conf")
            fake_segment(segment_path(os.getpid(), str(tmp_path)), os.getpid())
            os.write(ready_w, b"r")
            select.select([done_r], [], [], 30)
        finally:
            os._exit(0)
    try:
        assert select.select([ready_r], [], [], 10)[0]
        assert remove_stale_segments(str(tmp_path)) == []
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    assert remove_stale_segments(str(tmp_path)) == [segment_path(pid, str(tmp_path))]


@root_only
def test_a_killed_masters_segment_is_removed_at_the_next_start_a_live_ones_is_not(
        backend, tmp_path):
    gone = dead_pid()
    fake = segment_path(gone)
    fake_segment(fake, gone)
    started = []
    try:
        for _ in range(2):
            started.append(start_lb(backend, tmp_path))
        first, second = started
        assert not os.path.exists(fake)
        assert f"removed {fake}" in first.output()
        assert os.path.exists(segment_path(first.pid))       # alive: kept by the second
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: not first.alive(), message="the first master killed")
        assert os.path.exists(segment_path(first.pid))        # left behind
        started.append(start_lb(backend, tmp_path))
        assert not os.path.exists(segment_path(first.pid))
        assert os.path.exists(segment_path(second.pid))
    finally:
        for mplb in started:
            mplb.stop()
        if os.path.exists(fake):
            os.unlink(fake)
