"""End-to-end HTTP behaviour of a real mplb (SPEC sections 3.4 and 5) with real backends.

One mplb (two workers) and its backends serve the whole module; each test talks raw
HTTP (or http.client) to it and checks what the client and the backend saw.
"""
import json
import socket
import time

import pytest

from tests.harness import (Backend, Mplb, RawConnection, free_port, get, parse_responses,
                           raw_exchange, wait_for)
from tests.patterns import pattern


class Env:
    pass


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.b1 = Backend(name="b1")
    e.b2 = Backend(name="b2")
    e.dead = free_port()
    e.port = free_port()
    config = f"""
worker_processes 2;
upstream main {{ server {e.b1.url} max_fails=0; keepalive 8; }}
upstream second {{ server {e.b2.url} max_fails=0; }}
upstream refused {{ server 127.0.0.1:{e.dead}; }}
upstream failover {{
    server 127.0.0.1:{e.dead} max_fails=0;
    server {e.b2.url} max_fails=0;
}}
server {{
    listen 127.0.0.1:{e.port};
    server_name default.test;
    location / {{ proxy_pass main; }}
    location /big-upload/ {{ client_max_body_size 0; proxy_pass main; }}
    location /slow/ {{ proxy_read_timeout 1s; proxy_pass main; }}
    location /refused/ {{ proxy_pass refused; }}
    location /failover/ {{ proxy_pass failover; }}
    location /ka/ {{ keepalive_requests 3; proxy_pass main; }}
    location = /ret {{ return 200 "hello text"; }}
    location = /moved {{ return 301 http://example.com/new; }}
    location = /found {{ return 302 /elsewhere; }}
    location /private/ {{ deny 127.0.0.1; allow all; proxy_pass main; }}
    location /allowed/ {{ allow 127.0.0.0/8; deny all; proxy_pass main; }}
    location = /exact {{ return 200 "exact"; }}
    location /prefix/ {{ return 200 "prefix"; }}
    location /prefix/long/ {{ return 200 "prefix-long"; }}
    location ^~ /stop/ {{ return 200 "stop"; }}
    location ~ \\.php$ {{ return 200 "regex-php"; }}
    location ~ /prefix/.*\\.(php|txt)$ {{ return 200 "regex-second"; }}
    location ~* \\.JPG$ {{ return 200 "regex-jpg"; }}
    location = /mplb_status {{ mplb_status; }}
    location /hdr/ {{
        proxy_pass second;
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Custom "v-$http_x_foo";
        proxy_set_header X-Forwarded-Proto "";
        proxy_set_header X-Scheme $scheme;
        proxy_set_header X-Req "$request_method $request_uri $uri $args";
    }}
}}
server {{
    listen 127.0.0.1:{e.port};
    server_name alpha.test;
    location / {{ return 200 "alpha"; }}
}}
server {{
    listen 127.0.0.1:{e.port};
    server_name *.wild.test;
    location / {{ return 200 "wild"; }}
}}
server {{
    listen 127.0.0.1:{e.port};
    server_name www.*;
    location / {{ return 200 "www-any"; }}
}}
"""
    e.mplb = Mplb(config, workers=2, wait_ports=[e.port])
    e.pids = sorted(e.mplb.worker_pids())
    yield e
    try:
        output = e.mplb.output()
        assert "Traceback" not in output, output[-4000:]
        assert sorted(e.mplb.worker_pids()) == e.pids
    finally:
        e.mplb.stop()
        e.b1.stop()
        e.b2.stop()


def request(env, raw, **kw):
    """Send one raw request that ends the connection; return the parsed responses."""
    data, closed = raw_exchange(env.port, raw, **kw)
    assert closed
    return parse_responses(data)


def one(env, path, host="default.test", method="GET", headers=()):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    responses = request(env, raw)
    assert len(responses) == 1
    return responses[0]


