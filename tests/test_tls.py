"""TLS termination (`listen ... ssl`) through a real mplb: https, wss, timeouts, garbage.

The worker wraps accepted sockets in an SSLContext and the tunnel drives the SSL
sockets non-blocking (workers/tunnel.py); these tests exercise both with real clients.
"""
import asyncio
import http.client
import json
import os
import random
import re
import socket
import ssl
import time

import pytest
import websocket            # websocket-client
from websockets.asyncio.client import connect

from tests.harness import (HERE, Backend, Mplb, RawWebSocket, WsBackend, free_port,
                           raw_exchange, wait_for)

pytestmark = pytest.mark.timeout(300)

CERT = os.path.join(HERE, "configs", "tls", "cert.pem")
KEY = os.path.join(HERE, "configs", "tls", "key.pem")


def client_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.gw = Backend(name="tls-gw")
    e.ws = WsBackend(name="tls-ws")
    e.port = free_port()
    e.plain = free_port()
    config = f"""
worker_processes 2;
upstream gw {{ server {e.gw.url} max_fails=0; }}
upstream ws {{ server {e.ws.url} max_fails=0; }}
server {{
    listen 127.0.0.1:{e.port} ssl;
    ssl_certificate {CERT};
    ssl_certificate_key {KEY};
    location / {{ proxy_pass gw; }}
    location /ws {{ proxy_pass ws; }}
    location /idle/ {{ proxy_read_timeout 1s; proxy_pass ws; }}
    location /ka/ {{ proxy_websocket_keepalive on interval=0.5s; proxy_pass ws; }}
}}
server {{
    listen 127.0.0.1:{e.plain};
    location / {{ proxy_pass gw; }}
}}
"""
    e.lb = Mplb(config, workers=2, wait_ports=[e.port, e.plain])
    try:
        yield e
    finally:
        e.lb.stop()
        e.gw.stop()
        e.ws.stop()


def https_get(port, path="/", headers=None):
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=client_context())
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_https_get_and_scheme(env):
    status, headers, body = https_get(env.port, "/hello?x=1")
    assert status == 200
    data = json.loads(body)
    assert data["backend"] == "tls-gw" and data["path"] == "/hello" and data["query"] == "x=1"
    assert data["headers"]["x-forwarded-proto"] == "https"
    # The plain listen says http.
    conn = http.client.HTTPConnection("127.0.0.1", env.plain, timeout=20)
    try:
        conn.request("GET", "/")
        plain = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert plain["headers"]["x-forwarded-proto"] == "http"


def test_https_keepalive_and_large_body(env):
    conn = http.client.HTTPSConnection("127.0.0.1", env.port, timeout=30,
                                       context=client_context())
    try:
        for size in (0, 1, 100000, 3 * 1024 * 1024):
            conn.request("GET", f"/size/{size}")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == b"x" * size
    finally:
        conn.close()


def test_wss_echo_websocket_client(env):
    ws = websocket.create_connection(f"wss://127.0.0.1:{env.port}/ws", timeout=30,
                                     sslopt={"cert_reqs": ssl.CERT_NONE,
                                             "check_hostname": False},
                                     subprotocols=["chat"])
    try:
        assert ws.getsubprotocol() == "chat"
        welcome = json.loads(ws.recv())
        assert welcome["backend"] == "tls-ws"
        for message in ("hello", "", "ünïcødé ✓ 🚀", "z" * 70000):
            ws.send(message)
            assert ws.recv() == message
        payload = random.Random(3).randbytes(300000)
        ws.send_binary(payload)
        assert ws.recv_data() == (websocket.ABNF.OPCODE_BINARY, payload)
        ws.ping(b"tls-ping")
        frame = ws.recv_frame()
        assert (frame.opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"tls-ping")
    finally:
        ws.close()


