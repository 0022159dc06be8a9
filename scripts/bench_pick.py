#!/usr/bin/env python3
"""Micro-benchmark: microseconds per pick (get + free) for each method and persistence.

Runs against a real SharedState segment (as in a worker) unless --local is given.
Iterations are bounded so it finishes in seconds:  python scripts/bench_pick.py [-n N]

``--store`` compares a shared_store upstream with a local one instead: returning
clients (table hits), new clients (every pick records an entry, and with the store
announces it to the master through a real non-blocking socket that a thread drains,
as the master does), and least_connections (one more word per server).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mplb.balancing import init_upstream  # noqa: E402
from mplb.vocabulary import METHODS  # noqa: E402
from mplb.control import ControlWriter  # noqa: E402
from mplb.config.model import Persistence, Upstream, UpstreamServer  # noqa: E402
from mplb.shm import SharedState  # noqa: E402

MODES = [("none", {}), ("ip_hash", {"ttl": 3600}), ("cookie", {}),
         ("cookie learn", {"learn": "JSESSIONID", "ttl": 3600}), ("consistent_hash", {})]


class Request:
    __slots__ = ("client_ip", "cookie", "uri")

    def __init__(self, i):
        self.client_ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        self.cookie = f"JSESSIONID=s{i}"
        self.uri = f"/item/{i}"

    def header(self, name):
        return self.cookie if name == "cookie" else None

    def variable(self, name):
        return self.uri if name == "uri" else ""


def bench(balancer, requests, n, batch=250):
    """Microseconds per get+free: the fastest of n/batch batches cycling through ``requests``.

    The minimum over short batches filters out time the benchmark spent descheduled (the
    machine is often shared); the result is what one pick costs on an idle CPU.
    """
    tried = frozenset()
    count = len(requests)
    get, free = balancer.get, balancer.free
    clock = time.perf_counter
    best = float("inf")
    i = 0
    for _ in range(max(1, n // batch)):
        start = clock()
        for _ in range(batch):
            pick = get(requests[i % count], tried)
            free(pick, False)
            i += 1
        best = min(best, clock() - start)
    return best / batch * 1e6


class NewClients:
    """A request from a client never seen before, each time it is asked for."""

    def __init__(self):
        self.n = 0

    def __getitem__(self, i):
        self.n += 1
        return Request(self.n + (1 << 22))

    def __len__(self):
        return 1 << 60


def drained_writer():
    """A ControlWriter on a socketpair whose other end another process reads, as the
    master does (a thread here would take the GIL from the picks being timed)."""
    import socket
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.fork() == 0:
        worker.close()
        while master.recv(65536):
            pass
        os._exit(0)
    master.close()
    worker.setblocking(False)
    return ControlWriter(worker.fileno()), worker


STORE_CASES = {"returning": ("weighted_round_robin", "ip_hash", False),
               "new-client": ("weighted_round_robin", "ip_hash", True),
               "new-session": ("weighted_round_robin", "cookie", True),
               "least-connections": ("least_connections", "none", False)}


def store_case(shared, servers, case, key):
    """(balancer, requests) of one --store case, with (key) or without a cluster key."""
    method, kind, new = STORE_CASES[case]
    options = {"ttl": 3600, "table_size": 32768}
    if kind == "cookie":
        options["learn"] = "JSESSIONID"
    upstream = Upstream(f"{case}-{bool(key)}", method=method, servers=servers,
                        persistence=Persistence(kind=kind, **options), cluster_key=key)
    return (init_upstream(upstream, shared, 0),
            NewClients() if new else [Request(i) for i in range(1000)])


def compare_store(shared, servers, n):
    """us/pick with and without shared_store, for the cases the store changes."""
    writer, keep = drained_writer()
    shared.announce = writer.announce
    print(f"{'case':<24}{'local':>10}{'store':>10}{'ratio':>8}   (us/pick)")
    for case in STORE_CASES:
        row = []
        for key in (b"", b"k" * 16):
            balancer, requests = store_case(shared, servers, case, key)
            bench(balancer, requests, min(n, 2000))
            row.append(bench(balancer, requests, n))
        print(f"{case:<24}{row[0]:>10.2f}{row[1]:>10.2f}{row[1] / row[0]:>7.2f}x")
    print(f"entries announced: dropped {writer.dropped} (socket full)")
    keep.close()
    os.wait()


def count_store_case(shared, servers, spec, n):
    """--count CASE:local|CASE:store: exactly 500 + n picks and nothing else, for an
    instruction counter (scripts/bench_pick_instructions); announcements go to a
    socket big enough to take them all (user-space work only: no reader process)."""
    import socket
    case, variant = spec.split(":")
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end, option in ((worker, socket.SO_SNDBUF), (master, socket.SO_RCVBUF)):
        end.setsockopt(socket.SOL_SOCKET, option, 1 << 22)
    worker.setblocking(False)
    writer = ControlWriter(worker.fileno())
    shared.announce = writer.announce
    balancer, requests = store_case(shared, servers, case, b"k" * 16 if variant == "store"
                                    else b"")
    for i in range(500 + n):
        balancer.free(balancer.get(requests[i % len(requests)]), False)
    assert writer.dropped == 0, "the socket filled up: use a smaller -n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=60000, help="picks per measurement")
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--local", action="store_true", help="shared=None (in-process)")
    parser.add_argument("--store", action="store_true",
                        help="compare shared_store upstreams with local ones")
    parser.add_argument("--count", metavar="CASE:local|CASE:store",
                        help="run n picks of one --store case, untimed (for valgrind)")
    parser.add_argument("--max-conns", type=int, default=1000,
                        help="max_conns of every server (0: no limit, no counter sums)")
    args = parser.parse_args()
    servers = tuple(UpstreamServer(url=f"http://10.1.0.{i}:80", host=f"10.1.0.{i}", port=80,
                                   address=f"10.1.0.{i}", weight=1 + i % 3,
                                   max_conns=args.max_conns)
                    for i in range(1, args.servers + 1))
    requests = [Request(i) for i in range(1000)]     # 1000 distinct clients: hits after warm-up
    path = os.path.join(tempfile.gettempdir(), f"mplb.bench.{os.getpid()}")
    shared = None if args.local else SharedState.create(path, max_workers=16,
                                                        table_entries=400000)
    try:
        if shared is not None:
            for slot in range(4):
                shared.worker_started(slot, 1, 1)   # readers sum 4 worker slots
        if args.count:
            count_store_case(shared, servers, args.count, args.n)
            return
        print(f"{args.servers} servers (max_conns={args.max_conns}), {args.n} picks, "
              f"{'in-process state' if shared is None else 'shared memory, 4 worker slots'}")
        if args.store:
            compare_store(shared, servers, args.n)
            return
        print(f"{'method':<22}" + "".join(f"{m:>17}" for m, _ in MODES) + "   (us/pick)")
        for method in METHODS:
            row = []
            for kind, options in MODES:
                persistence = Persistence(kind=kind.split()[0], **options)
                upstream = Upstream(f"{method}-{kind}", method=method, servers=servers,
                                    persistence=persistence)
                balancer = init_upstream(upstream, shared, 0)
                if options.get("learn"):
                    for r in requests:                # the backend set these sessions
                        p = balancer.get(r, frozenset())
                        balancer.response_headers(p, r, [("Set-Cookie", r.cookie)])
                        balancer.free(p, False)
                bench(balancer, requests, min(args.n, 2000))          # warm up
                row.append(bench(balancer, requests, args.n))
            print(f"{method:<22}" + "".join(f"{us:>17.2f}" for us in row))
    finally:
        if shared is not None:
            shared.close()
            shared.unlink()


if __name__ == "__main__":
    main()
