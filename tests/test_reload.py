"""Reload (SIGHUP) end to end: generations, hitless HTTP, tunnel handover, signals."""
import collections
import json
import os
import signal
import threading

import pytest
import websocket

from tests.harness import (RawConnection, backend_pool, Mplb, free_port, get, port_open,
                           wait_for)

CONF = """
worker_processes 2;
error_log {log};
access_log {access};
upstream app {{
    {servers}
}}
server {{
    listen 127.0.0.1:{port};
    proxy_read_timeout 3600s;
    {extra}
    location / {{ proxy_pass app; {location} }}
    location = /status {{ mplb_status; }}
}}
"""


@pytest.fixture(scope="module")
def backends():
    with backend_pool("r") as started:
        yield started


def render(port, tmp_path, servers, extra="", location=""):
    return CONF.format(port=port, log=tmp_path / "error.log", access=tmp_path / "access.log",
                       servers="\n    ".join(servers), extra=extra, location=location)


def reload_and_wait(mplb, timeout=30.0):
    """SIGHUP, then wait until every worker of the previous generation has exited."""
    before = set(mplb.worker_pids())
    os.kill(mplb.pid, signal.SIGHUP)
    wait_for(lambda: not (before & set(mplb.worker_pids()))
             and len(mplb.worker_pids()) == len(before),
             timeout=timeout, message="old generation to exit")


def status(port):
    code, _, body = get(port, "/status")
    assert code == 200
    return json.loads(body)


def backend_of(port, path="/x"):
    code, _, body = get(port, path)
    assert code == 200, body
    return json.loads(body)["backend"]


def test_changed_weights_take_effect(backends, tmp_path):
    port = free_port()
    first = [f"server {b.url} weight=1;" for b in backends[:2]]
    mplb = Mplb(render(port, tmp_path, first), workers=1, wait_ports=[port])
    try:
        seen = [backend_of(port) for _ in range(20)]
        assert seen.count("r0") == 10 and seen.count("r1") == 10
        mplb.rewrite(render(port, tmp_path, [f"server {backends[0].url} weight=3;",
                                            f"server {backends[1].url} weight=1;"]))
        reload_and_wait(mplb)
        assert status(port)["generation"] == 2
        seen = [backend_of(port) for _ in range(40)]
        assert seen.count("r0") == 30 and seen.count("r1") == 10
    finally:
        mplb.stop()


def test_broken_file_keeps_old_configuration(backends, tmp_path):
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {backends[0].url};"]), workers=1,
                wait_ports=[port])
    try:
        workers = set(mplb.worker_pids())
        mplb.rewrite("upstream app {\n    method least_con;\n    server http://127.0.0.1:1;\n}\n")
        os.kill(mplb.pid, signal.SIGHUP)
        log = tmp_path / "error.log"
        wait_for(lambda: "reload failed" in log.read_text(), message="reload failure logged")
        text = log.read_text()
        assert f"{mplb.conf}:2: unknown method \"least_con\"" in text
        assert backend_of(port) == "r0"
        assert set(mplb.worker_pids()) == workers
        assert status(port)["generation"] == 1
    finally:
        mplb.stop()


def reload_under_load(mplb, clients, stop, reloads=20):
    """Run the ``clients`` threads through ``reloads`` reloads, then stop and join them."""
    for thread in clients:
        thread.start()
    try:
        for _ in range(reloads):
            reload_and_wait(mplb)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)


def test_requests_never_fail_across_20_reloads(backends, tmp_path):
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {b.url};" for b in backends]), workers=2,
                wait_ports=[port])
    failures, done, count = [], threading.Event(), [0]

    def hammer():
        while not done.is_set():
            try:
                code, _, _ = get(port, "/loop", timeout=10)
                if code != 200:
                    failures.append(code)
            except OSError as exc:
                failures.append(repr(exc))
            count[0] += 1

    try:
        reload_under_load(mplb, [threading.Thread(target=hammer) for _ in range(4)], done)
    finally:
        mplb.stop()
    assert count[0] > 100
    assert failures == []


