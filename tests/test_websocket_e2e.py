"""WebSocket tunnels end to end through a real mplb (SPEC section 4, issue #3 item 7).

Clients: websocket-client (sync), websockets (asyncio, permessage-deflate) and a raw
frame-level client (tests/harness.py RawWebSocket) that shows exactly which frames
arrive.  Backends: tests/backend_server.py (gevent-websocket echo) and tests/ws_server.py
(`websockets` asyncio echo with subprotocols, permessage-deflate, close/ping commands
and control-frame counts).

Transparency tests run the same message sequence directly against the backend and
through mplb and require identical results.
"""
import asyncio
import hashlib
import json
import os
import random
import re
import signal
import struct
import time
import uuid

import pytest
import websocket            # websocket-client
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.harness import (Backend, Mplb, RawWebSocket, WsBackend, free_port, get,
                           process_nofile_limit, raise_nofile_limit, wait_for)

pytestmark = pytest.mark.timeout(300)

BIG = 16 * 1024 * 1024
TOKEN_PREFIX = b"mplb"       # mplb's own pings start with this (workers/wsframes.py)


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    raise_nofile_limit()
    e = Env()
    e.ws = WsBackend(name="wsb")
    e.gw = Backend(name="gwb")
    e.counted = Backend(name="countb")
    e.port = free_port()
    config = f"""
worker_processes 2;
upstream wsup {{ server {e.ws.url} max_fails=0; }}
upstream gwup {{ server {e.gw.url} max_fails=0; }}
upstream countup {{ server {e.counted.url} max_fails=0; }}
server {{
    listen 127.0.0.1:{e.port};
    location /ws {{ proxy_pass wsup; }}
    location /gw {{ proxy_pass gwup; }}
    location /count/ {{ proxy_pass countup; }}
    location /ka/ {{ proxy_websocket_keepalive on interval=0.5s; proxy_pass wsup; }}
    location /idle/ {{ proxy_read_timeout 1s; proxy_pass wsup; }}
    location /kadead/ {{
        proxy_websocket_keepalive on interval=0.5s;
        proxy_read_timeout 2s;
        proxy_pass wsup;
    }}
    location = /status {{ mplb_status; }}
}}
"""
    e.lb = Mplb(config, workers=2, wait_ports=[e.port])
    try:
        yield e
    finally:
        e.lb.stop()
        for proc in (e.ws, e.gw, e.counted):
            proc.stop()


def run(coro):
    return asyncio.run(coro)


def digest(data):
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return hashlib.sha256(raw).hexdigest()


def describe(message):
    """A comparable summary of a received message (type, length, hash)."""
    return (type(message).__name__, len(message), digest(message))


async def backend_record(port, path_prefix, conn_id, timeout=20.0):
    """Ask tests/ws_server.py (on a fresh connection) how connection ``conn_id`` ended."""
    deadline = time.monotonic() + timeout
    async with connect(f"ws://127.0.0.1:{port}{path_prefix}", ping_interval=None) as ws:
        await ws.recv()                                    # welcome
        while True:
            await ws.send(f"cmd:closed {conn_id}")
            record = json.loads(await ws.recv())
            if record is not None:
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"backend never saw connection {conn_id} end")
            await asyncio.sleep(0.05)


# ---- transparency: websockets client <-> websockets server -------------------------------

