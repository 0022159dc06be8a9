"""CPU cost of mplb's HTTP proxy path per request, measured in one process.

Why: the shared machine makes req/s from scripts/bench swing by 20%, too much to see
a 3% change.  Here clients, one worker's real connection code (ClientConnection,
UpstreamExchange, balancer, real shared-memory segment, keep-alive pool) and a small
backend all run as greenlets of this process over loopback TCP, and the process CPU
time per request is measured; the same clients against the backend directly give
the baseline to subtract.  The minimum over repetitions is reported.

    python scripts/bench_path.py [--requests 20000] [--conns 16] [--reps 5]
    python scripts/bench_path.py --opcodes     # Python bytecodes per request instead
    scripts/bench_path_instructions            # machine instructions (valgrind), exact

``--opcodes`` counts the bytecode instructions executed per request (through mplb
minus direct): slow, but exact and immune to the machine's noise.
"""
import argparse
import collections
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent  # noqa: E402
from gevent import socket  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from mplb.config.build import build_config  # noqa: E402
from mplb.shm import SharedState  # noqa: E402
from mplb.workers.process import WorkerContext  # noqa: E402
from mplb.workers.worker import Worker  # noqa: E402

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n"
CLOSE_REQUEST = REQUEST[:-2] + b"Connection: close\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)
CONF = """worker_processes 1;
upstream app {{ server http://127.0.0.1:{port}; keepalive 64; }}
server {{ listen 127.0.0.1:{listen}; keepalive_requests 1000000;
  location / {{ proxy_pass app; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
"""


def backend(sock, _addr):
    """Answer every complete request head with RESPONSE (enough for GETs)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        pending += data
        count = pending.count(b"\r\n\r\n")
        if count:
            close = b"Connection: close" in pending
            pending = pending[pending.rindex(b"\r\n\r\n") + 4:]
            sock.sendall(RESPONSE * count)
            if close:
                sock.close()
                return


def client(port, requests, new_conn=False):
    """One keep-alive connection, one request at a time (like wrk); with ``new_conn``
    a new connection per request (``Connection: close``, like wrk -H)."""
    if new_conn:
        for _ in range(requests):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(CLOSE_REQUEST)
            while sock.recv(65536):
                pass
            sock.close()
        return
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = RESPONSE[-100:]
    for _ in range(requests):
        sock.sendall(REQUEST)
        data = b""
        while not data.endswith(body):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk
    sock.close()


_OPCODES = [0]
_BY_CODE = collections.Counter()


def _count_opcode(frame, event, _arg):
    if event == "opcode":
        _OPCODES[0] += 1
        _BY_CODE[frame.f_code] += 1
    return _count_opcode


def _trace_calls(frame, _event, _arg):
    frame.f_trace_opcodes = True
    return _count_opcode


def run_clients(port, total, conns, opcodes=False, new_conn=False):
    """Per request: CPU microseconds, or bytecodes executed with ``opcodes``."""
    requests = total // conns * conns
    start, _OPCODES[0] = time.process_time(), 0
    if opcodes:
        _BY_CODE.clear()
        sys.settrace(_trace_calls)
    jobs = [gevent.spawn(client, port, total // conns, new_conn) for _ in range(conns)]
    gevent.joinall(jobs, raise_error=True)
    sys.settrace(None)
    if opcodes:
        return _OPCODES[0] / requests
    return (time.process_time() - start) / requests * 1e6


def make_worker(backend_port, workdir):
    path = os.path.join(workdir, "bench.conf")
    with open(path, "w") as f:
        f.write(CONF.format(port=backend_port, listen=1))
    config = build_config(path)
    shared = SharedState.create(os.path.join(workdir, "shm"), 1)
    ctx = WorkerContext(config, {}, None, shared, 0, 0, 1, os.getpid(), False)
    worker = Worker(ctx)
    # As run_worker does after fork: what exists now lives as long as the worker, so
    # keep it out of every collection (the measured path then pays the worker's GC
    # cost, not one that grows with every module imported).
    gc.freeze()
    gc.set_threshold(7000, 20, 20)
    return worker, shared


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--opcodes", action="store_true", help="count bytecodes, not CPU time")
    ap.add_argument("--new-conn", action="store_true",
                    help="a new client connection per request (Connection: close)")
    ap.add_argument("--only", choices=("direct", "mplb"),
                    help="run one side once (for an external counter such as valgrind)")
    args = ap.parse_args()
    if args.opcodes:
        args.requests, args.reps = min(args.requests, 2000), 1

    server = StreamServer(("127.0.0.1", 0), backend)
    server.start()
    backend_port = server.address[1]
    with tempfile.TemporaryDirectory() as workdir:
        worker, shared = make_worker(backend_port, workdir)
        listen = worker.config.servers[0].listens[0]
        front = socket.socket()
        front.bind(("127.0.0.1", 0))
        front.listen(512)
        front_port = front.getsockname()[1]
        accepting = gevent.spawn(worker.acceptor._accept_loop, front, listen)  # the worker's
        if args.only:
            port = backend_port if args.only == "direct" else front_port
            run_clients(port, args.requests, args.conns, new_conn=args.new_conn)
            return
        direct, proxied = [], []
        for _ in range(args.reps):
            direct.append(run_clients(backend_port, args.requests, args.conns, args.opcodes,
                                      args.new_conn))
            proxied.append(run_clients(front_port, args.requests, args.conns,
                                       args.opcodes, args.new_conn))
        accepting.kill()
        front.close()
        worker.pool.close_all()
        shared.close()
    server.stop()
    base, total = min(direct), min(proxied)
    if args.opcodes:
        print(f"direct {base:.0f} bytecodes/req, through mplb {total:.0f}, "
              f"mplb path {total - base:.0f} bytecodes/req; the functions costing most:")
        for code, count in _BY_CODE.most_common(25):
            where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
            print(f"  {count / args.requests:7.1f}  {code.co_name} ({where})")
        return
    print(f"direct {base:.1f} us/req, through mplb {total:.1f} us/req, "
          f"mplb path {total - base:.1f} us/req (min of {args.reps}, "
          f"{args.requests} requests, {args.conns} connections)")


if __name__ == "__main__":
    main()