@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["lanes", "greenlets"])
def test_keepalive_clients_lose_nothing_across_20_reloads(backends, tmp_path, monkeypatch,
                                                          fast_path):
    """10 keep-alive clients, a request every 10 ms each, 20 reloads: every request gets
    exactly one 200 on its own connection (no client retries), and every backend
    answered each request once.  Idle connections move to the new generation instead
    of being closed under a request the client has just sent: from a Lane, or (with
    MPLB_FAST_PATH=0) from the greenlet waiting for the next request."""
    monkeypatch.setenv("MPLB_FAST_PATH", fast_path)
    port = free_port()
    servers = [f"server {b.url};" for b in backends]
    mplb = Mplb(render(port, tmp_path, servers), workers=2, wait_ports=[port])
    stop, errors, sent = threading.Event(), [], collections.Counter()

    def client(number):
        try:
            with RawConnection(port, timeout=10) as conn:
                seq = 0
                while not stop.is_set():
                    path = f"/once/{fast_path}/{number}/{seq}"
                    conn.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    response = conn.read_response()
                    if response.status != 200 or json.loads(response.body)["path"] != path:
                        errors.append((path, response.status, response.body[:100]))
                        return
                    if response.header("connection") == "close":
                        errors.append((path, "Connection: close"))
                        return
                    sent[number] += 1
                    seq += 1
                    stop.wait(0.01)          # the pace of the client, not a synchronisation
        except (AssertionError, OSError) as exc:
            errors.append((number, sent[number], repr(exc)))

    try:
        reload_under_load(mplb, [threading.Thread(target=client, args=(n,))
                                 for n in range(10)], stop)
        assert errors == []
        assert all(sent[n] > 0 for n in range(10))
        answered = collections.Counter()
        for backend in backends:
            answered.update(path for path in json.loads(get(backend.port, "/once-log")[2])
                            if path.startswith(f"/once/{fast_path}/"))
        twice = [path for path, n in answered.items() if n > 1]
        assert twice == []
        assert sum(answered.values()) == sum(sent.values())
        assert "idle connection(s) over" in (tmp_path / "error.log").read_text()
    finally:
        mplb.stop()


def _open_tunnels(port, count):
    conns = []
    for _ in range(count):
        conn = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=20)
        assert json.loads(conn.recv())["type"] == "welcome"
        conns.append(conn)
    return conns


@pytest.mark.parametrize("framing", ["", "proxy_websocket_keepalive on interval=1s;"])
def test_tunnels_survive_10_reloads_without_loss(backends, tmp_path, framing):
    """Numbered messages through 100 tunnels while reloading: none lost, duplicated, reordered."""
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {b.url};" for b in backends], extra=framing),
                workers=2, wait_ports=[port])
    conns = _open_tunnels(port, 100)
    errors, stop, counts = [], threading.Event(), [0] * len(conns)

    def converse(index, conn):
        number = 0
        try:
            while not stop.is_set():
                conn.send(f"{index}:{number}")
                answer = conn.recv()
                if answer != f"{index}:{number}":
                    errors.append((index, number, answer))
                    return
                number += 1
        except Exception as exc:  # noqa: BLE001 - any failure is what the test reports
            errors.append((index, number, repr(exc)))
        counts[index] = number

    threads = [threading.Thread(target=converse, args=(i, c)) for i, c in enumerate(conns)]
    for thread in threads:
        thread.start()
    try:
        original = set(mplb.worker_pids())
        for _ in range(10):
            reload_and_wait(mplb)
        assert not original & set(mplb.worker_pids())
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    try:
        assert errors == []
        assert min(counts) > 0
        for conn in conns:
            conn.send("last")
            assert conn.recv() == "last"
            conn.close()
        data = status(port)
        assert data["generation"] == 11
        assert all(w["generation"] == 11 for w in data["workers"])
        assert "handed" in (tmp_path / "error.log").read_text()
        wait_for(lambda: sum(s["tunnels"] for s in
                             status(port)["upstreams"]["app"]["servers"]) == 0,
                 message="tunnel counters back to zero")
    finally:
        mplb.stop()


def close_code(conn, limit=100):
    """Read frames until the server's Close frame; return its status code."""
    for _ in range(limit):
        opcode, frame = conn.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(frame.data[:2], "big")
    raise AssertionError("no close frame")


def test_tunnel_to_removed_server_is_closed_with_1001(backends, tmp_path):
    port = free_port()
    framing = "proxy_websocket_keepalive on interval=30s;"
    mplb = Mplb(render(port, tmp_path, [f"server {backends[0].url};"], extra=framing),
                workers=1, wait_ports=[port])
    try:
        conn = _open_tunnels(port, 1)[0]
        mplb.rewrite(render(port, tmp_path, [f"server {backends[1].url};"], extra=framing))
        reload_and_wait(mplb)
        assert close_code(conn) == 1001
    finally:
        mplb.stop()