async def websockets_sequence(port, prefix):
    """One fixed conversation; returns everything observable, minus per-run ids."""
    rng = random.Random(7)
    big_binary = rng.randbytes(BIG)
    big_text = "".join(rng.choice("abcdefghij ünï✓🚀") for _ in range(4096)) * (BIG // 4096 // 2)
    out = {}
    conn_id = uuid.uuid4().hex
    uri = f"ws://127.0.0.1:{port}{prefix}?id={conn_id}"
    async with connect(uri, subprotocols=["superchat", "chat"], compression="deflate",
                       max_size=None, ping_interval=None, open_timeout=30,
                       close_timeout=30) as ws:
        welcome = json.loads(await ws.recv())
        welcome.pop("path")
        out["welcome"] = welcome
        out["subprotocol"] = ws.subprotocol
        out["protocol_header"] = ws.response.headers.get("Sec-WebSocket-Protocol")
        out["extensions_header"] = ws.response.headers.get("Sec-WebSocket-Extensions")
        out["client_extensions"] = [ext.name for ext in ws.protocol.extensions]
        messages = ["hello", b"\x00\x01binary\xff\xfe", "", b"", "ünïcødé ✓ — 🚀 日本語",
                    "x" * 70000, bytes(range(256)) * 300, big_binary, big_text]
        echoes = []
        for message in messages:
            await ws.send(message)
            echo = await ws.recv()
            assert echo == message, f"echo differs for a {describe(message)}"
            echoes.append(describe(echo))
        out["echoes"] = echoes
        # Fragmented messages: the server echoes fragment by fragment.
        fragmented = []
        for fragments in (["frag-1 ", "frag-2 ✓ ", "", "frag-4"],
                          [b"\x01" * 10, b"\x02" * 100000, b"\x03"]):
            await ws.send(fragments)
            got = [frame async for frame in ws.recv_streaming()]
            fragmented.append([describe(part) for part in got])
            # websockets ends a fragmented send with an empty final frame; the echo
            # adds its own: the frame structure is compared direct vs through mplb.
            assert got[:len(fragments)] == fragments and not any(got[len(fragments):])
        out["fragmented"] = fragmented
        # The peers' own pings and pongs pass through.
        latency = await asyncio.wait_for(await ws.ping(b"client-ping"), 30)
        out["client_ping_answered"] = latency >= 0
        await ws.send("cmd:ping srv-ping-123")        # 12 bytes, like mplb's own pings
        out["server_ping"] = await ws.recv()
        await ws.send("cmd:stats")
        stats = json.loads(await ws.recv())
        out["backend_control_frames"] = {"pings": stats["pings"], "pongs": stats["pongs"]}
        # Client-initiated close: 4000 'bye' reaches the backend (and comes back).
        await ws.close(4000, "bye")
        out["client_close_echo"] = (ws.close_code, ws.close_reason)
    record = await backend_record(port, prefix, conn_id)
    out["backend_saw_close"] = (record["code"], record["reason"])
    # Server-initiated close: 4001 reaches the client.
    async with connect(f"ws://127.0.0.1:{port}{prefix}", ping_interval=None,
                       open_timeout=30) as ws:
        await ws.recv()
        await ws.send("cmd:close 4001 server-bye")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 30)
        out["server_close"] = (info.value.rcvd.code, info.value.rcvd.reason)
    return out


def direct_websockets_results(env):
    if not hasattr(env, "direct_websockets"):
        env.direct_websockets = run(websockets_sequence(env.ws.port, "/ws"))
    return env.direct_websockets


@pytest.mark.parametrize("prefix", ["/ws", "/ka/"], ids=["keepalive-off", "keepalive-on"])
def test_websockets_transparency_direct_vs_mplb(env, prefix):
    direct = direct_websockets_results(env)
    proxied = run(websockets_sequence(env.port, prefix))
    if prefix == "/ka/":
        # mplb pings a silent backend (0.5s) and swallows the Pong: the backend may count
        # extra pings, never extra pongs.
        assert proxied["backend_control_frames"]["pings"] >= 1
        proxied["backend_control_frames"]["pings"] = \
            direct["backend_control_frames"]["pings"]
    assert proxied == direct
    # And the direct results are the ones the protocol promises:
    assert direct["subprotocol"] == "chat" and direct["protocol_header"] == "chat"
    assert direct["welcome"]["subprotocol"] == "chat"
    assert "permessage-deflate" in direct["extensions_header"]
    assert direct["client_extensions"] == ["permessage-deflate"]
    assert direct["welcome"]["extensions"] == ["permessage-deflate"]
    assert direct["server_ping"] == "pong-ok srv-ping-123"
    assert direct["backend_control_frames"] == {"pings": 1, "pongs": 1}
    assert direct["client_close_echo"] == (4000, "bye")
    assert direct["backend_saw_close"] == (4000, "bye")
    assert direct["server_close"] == (4001, "server-bye")


