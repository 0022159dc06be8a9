"""Mutation fuzzing of the request path against one running mplb.

Valid requests are mutated (bit flips, insertions of random or HTTP-significant bytes,
deletions, truncations, duplicated header lines) and sent raw; the client then shuts its
sending side, so every exchange ends promptly.  Whatever was sent, mplb answers with
well-formed HTTP responses or closes cleanly, within a bound, and no worker crashes.
"""
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.harness import Stack, parse_responses, raw_exchange

EXAMPLES = int(os.environ.get("MPLB_FUZZ_EXAMPLES", "300"))
BOUND = 8.0          # seconds: a reply (or close) later than this is a hang


@pytest.fixture(scope="module")
def lb():
    stack = Stack("""
worker_processes 2;
upstream app {{ server {b1} max_fails=0; }}
server {{
    listen 127.0.0.1:{port};
    client_header_timeout 2s;
    client_body_timeout 2s;
    keepalive_timeout 2s;
    client_max_body_size 4k;
    proxy_read_timeout 5s;
    location / {{ proxy_pass app; }}
    location = /local {{ return 200 "local answer"; }}
    location ~ ^/re/(\\d+)$ {{ proxy_pass app; }}
}}
""", backends=("fuzz",))
    mplb = stack.mplb
    mplb.initial_pids = sorted(mplb.worker_pids())
    yield mplb
    try:
        output = mplb.output()
        assert "Traceback" not in output, output[-4000:]
        assert "unexpected error" not in output, output[-4000:]
        assert sorted(mplb.worker_pids()) == mplb.initial_pids
    finally:
        stack.stop()


BASES = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"GET /a/b/../c?x=1&y=%20 HTTP/1.1\r\nHost: example.com:8080\r\nX-Foo: bar\r\n"
    b"Cookie: a=b; c=d\r\nConnection: keep-alive\r\n\r\n",
    b"POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
    b"Content-Type: text/plain\r\n\r\nhello world",
    b"POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-A: b\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
    b"GET /local HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /re/42 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /local HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"DELETE /item/1 HTTP/1.1\r\nHost: x\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\n\r\n",
]

SIGNIFICANT = [b"\r\n", b"\r", b"\n", b"\x00", b" ", b":", b"%", b"%0", b"/..", b"\t",
               b"\r\n\r\n", b"chunked", b"Content-Length: 3\r\n",
               b"Transfer-Encoding: chunked\r\n", b"Host: y\r\n", b"ffffffff", b"\xff\xfe",
               b"HTTP/1.1", b"0\r\n\r\n", b"Expect: 100-continue\r\n"]


@st.composite
def mutated_requests(draw):
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "insert", "insert_significant", "delete",
                                     "truncate", "duplicate_line", "replace"]))
        index = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "insert_significant":
            data[index:index] = draw(st.sampled_from(SIGNIFICANT))
        elif kind == "delete":
            del data[index:index + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[index:]
        elif kind == "replace":
            data[index] = draw(st.integers(0, 255))
        else:
            lines = bytes(data).split(b"\r\n")
            if len(lines) > 2:
                pick = draw(st.integers(1, len(lines) - 2))
                lines.insert(pick, lines[pick])
                data = bytearray(b"\r\n".join(lines))
    return bytes(data)


def check_exchange(lb, raw):
    started = time.monotonic()
    data, closed = raw_exchange(lb.port, raw, timeout=BOUND, shutdown_write=True)
    elapsed = time.monotonic() - started
    assert closed, f"no close within {BOUND}s; got {data[:300]!r}"
    assert elapsed < BOUND
    if data:
        try:
            # A backend may itself cut a response short (then mplb closes): partial
            # bodies are allowed, heads must be well-formed.
            responses = parse_responses(data, allow_partial=True)
        except (ValueError, IndexError) as exc:
            raise AssertionError(f"malformed response ({exc}): {data[:500]!r}")
        for response in responses:
            assert response.version in (b"HTTP/1.1", b"HTTP/1.0"), response
            assert 100 <= response.status <= 599, response
    return data


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=mutated_requests())
def test_mutated_requests(lb, raw):
    check_exchange(lb, raw)
    assert sorted(lb.worker_pids()) == lb.initial_pids


@pytest.mark.parametrize("index", range(len(BASES)))
def test_unmutated_bases_are_served(lb, index):
    """The seeds themselves are valid: each gets at least one non-error response."""
    data = check_exchange(lb, BASES[index])
    statuses = [r.status for r in parse_responses(data)]
    assert statuses and all(s < 400 or s == 404 for s in statuses), statuses


def test_log_is_clean_and_workers_survived(lb):
    # A normal request still works after the fuzzing.
    data, _ = raw_exchange(lb.port, b"GET /local HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_responses(data)[0].status == 200
    output = lb.output()
    assert "Traceback" not in output, output[-4000:]
    assert "unexpected error" not in output, output[-4000:]
    assert sorted(lb.worker_pids()) == lb.initial_pids