def test_wss_websockets_deflate_and_4mib(env):
    async def main():
        async with connect(f"wss://127.0.0.1:{env.port}/ws", ssl=client_context(),
                           compression="deflate", max_size=None, ping_interval=None,
                           open_timeout=30, close_timeout=30) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["extensions"] == ["permessage-deflate"]
            rng = random.Random(5)
            big = rng.randbytes(4 * 1024 * 1024)
            for message in ("small", big, "text " * 800000, big[::-1]):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 60) == message
            # Several messages in flight at once (TLS records back to back).
            batch = [rng.randbytes(rng.randrange(1, 200000)) for _ in range(20)]
            for message in batch:
                await ws.send(message)
            for message in batch:
                assert await asyncio.wait_for(ws.recv(), 60) == message
            await ws.close(4000, "bye")
            return ws.close_code, ws.close_reason

    assert asyncio.run(main()) == (4000, "bye")


def test_wss_uncompressed_4mib_both_ways_concurrently(env):
    """No compression: 4 MiB of ciphertext each way, written while reading (backpressure)."""
    async def main():
        async with connect(f"wss://127.0.0.1:{env.port}/ws", ssl=client_context(),
                           compression=None, max_size=None, ping_interval=None,
                           open_timeout=30) as ws:
            await ws.recv()
            messages = [random.Random(n).randbytes(4 * 1024 * 1024) for n in range(3)]

            async def sender():
                for message in messages:
                    await ws.send(message)

            task = asyncio.create_task(sender())
            for message in messages:
                assert await asyncio.wait_for(ws.recv(), 60) == message
            await task

    asyncio.run(main())


@pytest.mark.parametrize("prefix", ["/ws", "/ka/"], ids=["keepalive-off", "keepalive-on"])
def test_many_concurrent_wss_tunnels(env, prefix):
    """60 wss tunnels at once, each moving its own messages (up to 1 MiB) both ways."""
    async def one(number):
        rng = random.Random(number)
        async with connect(f"wss://127.0.0.1:{env.port}{prefix}?n={number}",
                           ssl=client_context(), compression=None, max_size=None,
                           ping_interval=None, open_timeout=60, close_timeout=30) as ws:
            assert json.loads(await ws.recv())["path"].endswith(f"?n={number}")
            for size in (10, 20000, rng.randrange(100000, 1024 * 1024)):
                message = rng.randbytes(size)
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 120) == message
            await ws.send(f"text {number}")
            assert await asyncio.wait_for(ws.recv(), 120) == f"text {number}"
        return True

    async def main():
        return await asyncio.gather(*(one(n) for n in range(60)))

    assert asyncio.run(main()) == [True] * 60


def test_wss_idle_tunnel_closed_by_read_timeout(env):
    with RawWebSocket(env.port, "/idle/", timeout=20, ssl_context=client_context()) as ws:
        assert ws.status == 101, ws.head
        client_port = ws.sock.getsockname()[1]
        assert json.loads(ws.recv_data())["type"] == "welcome"
        started = time.monotonic()
        eof, frames = ws.wait_eof(timeout=20)
        elapsed = time.monotonic() - started
    assert eof, "idle wss tunnel not closed"
    assert frames == []
    assert elapsed >= 0.8, elapsed
    wait_for(lambda: re.search(rf"tunnel client=127\.0\.0\.1:{client_port} "
                               rf"server=127\.0\.0\.1:{env.ws.port} closed: timeout",
                               env.lb.output()),
             message="the -v log line naming the timeout")


def test_wss_keepalive_pings(env):
    """Keepalive framing on a TLS tunnel: mplb pings, swallows our pong, data flows."""
    with RawWebSocket(env.port, "/ka/", timeout=20, ssl_context=client_context()) as ws:
        ws.recv_data()
        frame = ws.recv_frame(timeout=20)
        assert frame is not None and frame[1] == 0x9 and frame[2].startswith(b"mplb"), frame
        ws.send_frame(0xA, frame[2])
        ws.send_text("cmd:stats")
        while True:
            frame = ws.recv_frame(timeout=20)
            assert frame is not None
            if frame[1] == 0x9:
                ws.send_frame(0xA, frame[2])
                continue
            break
        assert frame[1] == 0x1
        assert json.loads(frame[2])["pongs"] == 0


