"""Long-lived operation, end to end: tunnels that end when they end, reloads that never
run out of shared memory, stops that always finish (SPEC sections 2 and 4)."""
import json
import os
import signal
import time

import pytest

from tests.harness import (Mplb, RawWebSocket, WsBackend, free_port, get, port_open,
                           wait_for)

pytestmark = pytest.mark.timeout(240)


def status(port):
    code, _, body = get(port, "/status")
    assert code == 200
    return json.loads(body)


def server_row(port, upstream="app"):
    return status(port)["upstreams"][upstream]["servers"][0]


TUNNEL_CONF = """
worker_processes 2;
error_log {dir}/error.log info;
access_log {dir}/access.log;
upstream app {{
    method least_connections;
    server {backend} max_conns=1;
}}
server {{
    listen 127.0.0.1:{port};
    proxy_read_timeout 3600s;
    location = /status {{ mplb_status; }}
    location / {{ proxy_pass app; }}
}}
"""


@pytest.fixture
def ws_backend():
    backend = WsBackend("w1")
    yield backend
    backend.stop()


def test_tunnel_ends_when_the_backend_closes_though_the_client_keeps_its_socket(
        ws_backend, tmp_path):
    """The client sends Close, the backend answers and closes TCP, the client keeps its
    socket open and reads nothing (as many clients do for a while).  The tunnel is gone
    at once: counters, max_conns, the access log line and a graceful stop all see it."""
    port = free_port()
    mplb = Mplb(TUNNEL_CONF.format(dir=tmp_path, backend=ws_backend.url, port=port),
                workers=2, wait_ports=[port])
    lingering = RawWebSocket(port, path="/ws")
    try:
        assert lingering.status == 101
        assert json.loads(lingering.recv_data())["type"] == "welcome"
        assert server_row(port)["tunnels"] == 1
        lingering.send_close(1000)
        started = time.monotonic()
        wait_for(lambda: (lambda row: row["active"] == 0 and row["tunnels"] == 0)(
            server_row(port)), timeout=3.0, interval=0.01, message="tunnel counters released")
        print(f"\ncounters released {1000 * (time.monotonic() - started):.0f} ms after Close")
        access = tmp_path / "access.log"
        wait_for(lambda: access.exists() and " 101 " in access.read_text(), timeout=5.0,
                 message="the tunnel's access log line")
        second = RawWebSocket(port, path="/ws")          # max_conns=1: the slot is free
        assert second.status == 101
        second.close()
        wait_for(lambda: server_row(port)["active"] == 0, message="second tunnel released")
        mplb.signal(signal.SIGQUIT)                       # the first client still holds on
        assert mplb.wait(timeout=10) == 0
    finally:
        lingering.close()
        mplb.stop()


def test_hup_during_a_graceful_stop_is_ignored_and_the_stop_ends(ws_backend, tmp_path):
    port = free_port()
    mplb = Mplb(TUNNEL_CONF.format(dir=tmp_path, backend=ws_backend.url, port=port),
                workers=1, wait_ports=[port])
    ws = RawWebSocket(port, path="/ws")
    try:
        ws.recv_data()
        workers = set(mplb.worker_pids())
        mplb.signal(signal.SIGQUIT)
        wait_for(lambda: not port_open(port), message="listen closed on QUIT")
        mplb.signal(signal.SIGHUP)
        log = tmp_path / "error.log"
        wait_for(lambda: "reload ignored" in log.read_text(), message="HUP logged as ignored")
        assert not port_open(port)                        # not bound again
        assert set(mplb.worker_pids()) == workers         # no new generation
        ws.send_text("still relayed")
        assert ws.recv_data() == b"still relayed"
        ws.close()                                        # the last tunnel ends ...
        assert mplb.wait(timeout=10) == 0                 # ... and so does the master
    finally:
        ws.close()
        mplb.stop()


RELOAD_CONF = """
worker_processes 1;
error_log {dir}/error.log info;
upstream pool {{
    persistence ip_hash table_size={table};
    {servers}
}}
server {{
    listen 127.0.0.1:{port};
    location = /status {{ mplb_status; }}
    location / {{ proxy_pass pool; }}
}}
"""


def test_two_hundred_reloads_with_fresh_addresses_and_table_sizes(tmp_path):
    """Autoscaled backends get new addresses at every deploy: 60 fresh servers and a
    changed table size per reload.  Every reload succeeds and the segment's use stays
    bounded: what the exited generations used is reclaimed."""
    port = free_port()
    sizes = (1000, 4000, 16000, 2000)

    def conf(round_):
        servers = "\n    ".join(f"server 127.1.{round_ % 250}.{i + 1}:80;" for i in range(60))
        return RELOAD_CONF.format(dir=tmp_path, port=port, servers=servers,
                                  table=sizes[round_ % len(sizes)])
    mplb = Mplb(conf(0), workers=1, wait_ports=[port])
    log = tmp_path / "error.log"
    try:
        first = status(port)["shared_memory"]
        peak_servers = peak_entries = 0
        for round_ in range(1, 201):
            mplb.rewrite(conf(round_))
            mplb.signal(signal.SIGHUP)
            wait_for(lambda: f"generation {round_ + 1} serving" in log.read_text()
                     or "reload failed" in log.read_text() or "rolled back" in log.read_text(),
                     timeout=30, interval=0.01, message=f"reload {round_}")
            if round_ % 20 == 0:
                usage = status(port)["shared_memory"]
                peak_servers = max(peak_servers, usage["servers_used"])
                peak_entries = max(peak_entries, usage["table_entries_used"])
        text = log.read_text()
        assert "reload failed" not in text and "rolled back" not in text
        data = status(port)
        assert data["generation"] == 201 and data["reloads"] == 200
        # Old generations exit and their servers and tables go: at most the ones of a
        # generation or two remain, never the thousands registered over the run.
        wait_for(lambda: status(port)["shared_memory"]["servers_used"] == 60,
                 message="the exited generations' servers reclaimed")
        usage = status(port)["shared_memory"]
        assert usage["tables_used"] == 1 and usage["upstreams_used"] == 1
        assert usage["table_entries_used"] <= 16000 + 16
        assert usage["bytes"] == first["bytes"]
        assert peak_servers <= 3 * 60 and peak_entries <= 16016 + 4016 + 16, \
            (peak_servers, peak_entries)
    finally:
        mplb.stop()


def test_segment_use_is_in_the_status_json(ws_backend, tmp_path):
    port = free_port()
    mplb = Mplb(TUNNEL_CONF.format(dir=tmp_path, backend=ws_backend.url, port=port),
                workers=1, wait_ports=[port])
    try:
        usage = status(port)["shared_memory"]
        assert usage["servers_used"] == 1 and usage["upstreams_used"] == 1
        assert usage["bytes"] == os.path.getsize(f"/dev/shm/mplb.{mplb.pid}")
    finally:
        mplb.stop()
