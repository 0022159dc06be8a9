"""Unit tests of workers/netio.py: waits with a deadline swept by one timer per process."""
import socket as stdsocket
import time

import gevent
import pytest
from gevent import socket

from mplb.workers import netio


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.02)


def test_wait_readable_times_out_then_wakes_on_data(pair):
    a, b = pair
    start = time.monotonic()
    with pytest.raises(stdsocket.timeout):
        netio.wait_readable(a, 0.2)
    assert 0.15 <= time.monotonic() - start < 3.0
    assert not netio._WAITING                  # the deadline entry went with the wait
    gevent.spawn_later(0.05, b.send, b"x")
    netio.wait_readable(a, 5.0)
    assert a.recv(1) == b"x"


def test_recv_into_waits_first_and_times_out(pair):
    a, b = pair
    buffer = bytearray(16)
    b.send(b"hello")
    assert netio.recv_into(a, buffer, 0, 1.0, True) == 5     # already there: still read
    assert bytes(buffer[:5]) == b"hello"
    with pytest.raises(stdsocket.timeout):
        netio.recv_into(a, buffer, 0, 0.2)
    b.close()
    assert netio.recv_into(a, buffer, 0, 1.0, True) == 0     # EOF wakes a waiter too


def test_sweep_times_out_only_the_expired_waiter():
    pairs = [socket.socketpair() for _ in range(2)]
    results = {}

    def wait(i, timeout):
        try:
            netio.wait_readable(pairs[i][0], timeout)
            results[i] = "ready"
        except stdsocket.timeout:
            results[i] = "timeout"

    waiters = [gevent.spawn(wait, 0, 0.2), gevent.spawn(wait, 1, 30.0)]
    try:
        until(lambda: 0 in results)
        assert 1 not in results
        pairs[1][1].send(b"y")
        until(lambda: 1 in results)
        assert results == {0: "timeout", 1: "ready"}
        assert not netio._WAITING
    finally:
        gevent.killall(waiters)
        for a, b in pairs:
            a.close()
            b.close()
