"""Tunnel tests: real sockets on 127.0.0.1, the tunnel in a gevent subprocess (harness).

Backends are `websockets` servers (permessage-deflate on) or raw sockets speaking just
enough RFC 6455 to observe pings; clients are websockets / websocket-client / raw.
"""
import asyncio
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest
import websocket as wsclient
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed
from websockets.utils import accept_key

from mplb.workers.wsframes import FrameTracker, ProtocolError, build_frame, parse_header

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
pytestmark = pytest.mark.timeout(120)


# ---- harness ---------------------------------------------------------------------------
class Harness:
    def __init__(self, backend, mode="http", use_splice=None, tracemalloc=False, **settings):
        cfg = {"backend": list(backend), "mode": mode, "settings": settings,
               "use_splice": use_splice, "tracemalloc": tracemalloc}
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "tunnel_harness.py"),
                                      json.dumps(cfg)], stdout=subprocess.PIPE, cwd=ROOT)
        self.lines = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        ready = self.next_line("READY", 10)
        _, port, ctl = ready.split()
        self.port, self.ctl_port = int(port), int(ctl)
        self.ctl = socket.create_connection(("127.0.0.1", self.ctl_port))
        self.ctl_file = self.ctl.makefile("rwb")

    def _reader(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())

    def next_line(self, prefix, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {prefix} line within {timeout}s"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def next_close(self, timeout=10):
        return json.loads(self.next_line("CLOSE", timeout)[6:])

    def command(self, cmd):
        self.ctl_file.write(cmd.encode() + b"\n")
        self.ctl_file.flush()
        return json.loads(self.ctl_file.readline())

    def stop(self):
        self.ctl.close()
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def harness_factory():
    made = []

    def make(*args, **kwargs):
        h = Harness(*args, **kwargs)
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo_handler(ws):
    try:
        async for msg in ws:
            await ws.send(msg)
    except ConnectionClosed:
        pass


def ws_backend(handler=echo_handler, **kw):
    """Start a websockets server (deflate on by default) in a thread; return (host, port)."""
    started = queue.Queue()

    async def main():
        async with serve(handler, "127.0.0.1", 0, max_size=None, **kw) as server:
            started.put(server.sockets[0].getsockname()[:2])
            await asyncio.Future()
    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    return started.get(timeout=10)


# ---- raw RFC 6455 peer helpers ----------------------------------------------------------
def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(len(data))
        data += chunk
    return data


def read_frame(sock):
    """Return (opcode, payload, masked) of the next frame (unmasking if needed)."""
    head = recv_exact(sock, 2)
    need = {126: 2, 127: 8}.get(head[1] & 0x7F, 0) + (4 if head[1] & 0x80 else 0)
    head += recv_exact(sock, need)
    hlen, b0, plen, masked = parse_header(head)
    payload = recv_exact(sock, plen)
    if masked:
        key = head[hlen - 4:hlen]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload, bool(masked)


def raw_backend(on_conn):
    """A raw TCP server answering the upgrade with 101, then calling on_conn(sock)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    def loop():
        while True:
            conn, _ = lsock.accept()
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = head.split(b"ec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
            accept = accept_key(key.decode()).encode()
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            threading.Thread(target=on_conn, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return lsock.getsockname()


def raw_client(port):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head
    return sock


# ---- frame tracker unit tests ------------------------------------------------------------
def test_tracker_passes_everything_and_splits_headers():
    frames = [build_frame(0x1, b"hi", True), bytes([0x82, 126, 1, 0]) + b"x" * 256,
              bytes([0x02, 127]) + (70000).to_bytes(8, "big") + b"y" * 70000,
              build_frame(0xA, b"z" * 12, False), build_frame(0x8, b"\x03\xe8", False)]
    stream = b"".join(frames)
    for step in (1, 3, 7, 13, 1000, len(stream)):
        tr = FrameTracker(b"mplbXXXX")
        out = b"".join(bytes(tr.feed(memoryview(stream[i:i + step])))
                       for i in range(0, len(stream), step))
        assert out == stream and tr.at_boundary() and tr.close_seen


def test_tracker_swallows_only_our_pongs():
    ours = build_frame(0xA, b"mplbXXXX" + b"\0\0\0\1", True)
    theirs = build_frame(0xA, b"mplbYYYY" + b"\0\0\0\1", True)
    stream = build_frame(0x1, b"a", True) + ours + theirs + build_frame(0x1, b"b", True)
    for step in (1, 5, len(stream)):
        tr = FrameTracker(b"mplbXXXX")
        out = b"".join(bytes(tr.feed(memoryview(stream[i:i + step])))
                       for i in range(0, len(stream), step))
        assert out == stream.replace(ours, b"") and tr.pongs == 1


def test_tracker_rejects_huge_length():
    with pytest.raises(ProtocolError):
        FrameTracker(None).feed(memoryview(bytes([0x82, 127, 0x80]) + b"\0" * 7))


# ---- transparency ------------------------------------------------------------------------
@pytest.mark.parametrize("keepalive,splice", [(False, False), (False, True), (True, None)])
def test_echo_transparency_big_fragmented_binary(harness_factory, keepalive, splice):
    backend = ws_backend(subprotocols=["chat", "superchat"])
    h = harness_factory(backend, use_splice=splice, proxy_websocket_keepalive=keepalive,
                        proxy_websocket_keepalive_interval=0.3)

    async def go():
        big = os.urandom(16 * 1024 * 1024)
        results = []
        for url in (f"ws://{backend[0]}:{backend[1]}/", f"ws://127.0.0.1:{h.port}/"):
            async with connect(url, max_size=None, subprotocols=["superchat"]) as ws:
                got = [ws.subprotocol, ws.response.headers.get("Sec-WebSocket-Extensions")]
                for msg in ("hello", b"\x00\xff" * 1000, big, "é" * 70000):
                    await ws.send(msg)
                    got.append(await ws.recv() == msg)
                await ws.send(["frag", "mented", " text"])      # fragmented message
                got.append(await ws.recv())
                await ws.send([b"a" * 100000, b"b" * 3])
                got.append(len(await ws.recv()))
                await ws.ping(b"own")                           # peers' pings pass
                results.append(got)
        return results
    direct, proxied = run(go())
    assert direct == proxied
    assert proxied[0] == "superchat" and "permessage-deflate" in proxied[1]
    assert proxied[2:] == [True] * 4 + ["fragmented text", 100003]
    close = h.next_close()
    assert close["reason"] in ("client closed", "backend closed")
    assert close["bytes_in"] > 16 * 1024 * 1024 and close["bytes_out"] > 16 * 1024 * 1024


@pytest.mark.parametrize("keepalive", [False, True])
def test_close_codes_propagate(harness_factory, keepalive):
    async def handler(ws):
        msg = await ws.recv()
        await ws.close(int(msg), "bye")
    backend = ws_backend(handler)
    h = harness_factory(backend, proxy_websocket_keepalive=keepalive)

    async def go():
        async with connect(f"ws://127.0.0.1:{h.port}/") as ws:
            await ws.send("4321")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code, ws.close_reason
    assert run(go()) == (4321, "bye")
    assert h.next_close()["reason"] in ("backend closed", "client closed")


def test_websocket_client_sync_through_tunnel(harness_factory):
    backend = ws_backend()
    h = harness_factory(backend)
    ws = wsclient.create_connection(f"ws://127.0.0.1:{h.port}/", timeout=10)
    ws.send_binary(b"\x01" * 70000)
    assert ws.recv() == b"\x01" * 70000
    ws.close(status=4000)
    assert h.next_close()["reason"] in ("client closed", "backend closed")


# ---- keepalive -------------------------------------------------------------------------
def test_keepalive_pings_each_silent_peer_and_swallows_our_pongs(harness_factory):
    seen_by_backend = queue.Queue()

    def backend_peer(conn):
        op, payload, masked = read_frame(conn)
        seen_by_backend.put((op, payload, masked))
        conn.sendall(build_frame(0xA, payload, False))          # answer mplb's ping
        while True:
            try:
                frame = read_frame(conn)
            except (EOFError, OSError):
                return
            if frame[0] == 0x9 and frame[1].startswith(b"mplb"):
                conn.sendall(build_frame(0xA, frame[1], False))
            else:
                seen_by_backend.put(frame)
    backend = raw_backend(backend_peer)
    h = harness_factory(backend, proxy_websocket_keepalive=True,
                        proxy_websocket_keepalive_interval=0.3, proxy_read_timeout=5)
    c = raw_client(h.port)
    c.settimeout(5)
    op, payload, masked = read_frame(c)
    assert op == 0x9 and payload.startswith(b"mplb") and len(payload) == 12 and not masked
    c.sendall(build_frame(0xA, payload, True))                  # our pong: swallowed
    bop, bpayload, bmasked = seen_by_backend.get(timeout=5)
    assert bop == 0x9 and bpayload.startswith(b"mplb") and bmasked
    c.sendall(build_frame(0x9, b"client-ping", True))           # peers' own pings pass
    c.sendall(build_frame(0x1, b"marker", True))
    assert seen_by_backend.get(timeout=5) == (0x9, b"client-ping", True)
    assert seen_by_backend.get(timeout=5) == (0x1, b"marker", True)
    # the client sees no unsolicited pong: only further mplb pings may arrive
    c.sendall(build_frame(0x1, b"marker2", True))
    deadline = time.monotonic() + 1.5
    c.settimeout(0.3)
    while time.monotonic() < deadline:
        try:
            op, payload, _ = read_frame(c)
        except socket.timeout:
            continue
        assert op == 0x9 and payload.startswith(b"mplb")
        c.sendall(build_frame(0xA, payload, True))
    assert seen_by_backend.get(timeout=5) == (0x1, b"marker2", True)
    assert seen_by_backend.empty()     # no pong of ours ever reached the backend
    c.close()


def test_dead_backend_detected_client_gets_1001(harness_factory):
    backend = raw_backend(lambda conn: threading.Event().wait())   # never answers
    h = harness_factory(backend, proxy_websocket_keepalive=True,
                        proxy_websocket_keepalive_interval=0.2, proxy_read_timeout=0.6)

    async def go():
        t0 = time.monotonic()
        async with connect(f"ws://127.0.0.1:{h.port}/", ping_interval=None) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code, time.monotonic() - t0
    code, took = run(go())
    close = h.next_close()
    assert code == 1001 and took < 3.0
    assert close["reason"] == "keepalive timeout" and close["backend_failed"]


def test_read_timeout_closes_idle_tunnel(harness_factory):
    backend = ws_backend()
    h = harness_factory(backend, proxy_read_timeout=0.5)

    async def go():
        t0 = time.monotonic()
        async with connect(f"ws://127.0.0.1:{h.port}/", ping_interval=None) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        return time.monotonic() - t0
    took = run(go())
    assert 0.4 < took < 3.0 and h.next_close()["reason"] == "timeout"


@pytest.mark.parametrize("keepalive", [False, True])
def test_backend_kill_closes_client(harness_factory, keepalive):
    code = "import asyncio,sys\nfrom websockets.asyncio.server import serve\n" \
           "async def h(ws):\n  async for m in ws: await ws.send(m)\n" \
           "async def main():\n  async with serve(h,'127.0.0.1',0) as s:\n" \
           "    print(s.sockets[0].getsockname()[1], flush=True); await asyncio.Future()\n" \
           "asyncio.run(main())\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        h = harness_factory(("127.0.0.1", port), proxy_websocket_keepalive=keepalive)

        async def go():
            async with connect(f"ws://127.0.0.1:{h.port}/", ping_interval=None) as ws:
                await ws.send("x")
                assert await ws.recv() == "x"
                proc.kill()
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return ws.close_code
        assert run(go(), 10) == (1001 if keepalive else 1006)
        assert h.next_close()["reason"] in ("backend closed", "backend error")
    finally:
        proc.kill()


def test_client_eof_passes_its_bytes_on_then_ends_the_tunnel(harness_factory):
    """SPEC 4: the tunnel ends when either side closes, after passing on what that side
    sent; the backend sees every byte, then EOF (it is not kept half open)."""
    received = queue.Queue()

    def backend_peer(conn):
        data = b""
        conn.settimeout(10)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        received.put(len(data))
        try:
            conn.sendall(b"too late")     # the client side is already closed
        except OSError:
            pass
        conn.close()
    backend = raw_backend(backend_peer)
    h = harness_factory(backend)
    c = raw_client(h.port)
    c.sendall(b"z" * 300000)
    c.shutdown(socket.SHUT_WR)
    assert received.get(timeout=10) == 300000
    assert h.next_close()["reason"] == "client closed"
    c.settimeout(5)
    assert c.recv(100) == b""              # closed by mplb: the late reply never arrives
    assert h.command("count")["live"] == 0


@pytest.mark.parametrize("keepalive", [False, True])
def test_backend_close_ends_tunnel_while_client_keeps_its_socket(harness_factory, keepalive):
    """The backend answers and closes; the client keeps its socket open and silent.
    The tunnel must end at once (nginx does), not linger until the client goes."""
    def backend_peer(conn):
        conn.sendall(build_frame(0x1, b"bye", False) + build_frame(0x8, b"\x03\xe8", False))
        conn.close()
    backend = raw_backend(backend_peer)
    h = harness_factory(backend, proxy_websocket_keepalive=keepalive)
    c = raw_client(h.port)
    started = time.monotonic()
    close = h.next_close(5)
    assert close["reason"] == "backend closed"
    assert time.monotonic() - started < 2.0
    assert h.command("count")["live"] == 0
    c.settimeout(5)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
    # The backend's frames arrive whole and nothing is added after its own Close.
    assert data == build_frame(0x1, b"bye", False) + build_frame(0x8, b"\x03\xe8", False)
    c.close()


def test_close_all_tunnels_sends_1001(harness_factory):
    backend = ws_backend()
    h = harness_factory(backend)

    async def go():
        async with connect(f"ws://127.0.0.1:{h.port}/", ping_interval=None) as ws:
            await ws.send("x")
            await ws.recv()
            assert h.command("close_all")["closed"] == 1
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return ws.close_code
    assert run(go()) == 1001
    assert h.next_close()["reason"] == "shutdown" and h.command("count")["live"] == 0


# ---- scale and memory --------------------------------------------------------------------
def test_thousand_concurrent_tunnels_and_idle_memory(harness_factory):
    n = 1000
    backend = ws_backend(compression=None)
    h = harness_factory(backend, tracemalloc=True)
    before = h.command("mem")

    async def go():
        conns = []
        for i in range(0, n, 100):
            conns += await asyncio.gather(*(connect(f"ws://127.0.0.1:{h.port}/",
                                                    compression=None, ping_interval=None)
                                            for _ in range(100)))

        async def echo(ws, i):
            await ws.send(f"m{i}")
            return await ws.recv() == f"m{i}"
        assert all(await asyncio.gather(*(echo(ws, i) for i, ws in enumerate(conns))))
        idle = await asyncio.to_thread(h.command, "mem")
        await asyncio.gather(*(ws.close() for ws in conns))
        return idle
    idle = run(go(), 90)
    assert idle["live"] == n
    per_tunnel = (idle["traced"] - before["traced"]) / n
    rss_per = (idle["rss"] - before["rss"]) / n
    print(f"\nidle tunnel memory: traced {per_tunnel:.0f} B/tunnel, rss {rss_per:.0f} B/tunnel")
    assert per_tunnel <= 4096
    for _ in range(n):
        h.next_close(30)
    assert h.command("count")["live"] == 0
