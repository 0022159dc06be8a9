"""What an idle tunnel costs a worker: nothing of its handshake may outlive the upgrade.

A connection's parser, requests and response head point back at it; if those cycles
outlive the connection they wait for a full collection, rare once thousands of tunnels
fill the oldest generation (about 5 KiB per idle tunnel, measured).  The worker's memory
probe (workers.memprobe, MPLB_MEMPROBE_DIR) lists what only the cycle collector would
free; scripts/bench_tunnel_memory.py measures the USS per tunnel with it.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.harness import (ROOT, Backend, Mplb, RawWebSocket, WsBackend, free_port, get,
                           mplb_command)

pytestmark = pytest.mark.timeout(180)

SCRIPT = os.path.join(ROOT, "scripts", "bench_tunnel_memory.py")
# What a client connection's handshake leaves behind when its cycles are not broken.
HANDSHAKE_TYPES = ("ClientConnection", "HttpRequestParser", "Request", "ResponseHead",
                   "HttpResponseParser", "Lane")

CONF = """
worker_processes 1;
upstream ws {{ server {ws}; }}
upstream web {{ server {web}; keepalive 0; }}
server {{
    listen 127.0.0.1:{port};
    proxy_read_timeout 3600s;
    location /ws {{ proxy_pass ws; }}
    location / {{ proxy_pass web; }}
}}
"""


def load_script():
    spec = importlib.util.spec_from_file_location("bench_tunnel_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def backends():
    ws, web = WsBackend("w1"), Backend("h1")
    yield ws, web
    ws.stop()
    web.stop()


def test_tunnels_and_closed_connections_leave_no_cyclic_garbage(backends, tmp_path,
                                                                monkeypatch):
    """Tunnels opened (one handshake each on the greenlet path) and plain connections
    closed (on the fast path) leave none of their handshake objects for the collector;
    the tunnels still relay after the probe's collection."""
    ws, web = backends
    monkeypatch.setenv("MPLB_MEMPROBE_DIR", str(tmp_path))
    port = free_port()
    mplb = Mplb(CONF.format(ws=ws.url, web=web.url, port=port), wait_ports=[port])
    tunnels = []
    try:
        (worker,) = mplb.worker_pids()
        for _ in range(3):
            tunnel = RawWebSocket(port, path="/ws")
            assert tunnel.status == 101
            assert json.loads(tunnel.recv_data())["type"] == "welcome"
            tunnels.append(tunnel)
        for _ in range(3):
            assert get(port, "/")[0] == 200
        report = load_script().probe_report(worker, str(tmp_path), time.monotonic() + 30)
        left = {name: report["garbage"].get(name, 0) for name in HANDSHAKE_TYPES}
        assert left == dict.fromkeys(HANDSHAKE_TYPES, 0), report["garbage"]
        assert report["types"].get("Tunnel") == 3
        for number, tunnel in enumerate(tunnels):
            tunnel.send_text(f"still here {number}")
            assert tunnel.recv_data() == f"still here {number}".encode()
    finally:
        for tunnel in tunnels:
            tunnel.close()
        mplb.stop()


@pytest.mark.skipif(not shutil.which("gcc"), reason="scripts/bench builds its C tools with gcc")
def test_bench_tunnel_memory_reports_per_tunnel_figures(tmp_path):
    """A small run of the measuring script: every tunnel opens and echoes, the figures
    are there and plausible, and the probe finds no handshake left for the collector."""
    command = mplb_command()
    if len(command) != 1:
        pytest.skip("no mplb program beside this Python")
    result = subprocess.run([sys.executable, SCRIPT, "--tunnels", "40", "--hold", "0.2",
                             "--probe", "--top", "200", "--mplb", command[0]],
                            capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("TUNNELMEM ")
    figures = json.loads(last[len("TUNNELMEM "):])
    assert figures["tunnels"] == figures["opened"] == figures["echoed"] == 40
    assert figures["worker_uss_kib"] > figures["worker_uss_base_kib"] > 0
    assert 0 < figures["uss_per_tunnel_kib"] < 100
    assert set(figures["uss_per_tunnel_by_mapping_b"]) == {"heap", "anon", "file", "other"}
    assert 500 < figures["traced_per_tunnel_b"] < 3072      # the live objects: 2.3 KB at 40
    types = dict(figures["types"])
    assert types["Tunnel"] == 1.0 and types["TunnelRecord"] == 1.0
    garbage = dict(figures["garbage"])
    assert not any(garbage.get(name) for name in HANDSHAKE_TYPES), garbage
    assert "KiB/tunnel" in result.stdout