def echo(env, path="/", **kw):
    response = one(env, path, **kw)
    assert response.status == 200, response
    return json.loads(response.body)


# -- methods and bodies -------------------------------------------------------------
def test_get(env):
    data = echo(env, "/some/path?a=1")
    assert data["backend"] == "b1"
    assert data["method"] == "GET" and data["path"] == "/some/path" and data["query"] == "a=1"


def test_head_has_no_body_and_connection_stays_usable(env):
    with RawConnection(env.port) as conn:
        conn.send(b"HEAD /size/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response(head_only=True)
        assert response.status == 200
        assert response.header("content-length") == "1000"
        conn.send(b"GET /size/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200 and response.body == b"x" * 10


def test_post_content_length(env):
    body = bytes(range(256)) * 400
    raw = (b"POST /echo-body HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
    [response] = request(env, raw)
    assert response.status == 200 and response.body == body


def test_post_chunked(env):
    parts = [b"a" * 10, b"b" * 5000, b"c" * 70000, b"d"]
    raw = b"POST /echo-body HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" \
          b"Transfer-Encoding: chunked\r\n\r\n"
    raw += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    [response] = request(env, raw)
    assert response.status == 200 and response.body == b"".join(parts)


def _rss(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_large_upload_is_streamed(env):
    """20 MB through a location with client_max_body_size 0; workers do not buffer it."""
    size = 20 * 1024 * 1024
    before = sum(_rss(pid) for pid in env.pids)
    with socket.create_connection(("127.0.0.1", env.port), timeout=30) as sock:
        sock.sendall(b"POST /big-upload/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            sock.sendall(block)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    [response] = parse_responses(data)
    assert response.status == 200
    assert json.loads(response.body)["body_len"] == size
    growth = sum(_rss(pid) for pid in env.pids) - before
    assert growth < size // 2, f"worker RSS grew by {growth} bytes"


def test_body_over_default_limit_is_413(env):
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * 1024 * 1024)
    data, closed = raw_exchange(env.port, raw + b"a" * 1000)
    assert closed
    assert parse_responses(data)[0].status == 413


def test_expect_100_continue(env):
    with RawConnection(env.port) as conn:
        conn.send(b"POST /echo-body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5\r\n\r\n")
        interim = conn.read_response()
        assert interim.status == 100
        conn.send(b"hello")
        response = conn.read_response()
        assert response.status == 200 and response.body == b"hello"


def test_expect_100_continue_too_large_gets_413_without_100(env):
    with RawConnection(env.port) as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5000000\r\n\r\n")
        response = conn.read_response()
        assert response.status == 413


# -- connections ----------------------------------------------------------------------
def test_keep_alive_reuses_client_and_upstream_connections(env):
    with RawConnection(env.port) as conn:
        ports = []
        for _ in range(3):
            conn.send(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
            response = conn.read_response()
            assert response.status == 200
            assert response.header("connection") == "keep-alive"
            ports.append(json.loads(response.body)["peer_port"])
        assert len(set(ports)) == 1, ports


def test_http10_client_without_keep_alive(env):
    data, closed = raw_exchange(env.port, b"GET /chunked/5000 HTTP/1.0\r\n\r\n")
    assert closed
    [response] = parse_responses(data)
    assert response.status == 200
    assert response.header("transfer-encoding") is None
    assert response.body == b"y" * 5000
    assert response.header("connection") in (None, "close")


def test_http10_client_with_keep_alive(env):
    with RawConnection(env.port) as conn:
        conn.send(b"GET /size/20 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200 and response.body == b"x" * 20
        assert response.header("connection").lower() == "keep-alive"
        conn.send(b"GET /ret HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert response.body == b"hello text"
        assert conn.wait_closed()


def test_pipelining_answers_in_order(env):
    raw = (b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /ret HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
           b"GET /third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    responses = request(env, raw)
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert json.loads(responses[0].body)["path"] == "/first"
    assert responses[1].body == b"hello text"
    assert responses[2].body == b"abc"
    assert json.loads(responses[3].body)["path"] == "/third"


def test_deep_pipelining_with_large_heads(env):
    """Hundreds of pipelined requests with 2 KB heads: no false 414/431 across recvs."""
    filler = "v" * 2000
    raw = b"".join(b"GET /ret HTTP/1.1\r\nHost: x\r\nX-Fill-%d: %s\r\n\r\n"
                   % (n, filler.encode()) for n in range(150))
    raw += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = request(env, raw, timeout=30)
    assert [r.status for r in responses] == [200] * 151
    assert all(r.body == b"hello text" for r in responses[:150])
    assert json.loads(responses[150].body)["path"] == "/last"


def test_keepalive_requests_limit(env):
    with RawConnection(env.port) as conn:
        for n in range(1, 4):
            conn.send(b"GET /ka/%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
            response = conn.read_response()
            assert response.status == 200
            expected = "close" if n == 3 else "keep-alive"
            assert response.header("connection") == expected, (n, response)
        assert conn.wait_closed()


# -- responses ------------------------------------------------------------------------
def test_chunked_response_is_rechunked(env):
    response = one(env, "/chunked/5500")
    assert response.status == 200
    assert response.chunked
    assert response.body == b"y" * 5500


def test_one_mib_response_intact(env):
    response = one(env, "/size/1048576")
    assert response.status == 200
    assert response.header("content-length") == "1048576"
    assert response.body == b"x" * 1048576


def test_large_bodies_spliced_intact_and_connection_reused(env):
    """Bodies above the splice threshold arrive whole and in order, twice on one
    keep-alive connection, and the connection serves a small request afterwards."""
    size = 3 * 1024 * 1024 + 5
    raw = (b"GET /pattern/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size) * 2 + \
        b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data, closed = raw_exchange(env.port, raw)
    first, second, third = parse_responses(data)
    for response in (first, second):
        assert response.status == 200
        assert response.body == pattern(size)
    assert third.status == 200 and json.loads(third.body)["path"] == "/small"


def test_backend_truncation_of_a_spliced_body_closes_client(env):
    data, closed = raw_exchange(env.port, b"GET /truncate-big HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed, "client connection left open after a truncated response"
    [response] = parse_responses(data, allow_partial=True)
    assert response.header("content-length") == "4194304"
    assert len(response.body) < 4194304
    assert response.body == pattern(len(response.body))     # what came is intact


def test_backend_truncation_closes_client(env):
    data, closed = raw_exchange(env.port, b"GET /truncate HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed, "client connection left open after a truncated response"
    [response] = parse_responses(data, allow_partial=True)
    assert response.status == 200
    assert response.header("content-length") == "1000"
    assert len(response.body) < 1000


def test_garbage_response_is_502(env):
    response = one(env, "/garbage")
    assert response.status == 502 and b"502" in response.body


def test_backend_101_to_plain_request_is_502_and_not_reused(env):
    response = one(env, "/fake-101")
    assert response.status == 502
    for _ in range(3):
        assert echo(env, "/after-fake-101")["path"] == "/after-fake-101"


def test_refused_backend_is_502(env):
    response = one(env, "/refused/x")
    assert response.status == 502 and b"502" in response.body


def test_slow_backend_is_504(env):
    started = time.monotonic()
    response = one(env, "/slow/3")
    assert response.status == 504 and b"504" in response.body
    assert time.monotonic() - started < 2.9


def test_next_upstream_after_refused_server(env):
    for _ in range(6):
        assert echo(env, "/failover/x")["backend"] == "b2"


def test_return_text_and_redirects(env):
    response = one(env, "/ret")
    assert response.status == 200 and response.body == b"hello text"
    response = one(env, "/moved")
    assert response.status == 301 and response.header("location") == "http://example.com/new"
    response = one(env, "/found")
    assert response.status == 302 and response.header("location") == "/elsewhere"


def test_access_rules(env):
    response = one(env, "/private/x")
    assert response.status == 403 and b"403" in response.body
    assert echo(env, "/allowed/x")["path"] == "/allowed/x"


@pytest.mark.parametrize("path,expected", [
    ("/exact", "exact"),
    ("/exact/more", None),                 # not the exact location: falls to / (backend)
    ("/prefix/a", "prefix"),
    ("/prefix/long/a", "prefix-long"),
    ("/prefix/a.php", "regex-php"),        # regex beats a plain prefix
    ("/prefix/long/a.php", "regex-php"),   # first regex in file order wins
    ("/prefix/a.txt", "regex-second"),
    ("/stop/a.php", "stop"),               # ^~ stops the regex search
    ("/img/PHOTO.jpg", "regex-jpg"),       # ~* is case-insensitive
    ("/img/photo.JpG", "regex-jpg"),
    ("/a/../prefix/x", "prefix"),          # normalised before matching
    ("/prefix%2Fx", "prefix"),             # decoded before matching
])
def test_location_precedence(env, path, expected):
    response = one(env, path)
    assert response.status == 200
    if expected is None:
        assert json.loads(response.body)["backend"] == "b1"
    else:
        assert response.body == expected.encode()


@pytest.mark.parametrize("host,expected", [
    ("alpha.test", "alpha"),
    ("ALPHA.test:8080", "alpha"),
    ("x.wild.test", "wild"),
    ("a.b.wild.test", "wild"),
    ("www.example.org", "www-any"),
    ("unknown.test", None),                 # the first block is the default
    ("wild.test", None),
])
def test_virtual_hosts(env, host, expected):
    response = one(env, "/anything", host=host)
    assert response.status == 200
    if expected is None:
        assert json.loads(response.body)["backend"] == "b1"
    else:
        assert response.body == expected.encode()


# -- headers -------------------------------------------------------------------------
def test_default_forwarded_headers(env):
    data = echo(env, "/fwd", host="Example.COM:1234", headers=["X-Forwarded-For: 10.0.0.1"])
    headers = data["headers"]
    assert headers["host"] == "Example.COM:1234"        # the client's Host, as sent
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-real-ip"] == "127.0.0.1"


def test_proxy_set_header_variables_and_removal(env):
    data = echo(env, "/hdr/a/../b?q=1", host="Foo.Example:8080",
                headers=["X-Foo: bar", "X-Forwarded-Proto: https"])
    headers = data["headers"]
    assert data["backend"] == "b2"
    assert headers["host"] == "foo.example"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-custom"] == "v-bar"
    assert headers["x-scheme"] == "http"
    assert headers["x-req"] == "GET /hdr/a/../b?q=1 /hdr/b q=1"
    assert "x-forwarded-proto" not in headers          # removed by an empty value
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_hop_by_hop_request_headers_are_stripped(env):
    data = echo(env, "/hop-req", headers=[
        "Connection: keep-alive, X-Hop", "X-Hop: secret", "Keep-Alive: timeout=5",
        "TE: trailers", "Proxy-Connection: keep-alive", "Upgrade: h2c", "Trailer: X-T",
        "X-End-To-End: kept"])
    headers = data["headers"]
    for name in ("x-hop", "keep-alive", "te", "proxy-connection", "upgrade", "trailer"):
        assert name not in headers, name
    assert headers["x-end-to-end"] == "kept"
    assert headers.get("connection", "keep-alive").lower() == "keep-alive"


def test_hop_by_hop_response_headers_are_stripped(env):
    response = one(env, "/hop")
    assert response.status == 200 and response.body == b"ok"
    names = {name for name, _ in response.headers}
    for name in ("x-secret", "keep-alive", "proxy-connection", "trailer", "upgrade", "te"):
        assert name not in names, name
    assert response.header("x-kept") == "yes"
    assert response.header("connection") == "close"


# -- statistics, upgrades -------------------------------------------------------------
def test_status_json(env):
    status, headers, body = get(env.port, "/mplb_status", {"Host": "default.test"})
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    data = json.loads(body)
    assert data["pid"] == env.mplb.pid
    assert sorted(w["pid"] for w in data["workers"]) == env.pids
    servers = data["upstreams"]["main"]["servers"]
    assert servers[0]["url"] == env.b1.url
    assert servers[0]["requests"] >= 1


def test_websocket_upgrade_through_mplb(env):
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{env.port}/ws", timeout=10)
    try:
        welcome = json.loads(ws.recv())
        assert welcome == {"backend": "b1", "type": "welcome"}
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send_binary(b"\x00\x01")
        assert ws.recv() == b"\x00\x01"
    finally:
        ws.close()


def test_upgrade_to_local_location_is_answered_and_closed(env):
    data, closed = raw_exchange(env.port, b"GET /ret HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                          b"Connection: Upgrade\r\n\r\n")
    assert closed
    [response] = parse_responses(data)
    assert response.status == 200 and response.body == b"hello text"


UPGRADE_HEADERS = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize("body_head, body", [
    (b"Content-Length: 3\r\n", b"abc"),
    (b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
], ids=["content-length", "chunked"])
def test_post_with_upgrade_headers_is_plain_http(env, body_head, body):
    """SPEC 4: not GET, so not an upgrade: the body goes upstream, Upgrade does not, and
    the pipelined request after it is answered on the same connection."""
    with RawConnection(env.port, timeout=5) as conn:
        conn.send(b"POST /x HTTP/1.1\r\nHost: x\r\n" + UPGRADE_HEADERS + body_head + b"\r\n"
                  + body + b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        first = json.loads(conn.read_response().body)
        second = json.loads(conn.read_response().body)
    assert first["method"] == "POST" and first["path"] == "/x"
    assert first["body_len"] == 3
    assert "upgrade" not in first["headers"]
    assert second["path"] == "/after"


def test_post_with_upgrade_headers_body_in_later_packets(env):
    with RawConnection(env.port, timeout=5) as conn:
        conn.send(b"POST /x HTTP/1.1\r\nHost: x\r\n" + UPGRADE_HEADERS
                  + b"Content-Length: 10\r\n\r\n01234")
        time.sleep(0.05)              # a second packet: the body's end arrives separately
        conn.send(b"56789")
        assert json.loads(conn.read_response().body)["body_len"] == 10
        conn.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert json.loads(conn.read_response().body)["path"] == "/next"


def test_http10_request_with_upgrade_headers_is_plain_http(env):
    data, closed = raw_exchange(env.port, b"GET /old HTTP/1.0\r\nHost: x\r\n"
                                          + UPGRADE_HEADERS + b"\r\n", timeout=5)
    assert closed
    [response] = parse_responses(data)
    assert response.status == 200
    seen = json.loads(response.body)
    assert seen["path"] == "/old" and "upgrade" not in seen["headers"]


def test_request_pipelined_before_an_upgrade_is_answered_first(env):
    from tests.harness import RawWebSocket
    ws = RawWebSocket(env.port, path="/ws", timeout=5)
    ws.close()
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    with RawConnection(env.port, timeout=5) as conn:
        conn.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE_HEADERS + key + b"\r\n")
        assert json.loads(conn.read_response().body)["path"] == "/first"
        assert conn.read_response().status == 101


def test_connect_is_refused_and_closed(env):
    data, closed = raw_exchange(env.port, b"CONNECT example.com:443 HTTP/1.1\r\n"
                                          b"Host: example.com:443\r\n\r\n", timeout=5)
    assert closed
    assert parse_responses(data)[0].status == 405


def test_workers_unchanged(env):
    wait_for(lambda: sorted(env.mplb.worker_pids()) == env.pids, timeout=5)
