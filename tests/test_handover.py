"""The handover protocol on its own: who owns a tunnel once its descriptors are sent.

A real tunnel (between socket pairs) is sent over a Unix socket pair whose other end
stands for the receiving worker; gevent runs in this process, unpatched.
"""
import array
import json
import socket as stdsocket

import gevent
import pytest
from gevent import socket

from mplb.config.model import ProxySettings
from mplb.workers import handover, tunnel
from mplb.workers.tunnelbook import TunnelMove


class Record:
    """What a worker's TunnelRecord offers the handover: identity and the close hook."""

    def __init__(self):
        self.closes = []

    def meta(self):
        return {"upstream": "app", "server": "http://127.0.0.1:1"}

    def __call__(self, reason, backend_failed, tunnel_in, tunnel_out):
        self.closes.append(reason)


@pytest.fixture(autouse=True)
def no_tunnel_left():
    yield
    for live in list(tunnel._live):
        live.close("test over")


@pytest.fixture
def live_tunnel():
    client, client_peer = socket.socketpair()
    backend, backend_peer = socket.socketpair()
    record = Record()
    made = tunnel.start_tunnel(client, backend, b"", b"", ProxySettings(), record,
                               use_splice=False)
    yield made, record, client_peer, backend_peer
    made.close("test over")
    client_peer.close()
    backend_peer.close()


def receive_fds(sock):
    """Read the handover header and its two descriptors, as the receiver would."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(handover.HEADER.size, stdsocket.CMSG_SPACE(2 * 4))
    for _, _, payload in ancdata:
        fds.frombytes(payload)
    return data, list(fds)


def test_sender_lets_go_once_descriptors_are_sent_even_without_an_answer(
        live_tunnel, monkeypatch):
    """The receiver took the descriptors (and may be relaying) but answers late: the
    sender must not resume the tunnel, or two processes would relay one socket."""
    made, record, client_peer, backend_peer = live_tunnel
    channel, receiver = socket.socketpair(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    channel.settimeout(0.3)                       # the answer never comes in time
    try:
        assert handover._send_one(channel, TunnelMove(made)) == (True, False)
        assert tunnel.live_tunnel_count() == 0
        assert record.closes == ["handover"]
        header, fds = receive_fds(receiver)
        state_len, _, _ = handover.HEADER.unpack(header)
        assert len(fds) == 2
        state = json.loads(receiver.recv(state_len))
        assert state["server"] == "http://127.0.0.1:1"
        # The receiver's copies are the only ones left: they carry the traffic.
        client_peer.sendall(b"ping")
        with stdsocket.socket(fileno=fds[0]) as client_copy, \
                stdsocket.socket(fileno=fds[1]):
            client_copy.settimeout(5)
            assert client_copy.recv(4) == b"ping"
    finally:
        channel.close()
        receiver.close()


def test_sender_keeps_the_tunnel_when_the_descriptors_never_left(live_tunnel):
    made, record, client_peer, backend_peer = live_tunnel
    channel, receiver = socket.socketpair(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    receiver.close()                              # nobody at the other end
    try:
        assert handover._send_one(channel, TunnelMove(made)) == (False, False)
        assert tunnel.live_tunnel_count() == 1 and record.closes == []
        client_peer.sendall(b"still here")
        backend_peer.settimeout(5)
        data = b""
        with gevent.Timeout(5):
            while len(data) < 10:
                data += backend_peer.recv(64)
        assert data == b"still here"
    finally:
        channel.close()


def test_a_dead_receiver_is_dropped_at_its_first_failure(monkeypatch):
    """Tunnels meant for a receiver that died stay here, with one failed attempt in
    all, not one per tunnel."""
    peers = []
    made = []
    for _ in range(3):
        (client, client_peer), (backend, backend_peer) = socket.socketpair(), socket.socketpair()
        peers += [client_peer, backend_peer]
        made.append(tunnel.start_tunnel(client, backend, b"", b"", ProxySettings(), Record(),
                                        use_splice=False))
    channel, receiver = socket.socketpair(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    receiver.close()                                   # the receiver is gone
    attempts = []
    real_send_one = handover._send_one

    def counting(channel, one):
        attempts.append(one)
        return real_send_one(channel, one)
    monkeypatch.setattr(handover, "_send_one", counting)
    monkeypatch.setattr(handover, "_open_channels", lambda master_pid, targets: [channel])

    try:
        assert handover.hand_over(0, [1], [TunnelMove(t) for t in made]) == 0
        assert len(attempts) == 1 and tunnel.live_tunnel_count() == 3
    finally:
        for peer in peers:
            peer.close()