@pytest.mark.parametrize("prefix", ["/ws", "/ka/"], ids=["keepalive-off", "keepalive-on"])
def test_wss_frames_in_the_upgrade_request_record(env, prefix):
    """Frames sent right behind the request head (same TLS write) reach the backend."""
    early = RawWebSocket.frame(0x1, b"early one") + RawWebSocket.frame(0x2, b"e" * 30000)
    with RawWebSocket(env.port, prefix, timeout=20, early=early,
                      ssl_context=client_context()) as ws:
        assert ws.status == 101
        assert json.loads(ws.recv_data())["type"] == "welcome"
        assert ws.recv_data() == b"early one"
        assert ws.recv_data() == b"e" * 30000


def test_tls_garbage_does_not_crash_worker(env):
    pids = sorted(env.lb.worker_pids())
    assert len(pids) == 2
    # Plain HTTP to the TLS port, pure junk, and a truncated ClientHello.
    for raw in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(2000),
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20):
        data, closed = raw_exchange(env.port, raw, timeout=10, shutdown_write=True)
        assert closed
        assert not data.startswith(b"HTTP/1.1 200")
    # A client that connects and says nothing, then goes away.
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    sock.close()
    # The workers are the same processes and still serve https.
    for _ in range(4):
        status, _, body = https_get(env.port, "/after-garbage")
        assert status == 200 and json.loads(body)["path"] == "/after-garbage"
    assert sorted(env.lb.worker_pids()) == pids
    assert "Traceback" not in env.lb.output()


def test_wss_backend_killed_closes_client_with_1001():
    """Keepalive framing on a TLS tunnel: the backend dies, the wss client gets 1001."""
    import signal
    backend = Backend(name="tls-victim")
    port = free_port()
    lb = Mplb(f"""
upstream victim {{ server {backend.url}; }}
server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {CERT};
    ssl_certificate_key {KEY};
    proxy_websocket_keepalive on interval=0.5s;
    location / {{ proxy_pass victim; }}
}}
""", workers=1, wait_ports=[port])
    try:
        with RawWebSocket(port, "/ws", timeout=20, ssl_context=client_context()) as ws:
            assert json.loads(ws.recv_data())["backend"] == "tls-victim"
            os.killpg(backend.pid, signal.SIGKILL)
            eof, frames = ws.wait_eof(timeout=20)
            assert eof
            closes = [f for f in frames if f[1] == 0x8]
            assert closes and closes[0][2][:2] == (1001).to_bytes(2, "big"), frames
        assert lb.alive()
    finally:
        lb.stop()
        backend.stop()


def test_tls_keepalive_connection_gets_connection_close_after_a_reload(tmp_path):
    """TLS sessions cannot move to the new generation: the old worker answers the next
    request of an idle TLS keep-alive connection with Connection: close instead of
    closing it under a request the client may be sending."""
    import signal
    gw = Backend(name="tls-reload")
    port = free_port()
    config = f"""
worker_processes 1;
error_log {tmp_path}/error.log info;
upstream gw {{ server {gw.url}; }}
server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {CERT};
    ssl_certificate_key {KEY};
    location / {{ proxy_pass gw; }}
}}
"""
    lb = Mplb(config, workers=1, wait_ports=[port])
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=client_context())
    try:
        conn.request("GET", "/first")
        first = conn.getresponse()
        first.read()
        assert first.getheader("connection") != "close"
        old = set(lb.worker_pids())
        lb.signal(signal.SIGHUP)
        wait_for(lambda: "generation 2 serving" in (tmp_path / "error.log").read_text(),
                 message="reload")
        assert old & set(lb.worker_pids())              # waiting for the TLS session
        conn.request("GET", "/second")
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["path"] == "/second"
        assert second.getheader("connection") == "close"
        wait_for(lambda: not old & set(lb.worker_pids()), message="old worker to exit")
    finally:
        conn.close()
        lb.stop()
        gw.stop()
