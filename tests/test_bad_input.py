"""Hostile and malformed requests against a real mplb (SPEC section 5).

Every case is sent raw over its own socket and must get the status the spec names
(or, where the spec allows it, a clean close), a short text body naming that status,
and the connection closed.  Afterwards a normal request is still served and the
worker processes are the same ones as at the start: nothing crashed.
"""
import socket
import time

import pytest

from tests.harness import Stack, parse_responses, raw_exchange, wait_for

CLOSE = "close"       # the connection may simply be closed without a response


@pytest.fixture(scope="module")
def lb():
    stack = Stack("""
worker_processes 2;
upstream app {{ server {b1} max_fails=0; }}
server {{
    listen 127.0.0.1:{port};
    client_header_timeout 1s;
    client_body_timeout 2s;
    client_max_body_size 1k;
    location / {{ proxy_pass app; }}
}}
""", backends=("bad-input",))
    mplb = stack.mplb
    mplb.initial_pids = sorted(mplb.worker_pids())
    assert len(mplb.initial_pids) == 2
    yield mplb
    stack.stop()


OK = b"GET / HTTP/1.1\r\nHost: test\r\n"
END = b"\r\n"


def head(*lines, request_line=b"GET / HTTP/1.1"):
    return request_line + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


TLS_CLIENT_HELLO = bytes.fromhex(
    "16030100a5010000a10303" + "00" * 32 + "000020c02bc02fc02cc030cca9cca8c009c013c00a"
    "c014009c009d002f0035c012000a0100005800000014001200000f7777772e6578616d706c652e"
    "636f6d000500050100000000000a00080006001d00170018000b00020100000d00120010040104"
    "0305010503060106030201020300120000ff01000100")