def test_listens_added_and_removed(backends, tmp_path):
    port, other = free_port(), free_port()
    servers = [f"server {backends[0].url};"]
    mplb = Mplb(render(port, tmp_path, servers), workers=1, wait_ports=[port])
    try:
        mplb.rewrite(render(port, tmp_path, servers, extra=f"listen 127.0.0.1:{other};"))
        reload_and_wait(mplb)
        assert backend_of(other) == "r0"
        mplb.rewrite(render(other, tmp_path, servers))
        reload_and_wait(mplb)
        wait_for(lambda: not port_open(port), message="removed listen closed")
        assert backend_of(other) == "r0"
    finally:
        mplb.stop()


def test_ttin_ttou_change_worker_count(backends, tmp_path):
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {backends[0].url};"]), workers=2,
                wait_ports=[port])
    try:
        os.kill(mplb.pid, signal.SIGTTIN)
        wait_for(lambda: len(mplb.worker_pids()) == 3, message="three workers")
        # Standard signals do not queue: wait for each TTOU to take effect.
        os.kill(mplb.pid, signal.SIGTTOU)
        wait_for(lambda: len(mplb.worker_pids()) == 2, message="two workers")
        os.kill(mplb.pid, signal.SIGTTOU)
        wait_for(lambda: len(mplb.worker_pids()) == 1, message="one worker")
        assert backend_of(port) == "r0"
    finally:
        mplb.stop()


def test_usr1_reopens_logs_and_access_log_lines(backends, tmp_path):
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {backends[0].url};"]), workers=1,
                wait_ports=[port])
    try:
        assert backend_of(port, "/first") == "r0"
        assert backend_of(port, "/slow/0.3") == "r0"
        conn = _open_tunnels(port, 1)[0]
        conn.send("hello")
        assert conn.recv() == "hello"
        conn.close()
        access = tmp_path / "access.log"
        wait_for(lambda: access.exists() and "tunnel_time=" in access.read_text(),
                 message="tunnel line in the access log")
        lines = access.read_text().splitlines()
        first = [line for line in lines if "GET /first HTTP/1.1" in line][0]
        assert " 200 " in first and f"upstream=127.0.0.1:{backends[0].port}" in first
        tunnel = [line for line in lines if "tunnel_time=" in line][0]
        assert '"GET /ws HTTP/1.1" 101' in tunnel and "bytes_in=" in tunnel
        # Times are measured on one monotonic clock: never negative, and real.
        times = {line.split('"')[1]: float(line.split("_time=")[1].split()[0])
                 for line in lines}
        assert all(value >= 0 for value in times.values()), times
        assert times["GET /slow/0.3 HTTP/1.1"] >= 0.3
        os.rename(access, tmp_path / "access.log.1")
        os.rename(tmp_path / "error.log", tmp_path / "error.log.1")
        os.kill(mplb.pid, signal.SIGUSR1)
        wait_for(lambda: (tmp_path / "error.log").exists(), message="error log reopened")
        wait_for(lambda: backend_of(port, "/second") and access.exists()
                 and "/second" in access.read_text(), message="access log reopened")
        # The worker (not root, in a 0700 directory) writes to the files the master
        # reopened and handed over: its -v upgrade line lands in the new error log.
        _open_tunnels(port, 1)[0].close()
        worker = mplb.worker_pids()[0]
        wait_for(lambda: f"{worker}#0: upgrade GET /ws" in (tmp_path / "error.log").read_text(),
                 message="the worker's line in the new error log")
        assert (tmp_path / "error.log.1").read_text().count("upgrade GET /ws") == 1
    finally:
        mplb.stop()


def test_signal_option_reload(backends, tmp_path):
    import subprocess
    import sys
    port = free_port()
    mplb = Mplb(render(port, tmp_path, [f"server {backends[0].url};"]), workers=1,
                wait_ports=[port])
    try:
        before = set(mplb.worker_pids())
        subprocess.run([sys.executable, "-m", "mplb", "-conf", mplb.conf, "-pid",
                        mplb.pid_file, "-s", "reload"], check=True, timeout=30)
        wait_for(lambda: not before & set(mplb.worker_pids()) and mplb.worker_pids(),
                 message="reload by -s reload")
        assert status(port)["reloads"] == 1
    finally:
        mplb.stop()