def test_permessage_deflate_really_compresses_through_mplb(env):
    """The deflated bytes cross mplb unchanged: a 4 MiB compressible message costs
    only kilobytes of tunnel traffic (status bytes counters)."""
    def server():
        status = json.loads(get(env.port, "/status")[2])
        return status["upstreams"]["wsup"]["servers"][0]

    def settled_bytes(more_than=-1):
        """Byte counters once no tunnel to the server is open (bytes count at close)."""
        def check():
            state = server()
            total = state["bytes_in"] + state["bytes_out"]
            return (total,) if state["tunnels"] == 0 and total > more_than else None
        return wait_for(check, timeout=30, message="no open tunnels to wsup")[0]

    async def talk():
        async with connect(f"ws://127.0.0.1:{env.port}/ws", compression="deflate",
                           max_size=None, ping_interval=None) as ws:
            await ws.recv()
            message = "compress me " * (4 * 1024 * 1024 // 12)
            await ws.send(message)
            assert await ws.recv() == message
            return len(message)

    before = settled_bytes()
    size = run(talk())
    after = settled_bytes(more_than=before)
    assert 0 < after - before < size // 20, (after - before, size)


# ---- transparency: websocket-client <-> gevent-websocket ---------------------------------

def websocket_client_sequence(port, path):
    out = {}
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60)
    try:
        out["welcome"] = json.loads(ws.recv())
        rng = random.Random(11)
        messages = [("text", "hello"), ("binary", b"\x00\xffbin"), ("text", ""),
                    ("binary", b""), ("text", "ünïcødé ✓ 🚀"),
                    ("binary", rng.randbytes(200000)), ("text", "t" * 70000),
                    ("binary", rng.randbytes(BIG))]
        echoes = []
        for kind, message in messages:
            if kind == "text":
                ws.send(message)
            else:
                ws.send_binary(message)
            opcode, data = ws.recv_data()
            expected = message.encode() if kind == "text" else message
            assert data == expected
            echoes.append((opcode, len(data), digest(data)))
        out["echoes"] = echoes
        # A fragmented text message: first frame, continuation, final continuation.
        ws.send_frame(websocket.ABNF.create_frame("part-1 ", websocket.ABNF.OPCODE_TEXT, 0))
        ws.send_frame(websocket.ABNF.create_frame("part-2 ", websocket.ABNF.OPCODE_CONT, 0))
        ws.send_frame(websocket.ABNF.create_frame("part-3", websocket.ABNF.OPCODE_CONT, 1))
        out["fragmented"] = ws.recv_data()
        # The client's ping is answered by the backend through the tunnel.
        ws.ping(b"wsc-ping")
        frame = ws.recv_frame()
        out["pong"] = (frame.opcode, frame.data)
        ws.send_close(4000, b"bye")
        # gevent-websocket's Close reply is not valid for websocket-client's checks (it
        # echoes the reason without the code): read it raw, until the TCP close.
        raw = b""
        while True:
            chunk = ws.sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        out["close_reply"] = raw
    finally:
        ws.close()
    return out


def test_websocket_client_gevent_backend_transparency(env):
    direct = websocket_client_sequence(env.gw.port, "/gw")
    proxied = websocket_client_sequence(env.port, "/gw")
    assert proxied == direct
    assert direct["welcome"] == {"backend": "gwb", "type": "welcome"}
    assert direct["fragmented"] == (websocket.ABNF.OPCODE_TEXT, b"part-1 part-2 part-3")
    assert direct["pong"] == (websocket.ABNF.OPCODE_PONG, b"wsc-ping")
    assert direct["close_reply"][0] == 0x88             # FIN + Close


