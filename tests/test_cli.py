"""The command line and the process model (SPEC sections 1, 2 and 6) with real processes."""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.harness import (ROOT, Backend, Mplb, free_port, get, mplb_command, port_open,
                           wait_for)


def run_mplb(*args, timeout=30):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(mplb_command() + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def minimal_config(port, backend_port=None, extra=""):
    backend_port = backend_port or free_port()
    return f"""
worker_processes 1;
upstream app {{ server http://127.0.0.1:{backend_port} max_fails=0; }}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass app; }}
    location = /mplb_status {{ mplb_status; }}
    {extra}
}}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\x00", b" ").decode().strip()


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


# -- -t and start-up errors -----------------------------------------------------------
def test_t_success(tmp_path):
    conf = write(tmp_path, "ok.conf", minimal_config(free_port()))
    result = run_mplb("-t", "-conf", conf)
    assert result.returncode == 0, result.stderr
    assert f"mplb: configuration file {conf} test is successful" in result.stderr


def test_t_failure_names_file_and_line(tmp_path):
    conf = write(tmp_path, "bad.conf", "worker_processes 1;\n\nupstream b {\n"
                                       "    method least_con;\n    server http://127.0.0.1:9;\n}\n")
    result = run_mplb("-t", "-conf", conf)
    assert result.returncode == 1
    assert f"mplb: {conf}:4: unknown method \"least_con\"" in result.stderr
    assert "test failed" in result.stderr


def test_bad_config_without_t_is_one_line_and_exit_1(tmp_path):
    conf = write(tmp_path, "bad.conf", "worker_processes 1;\nno_such_directive on;\n")
    result = run_mplb("-conf", conf)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mplb: {conf}:2: ")
    assert "no_such_directive" in lines[0]


def test_missing_config_file(tmp_path):
    result = run_mplb("-conf", str(tmp_path / "missing.conf"))
    assert result.returncode == 1
    assert "missing.conf" in result.stderr and "Traceback" not in result.stderr


def test_cannot_bind_port_in_use(tmp_path):
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        conf = write(tmp_path, "lb.conf", minimal_config(port))
        result = run_mplb("-conf", conf)
        assert result.returncode != 0
        assert f"mplb: cannot bind 127.0.0.1:{port}: address already in use" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        blocker.close()


def test_workers_must_be_positive(tmp_path):
    conf = write(tmp_path, "ok.conf", minimal_config(free_port()))
    result = run_mplb("-conf", conf, "-workers", "0")
    assert result.returncode != 0


def test_signal_without_pid_file(tmp_path):
    conf = write(tmp_path, "ok.conf", minimal_config(free_port()))
    result = run_mplb("-s", "stop", "-conf", conf)
    assert result.returncode == 1
    assert "pid" in result.stderr


# -- a running master -----------------------------------------------------------------
@pytest.fixture
def backend():
    b = Backend(name="cli")
    yield b
    b.stop()


def start(port, backend, workers=2, extra=""):
    return Mplb(minimal_config(port, backend.port, extra), workers=workers, wait_ports=[port])


def test_workers_pid_file_titles_and_shm(backend):
    port = free_port()
    lb = start(port, backend, workers=3)
    try:
        pids = lb.worker_pids()
        assert len(pids) == 3
        with open(lb.pid_file) as handle:
            assert int(handle.read().strip()) == lb.pid
        assert cmdline(lb.pid) == f"mplb: master process -conf {lb.conf}"
        # A worker sets its title just after the fork: poll.
        expected = ([f"mplb: worker process #{k}" for k in range(3)],
                    [f"mplb: worker process #{k}" for k in range(1, 4)])
        wait_for(lambda: sorted(cmdline(pid) for pid in pids) in expected, timeout=10,
                 message=f"worker titles, last {sorted(cmdline(pid) for pid in pids)}")
        shm = f"/dev/shm/mplb.{lb.pid}"
        assert os.path.exists(shm)
        status, _, body = get(port, "/mplb_status")
        assert status == 200 and json.loads(body)["pid"] == lb.pid
    finally:
        lb.signal(signal.SIGTERM)
        code = lb.wait(10)
        lb.stop()
    assert code == 0
    assert not os.path.exists(shm)


def test_killed_worker_is_replaced(backend):
    port = free_port()
    lb = start(port, backend, workers=2)
    try:
        before = set(lb.worker_pids())
        victim = sorted(before)[0]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(set(lb.worker_pids()) - before) == 1
                 and len(lb.worker_pids()) == 2, timeout=10, message="replacement worker")
        assert time.monotonic() - killed < 5
        after = set(lb.worker_pids())
        assert victim not in after
        for _ in range(4):
            assert get(port, "/x")[0] == 200
    finally:
        lb.stop()


def test_silent_worker_is_killed_and_replaced(backend):
    """A worker whose event loop stops (SIGSTOP) stops heartbeating: the master kills it."""
    from mplb.master import HEARTBEAT_TIMEOUT
    port = free_port()
    lb = start(port, backend, workers=2)
    try:
        before = set(lb.worker_pids())
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: victim not in lb.worker_pids() and len(lb.worker_pids()) == 2,
                 timeout=HEARTBEAT_TIMEOUT + 15, message="silent worker replaced")
        assert "stopped sending heartbeats" in lb.output()
        for _ in range(4):
            assert get(port, "/x")[0] == 200
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        lb.stop()


def test_term_stops_everything_quickly(backend):
    port = free_port()
    lb = start(port, backend, workers=2)
    pids = lb.worker_pids()
    try:
        started = time.monotonic()
        lb.signal(signal.SIGTERM)
        code = lb.wait(10)
        wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=5)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 3.0, elapsed          # 2 s in the spec, slack for a loaded box
        assert not port_open(port)
        assert not os.path.exists(f"/dev/shm/mplb.{lb.pid}")
    finally:
        lb.stop()


def test_quit_is_graceful(backend):
    _quit_with_request_in_flight(backend, check_refused=False)


def test_quit_refuses_new_connections_promptly(backend):
    _quit_with_request_in_flight(backend, check_refused=True)


def _quit_with_request_in_flight(backend, check_refused):
    port = free_port()
    lb = start(port, backend, workers=1)
    result = {}

    def slow():
        result["response"] = get(port, "/slow/2", timeout=20)

    try:
        thread = threading.Thread(target=slow)
        thread.start()

        def in_flight():
            data = json.loads(get(port, "/mplb_status")[2])
            return data["upstreams"]["app"]["servers"][0]["active"] >= 1
        wait_for(in_flight, timeout=10, message="slow request in flight")
        quit_at = time.monotonic()
        lb.signal(signal.SIGQUIT)
        if check_refused:
            wait_for(lambda: not port_open(port), timeout=5, message="listen socket closed")
            assert time.monotonic() - quit_at < 1.0     # 0.5 s in the spec, slack for load
        thread.join(20)
        status, _, body = result["response"]
        assert status == 200 and json.loads(body)["path"] == "/slow/2"
        assert lb.wait(10) == 0
    finally:
        lb.stop()


def test_s_reload_quit_and_stop_via_pid_file(backend, tmp_path):
    port = free_port()
    lb = start(port, backend, workers=1)
    try:
        old = set(lb.worker_pids())
        result = run_mplb("-conf", lb.conf, "-pid", lb.pid_file, "-s", "reload")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: (set(lb.worker_pids()) - old) and not (set(lb.worker_pids()) & old),
                 timeout=15, message="a new generation of workers")
        assert lb.alive()
        assert get(port, "/after-reload")[0] == 200
        result = run_mplb("-conf", lb.conf, "-pid", lb.pid_file, "-s", "stop")
        assert result.returncode == 0, result.stderr
        assert lb.wait(10) == 0
    finally:
        lb.stop()

    lb = start(port, backend, workers=1)
    try:
        result = run_mplb("-conf", lb.conf, "-pid", lb.pid_file, "-s", "quit")
        assert result.returncode == 0, result.stderr
        assert lb.wait(10) == 0
        result = run_mplb("-conf", lb.conf, "-pid", lb.pid_file, "-s", "stop")
        assert result.returncode == 1     # the master is gone now
    finally:
        lb.stop()
