"""Benchmark the tunnel's keepalive-off relay: splice through a pipe vs recv_into/send.

Why: the tunnel must move bytes as cheaply as possible; this decides workers.tunnel.USE_SPLICE.
The real Tunnel runs in this process on gevent's loop; a producer, a sink and an echo
peer run as separate processes over TCP loopback.

    python scripts/bench_relay.py [--gib 1] [--echo 20000]

Bulk: push N GiB client -> tunnel -> sink and report MB/s.  Echo: 64-byte
request/response round trips through the tunnel and report messages/s.
"""
import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRODUCER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
"""
SINK = """
import socket, sys
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
buf = bytearray(1 << 20); total = 0
while True:
    n = c.recv_into(buf)
    if not n: break
    total += n
c.close()
"""
ECHO = """
import socket, sys
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(d)
"""
PINGER = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"m" * 64; n = int(sys.argv[2]); t = time.perf_counter()
for _ in range(n):
    s.sendall(msg); got = 0
    while got < 64: got += len(s.recv(64 - got))
print(n / (time.perf_counter() - t), flush=True)
"""


def peer(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def run_one(kind, use_splice, amount):
    """Relay one connection through a real Tunnel; return MB/s or messages/s."""
    import gevent
    from gevent import socket as gsocket
    from mplb.config.model import ProxySettings
    from mplb.workers.tunnel import start_tunnel

    far = peer(SINK if kind == "bulk" else ECHO)
    far_port = int(far.stdout.readline())
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    near = peer(PRODUCER if kind == "bulk" else PINGER, lsock.getsockname()[1], amount)
    client, _ = lsock.accept()
    backend = gsocket.create_connection(("127.0.0.1", far_port))
    for s in (client, backend):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = gevent.event.Event()
    result = {}

    def on_close(reason, failed, bytes_in, bytes_out):
        result.update(reason=reason, bytes_in=bytes_in, t=time.perf_counter())
        done.set()
    t0 = time.perf_counter()
    start_tunnel(client, backend, b"", b"", ProxySettings(), on_close, use_splice=use_splice)
    if kind == "bulk":
        done.wait()
        rate = result["bytes_in"] / (result["t"] - t0) / 1e6
    else:
        while near.poll() is None:
            gevent.sleep(0.05)
        rate = float(near.stdout.read())
        done.wait(5)
    for p in (near, far):
        p.kill()
        p.wait()
    lsock.close()
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--echo", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import gevent.event  # noqa: F401  (loaded before the first tunnel)
    for use_splice in (False, True):
        name = "splice   " if use_splice else "recv/send"
        bulk = [run_one("bulk", use_splice, int(args.gib * 1024)) for _ in range(args.rounds)]
        echo = [run_one("echo", use_splice, args.echo) for _ in range(args.rounds)]
        print(f"{name}: bulk {max(bulk):8.0f} MB/s (runs {', '.join(f'{b:.0f}' for b in bulk)})"
              f"  echo64 {max(echo):8.0f} msg/s (runs {', '.join(f'{e:.0f}' for e in echo)})",
              flush=True)


if __name__ == "__main__":
    main()