def test_websocket_client_to_websockets_backend(env):
    """Subprotocol chosen by the backend reaches a websocket-client client; close codes."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{env.port}/ws", timeout=30,
                                     subprotocols=["nope", "v2.proto"])
    try:
        assert ws.getsubprotocol() == "v2.proto"
        assert ws.getheaders()["sec-websocket-protocol"] == "v2.proto"
        assert json.loads(ws.recv())["subprotocol"] == "v2.proto"
        ws.send("cmd:close 4001 server-bye")
        frame = ws.recv_frame()
        assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
        assert frame.data == struct.pack(">H", 4001) + b"server-bye"
    finally:
        ws.close()


# ---- keepalive framing ------------------------------------------------------------------

def test_keepalive_pings_silent_client_and_swallows_pongs(env):
    conn_id = uuid.uuid4().hex
    with RawWebSocket(env.port, f"/ka/?id={conn_id}", timeout=20) as ws:
        assert ws.status == 101, ws.head
        assert json.loads(ws.recv_data())["type"] == "welcome"
        # Stay silent: mplb pings us (interval 0.5s); answer two of them.
        answered = []
        while len(answered) < 2:
            frame = ws.recv_frame(timeout=20)
            assert frame is not None, f"no ping from mplb (eof={ws.eof})"
            fin, opcode, payload = frame
            assert opcode == 0x9, f"unexpected frame {frame!r} (a swallowed pong leaked?)"
            assert payload.startswith(TOKEN_PREFIX) and len(payload) == 12, payload
            ws.send_frame(0xA, payload)
            answered.append(payload)
        assert answered[0] != answered[1]

        def next_non_mplb_frame():
            """Skip (and answer) mplb pings; never see a Pong we did not ask for."""
            while True:
                frame = ws.recv_frame(timeout=20)
                assert frame is not None, f"tunnel closed (eof={ws.eof})"
                if frame[1] == 0x9 and frame[2].startswith(TOKEN_PREFIX):
                    ws.send_frame(0xA, frame[2])
                    continue
                return frame

        # The client's own ping passes through and the backend's pong comes back.
        ws.send_frame(0x9, b"client-ping")
        assert next_non_mplb_frame() == (True, 0xA, b"client-ping")
        # The backend's own ping (12 bytes, same length as mplb's) reaches us; our pong
        # goes back to the backend.
        ws.send_text("cmd:ping srv-ping-123")
        assert next_non_mplb_frame() == (True, 0x9, b"srv-ping-123")
        ws.send_frame(0xA, b"srv-ping-123")
        assert next_non_mplb_frame() == (True, 0x1, b"pong-ok srv-ping-123")
        # The backend saw exactly the one pong it solicited: none of the pongs answering
        # mplb's pings (sent before this command) reached it.  (Its ping count holds the
        # client's ping plus mplb's own pings to the silent backend.)
        ws.send_text("cmd:stats")
        stats = json.loads(next_non_mplb_frame()[2])
        assert stats["pongs"] == 1 and stats["pings"] >= 1, stats
        ws.send_close(1000, "done")
        eof, frames = ws.wait_eof(timeout=20)
        closes = [f for f in frames if f[1] == 0x8]
        assert closes and closes[0][2][:2] == struct.pack(">H", 1000)
    record = run(backend_record(env.ws.port, "/ws", conn_id))
    assert (record["code"], record["pongs"]) == (1000, 1), record


def test_keepalive_silent_peers_stay_connected(env):
    """Pings keep an idle tunnel alive longer than the keepalive interval, and mplb's
    pongs from the backend never leak to the client."""
    with RawWebSocket(env.port, "/ka/", timeout=20) as ws:
        ws.recv_data()
        pings = 0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            frame = ws.recv_frame(timeout=10)
            assert frame is not None, "tunnel closed while pings were answered"
            assert frame[1] == 0x9 and frame[2].startswith(TOKEN_PREFIX), frame
            ws.send_frame(0xA, frame[2])
            pings += 1
        assert pings >= 2
        ws.send_text("still here")
        frame = ws.recv_frame(timeout=20)
        while frame is not None and frame[1] == 0x9:
            ws.send_frame(0xA, frame[2])
            frame = ws.recv_frame(timeout=20)
        assert frame == (True, 0x1, b"still here")


def test_keepalive_unanswered_pings_close_both_sides(env):
    """A client that answers no ping is dead after proxy_read_timeout: Close 1001 to both
    sides, even though the backend keeps answering mplb's pings."""
    conn_id = uuid.uuid4().hex
    with RawWebSocket(env.port, f"/kadead/?id={conn_id}", timeout=20) as ws:
        client_port = ws.sock.getsockname()[1]
        ws.recv_data()
        started = time.monotonic()
        eof, frames = ws.wait_eof(timeout=30)
        elapsed = time.monotonic() - started
    assert eof
    pings = [f for f in frames if f[1] == 0x9]
    closes = [f for f in frames if f[1] == 0x8]
    assert pings and all(f[2].startswith(TOKEN_PREFIX) for f in pings), frames
    assert closes and closes[0][2][:2] == struct.pack(">H", 1001), frames
    assert elapsed >= 1.5, elapsed
    record = run(backend_record(env.ws.port, "/ws", conn_id))
    assert record["code"] == 1001 and record["pongs"] == 0, record
    wait_for(lambda: re.search(rf"tunnel client=127\.0\.0\.1:{client_port} "
                               rf"server=\S+ closed: keepalive timeout", env.lb.output()),
             message="the -v log line naming the keepalive timeout")