CASES = [
    # -- request line ---------------------------------------------------------
    ("garbage request line", b"GARBAGE\r\n\r\n", (400,)),
    ("missing version", b"GET /\r\nHost: x\r\n\r\n", (400,)),
    ("bad version", b"GET / HTTP/1.x\r\nHost: x\r\n\r\n", (400,)),
    ("unsupported major version", b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", (400, 505)),
    ("lower-case method", b"get / HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("bare CR in request line", b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("NUL in request line", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("space inside target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("huge request line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (414,)),
    ("huge request line, never ends", b"GET /" + b"a" * 40000, (414,)),
    ("non-HTTP bytes", bytes(range(256)) * 4, (400,)),
    ("TLS ClientHello on plain port", TLS_CLIENT_HELLO, (400, CLOSE)),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
     (400, 505)),
    ("path traversal above root", b"GET /../x HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("encoded path traversal", b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
     (400,)),
    ("invalid percent-encoding", b"GET /a%zzb HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("truncated percent-encoding", b"GET /a%4 HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("percent-encoded invalid UTF-8", b"GET /a%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    ("percent-encoded NUL", b"GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    # -- header lines -------------------------------------------------------
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n", (400,)),
    ("duplicate Host", head(b"Host: a", b"Host: b"), (400,)),
    ("space in header name", head(b"Host: x", b"Bad Name: v"), (400,)),
    ("non-token char in header name", head(b"Host: x", b"Bad@Name: v"), (400,)),
    ("empty header name", head(b"Host: x", b": v"), (400,)),
    ("space before colon", head(b"Host : x"), (400,)),
    ("tab before colon", head(b"Host: x", b"X-A\t: v"), (400,)),
    ("header without colon", head(b"Host: x", b"NoColonHere"), (400,)),
    ("bare CR in header value", head(b"Host: x", b"X-A: a\rb"), (400,)),
    ("bare CR line ending", b"GET / HTTP/1.1\rHost: x\r\r", (400, CLOSE)),
    ("NUL in header value", head(b"Host: x", b"X-A: a\x00b"), (400,)),
    ("NUL in header name", head(b"Host: x", b"X-\x00A: v"), (400,)),
    ("obs-fold", head(b"Host: x", b"X-A: a", b"  folded"), (400,)),
    ("obs-fold on first header", head(b" Host: x"), (400,)),
    ("huge header line", head(b"Host: x", b"X-Big: " + b"b" * 9000), (431,)),
    ("huge header line, never ends", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40000,
     (431,)),
    ("1000 headers", head(b"Host: x", *[b"X-H%d: v" % i for i in range(1000)]), (431,)),
    ("headers beyond 4 x 8k", head(b"Host: x", *[b"X-H%d: %s" % (i, b"v" * 4000)
                                                 for i in range(10)]), (431,)),
    ("unsupported expectation", head(b"Host: x", b"Expect: teapot"), (417,)),
    # -- framing / smuggling -------------------------------------------------
    ("CL and TE", head(b"Host: x", b"Content-Length: 5", b"Transfer-Encoding: chunked")
     + b"0\r\n\r\n", (400,)),
    ("TE and CL", head(b"Host: x", b"Transfer-Encoding: chunked", b"Content-Length: 5")
     + b"0\r\n\r\n", (400,)),
    ("differing duplicate CL", head(b"Host: x", b"Content-Length: 3", b"Content-Length: 5")
     + b"abcde", (400,)),
    ("identical duplicate CL", head(b"Host: x", b"Content-Length: 3", b"Content-Length: 3")
     + b"abc", (400,)),
    ("CL list", head(b"Host: x", b"Content-Length: 3, 3") + b"abc", (400,)),
    ("negative CL", head(b"Host: x", b"Content-Length: -1"), (400,)),
    ("non-numeric CL", head(b"Host: x", b"Content-Length: abc"), (400,)),
    ("absurd CL", head(b"Host: x", b"Content-Length: 99999999999999999999"), (400, 413)),
    ("unknown transfer coding", head(b"Host: x", b"Transfer-Encoding: gzip") + b"abc", (400,)),
    ("gzip, chunked", head(b"Host: x", b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
     (400,)),
    ("chunked twice", head(b"Host: x", b"Transfer-Encoding: chunked",
                           b"Transfer-Encoding: chunked") + b"0\r\n\r\n", (400,)),
    ("obfuscated TE", head(b"Host: x", b"Transfer-Encoding: xchunked") + b"0\r\n\r\n", (400,)),
    ("TE on HTTP/1.0", head(b"Host: x", b"Transfer-Encoding: chunked",
                            request_line=b"POST / HTTP/1.0") + b"0\r\n\r\n", (400,)),
    ("bad chunk size", head(b"Host: x", b"Transfer-Encoding: chunked",
                            request_line=b"POST / HTTP/1.1") + b"zz\r\nabc\r\n0\r\n\r\n", (400,)),
    ("negative chunk size", head(b"Host: x", b"Transfer-Encoding: chunked",
                                 request_line=b"POST / HTTP/1.1") + b"-3\r\nabc\r\n0\r\n\r\n",
     (400,)),
    ("overflowing chunk size", head(b"Host: x", b"Transfer-Encoding: chunked",
                                    request_line=b"POST / HTTP/1.1")
     + b"fffffffffffffffffffff\r\nabc\r\n", (400, 413)),
    ("chunk without CRLF after data", head(b"Host: x", b"Transfer-Encoding: chunked",
                                           request_line=b"POST / HTTP/1.1")
     + b"3\r\nabcXX0\r\n\r\n", (400,)),
    ("body too large, Content-Length", head(b"Host: x", b"Content-Length: 5000",
                                            request_line=b"POST / HTTP/1.1") + b"a" * 5000,
     (413,)),
    ("body too large, chunked", head(b"Host: x", b"Transfer-Encoding: chunked",
                                     request_line=b"POST / HTTP/1.1")
     + b"800\r\n" + b"a" * 0x800 + b"\r\n" + b"800\r\n" + b"a" * 0x800 + b"\r\n0\r\n\r\n",
     (413,)),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
     (400, 405)),
]


def check_still_serving(lb):
    """A normal request is served, by the same worker processes as at the start."""
    data, _ = raw_exchange(lb.port, b"GET /ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                           timeout=15)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200], data[:300]
    assert sorted(lb.worker_pids()) == lb.initial_pids
    output = lb.output()
    assert "Traceback" not in output and "unexpected error" not in output, output[-3000:]


@pytest.mark.parametrize("name,raw,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input(lb, name, raw, expected):
    started = time.monotonic()
    data, closed = raw_exchange(lb.port, raw, timeout=10)
    assert closed, f"connection left open after {data[:200]!r}"
    assert time.monotonic() - started < 8
    if not data:
        assert CLOSE in expected, "closed without a response"
    else:
        responses = parse_responses(data)
        assert len(responses) == 1, responses
        response = responses[0]
        assert response.status in expected, response
        assert response.header("connection") == "close"
        assert response.header("content-type").startswith("text/plain")
        assert str(response.status).encode() in response.body
        assert len(response.body) < 200
    check_still_serving(lb)


def test_pipelined_good_request_before_bad_one_is_answered(lb):
    raw = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nBad Name: v\r\n\r\n"
    data, closed = raw_exchange(lb.port, raw)
    assert closed
    statuses = [r.status for r in parse_responses(data)]
    assert statuses == [200, 400]
    check_still_serving(lb)


def test_half_open_connection_is_closed(lb):
    """The client shuts its sending side after a partial head: closed, no crash."""
    started = time.monotonic()
    data, closed = raw_exchange(lb.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Partial",
                                timeout=10, shutdown_write=True)
    assert closed
    assert time.monotonic() - started < 5
    if data:
        assert parse_responses(data)[0].status == 400
    check_still_serving(lb)


def test_half_open_after_complete_request_still_gets_the_response(lb):
    data, closed = raw_exchange(lb.port, b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n",
                                timeout=10, shutdown_write=True)
    assert closed
    assert [r.status for r in parse_responses(data)] == [200]
    check_still_serving(lb)


def test_slowloris_past_client_header_timeout(lb):
    """A head dribbled slower than client_header_timeout (1s) ends in 408 or a close."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        received = b""
        closed = False
        for i in range(40):
            try:
                sock.sendall(b"X-Drip-%d: v\r\n" % i)
            except OSError:
                closed = True
                break
            sock.settimeout(0.25)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            received += data
        if not closed:
            sock.settimeout(5)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    received += data
                closed = True
            except (socket.timeout, ConnectionResetError):
                pass
    elapsed = time.monotonic() - started
    assert closed, "slowloris connection still open"
    assert elapsed < 6, elapsed
    if received:
        assert parse_responses(received)[0].status == 408
    check_still_serving(lb)


def test_idle_connection_without_request_is_closed(lb):
    """A client that connects and sends nothing is dropped after client_header_timeout."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as sock:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        while data and not data.endswith(b"\n") and time.monotonic() - started < 8:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    assert time.monotonic() - started < 6
    if data:
        assert parse_responses(data)[0].status == 408
    check_still_serving(lb)


def test_slow_body_past_client_body_timeout(lb):
    started = time.monotonic()
    data, closed = raw_exchange(
        lb.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc", timeout=10)
    assert closed
    assert time.monotonic() - started < 8
    if data:
        assert parse_responses(data)[-1].status in (408, 400)
    check_still_serving(lb)


def test_many_bad_connections_at_once(lb):
    """A burst of concurrent garbage connections: all answered, workers unchanged."""
    import concurrent.futures
    raws = [case[1] for case in CASES if len(case[1]) < 5000] * 2

    def one(raw):
        data, closed = raw_exchange(lb.port, raw, timeout=15)
        return closed

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, raws))
    assert all(results)
    wait_for(lambda: sorted(lb.worker_pids()) == lb.initial_pids, timeout=5)
    check_still_serving(lb)