@pytest.mark.parametrize("prefix", ["/ws", "/ka/"], ids=["keepalive-off", "keepalive-on"])
def test_frames_in_the_upgrade_request_packet(env, prefix):
    """Frames sent right behind the request head (same write) reach the backend."""
    early = RawWebSocket.frame(0x1, b"early one") + RawWebSocket.frame(0x2, b"\x00early two")
    with RawWebSocket(env.port, prefix, timeout=20, early=early) as ws:
        assert ws.status == 101
        assert json.loads(ws.recv_data())["type"] == "welcome"
        assert ws.recv_data() == b"early one"
        assert ws.recv_data() == b"\x00early two"


# ---- timeouts and failures ----------------------------------------------------------------

def test_read_timeout_closes_idle_tunnel(env):
    conn_id = uuid.uuid4().hex
    with RawWebSocket(env.port, f"/idle/?id={conn_id}", timeout=20) as ws:
        client_port = ws.sock.getsockname()[1]
        ws.recv_data()
        started = time.monotonic()
        eof, frames = ws.wait_eof(timeout=20)
        elapsed = time.monotonic() - started
    assert eof, "the idle tunnel was not closed"
    assert frames == []                       # keepalive off: a TCP close, no frames
    assert elapsed >= 0.8, elapsed
    record = run(backend_record(env.ws.port, "/ws", conn_id))
    assert record["code"] is None, record     # the backend side was closed too (no Close)
    wait_for(lambda: re.search(rf"tunnel client=127\.0\.0\.1:{client_port} "
                               rf"server=127\.0\.0\.1:{env.ws.port} closed: timeout",
                               env.lb.output()),
             message="the -v log line naming the timeout")


def test_upgrade_log_line(env):
    ws = websocket.create_connection(f"ws://127.0.0.1:{env.port}/ws", timeout=30)
    try:
        client_port = ws.sock.getsockname()[1]
        ws.recv()
    finally:
        ws.close()
    pattern = (rf"upgrade GET /ws client=127\.0\.0\.1:{client_port} upstream=wsup "
               rf"server=127\.0\.0\.1:{env.ws.port} persistence=none")
    wait_for(lambda: re.search(pattern, env.lb.output()), message="the upgrade log line")
    assert re.search(r"upgrade GET /ws client=127\.0\.0\.1:\d+ upstream=wsup "
                     r"server=127\.0\.0\.1:\d+ persistence=none", env.lb.output())


def test_tunnel_counts_as_active_connection(env):
    def counters():
        status = json.loads(get(env.port, "/status")[2])
        server = status["upstreams"]["countup"]["servers"][0]
        return server["tunnels"], server["active"]

    assert counters() == (0, 0)
    clients = []
    try:
        for _ in range(3):
            ws = websocket.create_connection(f"ws://127.0.0.1:{env.port}/count/", timeout=30)
            ws.recv()
            clients.append(ws)
        wait_for(lambda: counters() == (3, 3), timeout=20,
                 message="tunnels: 3 and active: 3 in the status")
        ws = clients.pop()
        ws.close()
        wait_for(lambda: counters() == (2, 2), timeout=20, message="2 tunnels after a close")
    finally:
        for ws in clients:
            ws.close()
    wait_for(lambda: counters() == (0, 0), timeout=20, message="no tunnels after closing")


@pytest.mark.parametrize("keepalive", [True, False], ids=["keepalive-on", "keepalive-off"])
def test_backend_killed_closes_client(keepalive):
    backend = Backend(name="victim")
    port = free_port()
    ka = "proxy_websocket_keepalive on interval=0.5s;" if keepalive else ""
    lb = Mplb(f"""
upstream victim {{ server {backend.url}; }}
server {{
    listen 127.0.0.1:{port};
    {ka}
    location / {{ proxy_pass victim; }}
}}
""", workers=1, wait_ports=[port])
    try:
        with RawWebSocket(port, "/ws", timeout=20) as ws:
            assert json.loads(ws.recv_data())["backend"] == "victim"
            os.killpg(backend.pid, signal.SIGKILL)
            eof, frames = ws.wait_eof(timeout=20)
            assert eof, "client side not closed after the backend died"
            closes = [f for f in frames if f[1] == 0x8]
            data = [f for f in frames if f[1] not in (0x8, 0x9)]
            assert data == []
            if keepalive:
                assert closes and closes[0][2][:2] == struct.pack(">H", 1001), frames
            else:
                assert frames == []               # a bare TCP close
        assert lb.alive()
    finally:
        lb.stop()
        backend.stop()


# ---- 1,000 concurrent tunnels -----------------------------------------------------------

def test_thousand_concurrent_tunnels():
    count = 1000
    limit = raise_nofile_limit()
    if limit < 3 * count + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {limit} too low for {count} tunnels")
    backend = WsBackend(name="many")
    port = free_port()
    lb = Mplb(f"""
upstream many {{ server {backend.url} max_fails=0; }}
server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ proxy_pass many; }}
    location = /status {{ mplb_status; }}
}}
""", workers=2, wait_ports=[port])
    try:
        # The processes inherit this process's (raised) open-files limit.
        for pid in lb.worker_pids() + [backend.pid]:
            assert process_nofile_limit(pid) >= limit, pid

        def tunnels():
            status = json.loads(get(port, "/status")[2])
            return status["upstreams"]["many"]["servers"][0]["tunnels"]

        async def main():
            connecting = asyncio.Semaphore(50)
            opened = 0
            all_open = asyncio.Event()
            checked = asyncio.Event()      # the status was read while all were open

            async def one(number):
                nonlocal opened
                async with connecting:
                    ws = await connect(f"ws://127.0.0.1:{port}/t/{number}", compression=None,
                                       ping_interval=None, open_timeout=120,
                                       close_timeout=60)
                    try:
                        welcome = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    except BaseException:
                        await ws.close()
                        raise
                try:
                    assert welcome["path"] == f"/t/{number}"
                    opened += 1
                    if opened == count:
                        all_open.set()
                    await asyncio.wait_for(all_open.wait(), 240)
                    message = f"unique message {number} {uuid.uuid4().hex}"
                    await ws.send(message)
                    assert await asyncio.wait_for(ws.recv(), 120) == message
                    # A binary message as well, different for every tunnel.
                    payload = number.to_bytes(4, "big") * 64
                    await ws.send(payload)
                    assert await asyncio.wait_for(ws.recv(), 120) == payload
                    await asyncio.wait_for(checked.wait(), 240)
                    return True
                finally:
                    await ws.close()

            async def watch():
                try:
                    await asyncio.wait_for(all_open.wait(), 240)
                    return await asyncio.to_thread(tunnels)
                finally:
                    checked.set()

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(one(n) for n in range(count)))
            return results, await watcher

        results, open_tunnels = run(main())
        assert results == [True] * count
        assert open_tunnels == count
        wait_for(lambda: tunnels() == 0, timeout=60, message="all tunnels closed")
        assert len(lb.worker_pids()) == 2 and lb.alive()
    finally:
        lb.stop()
        backend.stop()
