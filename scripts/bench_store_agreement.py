#!/usr/bin/env python3
"""Agreement latency of a shared_store: from a new client's entry on one instance to
the same entry in another instance's table.

Starts a redis-server (temporary, persistence off), three test backends and two mplb
instances A and B (one worker each) sharing it, then, for --clients new clients (source
addresses 127.1.x.y), sends one request to A and polls B's shared segment (mapped
read-only, as mplb-stats does) until B's ip_hash table holds the client's digest.
Reports p50/p90/p99/max of two intervals: from just before the request is sent to A
(an upper bound: it includes A's proxying) and from A's answer (the entry was made
before A forwarded the request).  Every process it starts is stopped by pid.

    .venv/bin/python scripts/bench_store_agreement.py --clients 500
"""
import argparse
import hashlib
import http.client
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mplb.config.store import cluster_key  # noqa: E402
from mplb.shm import SharedState, segment_path  # noqa: E402
from mplb.shm.layout import T_CAPACITY, T_START  # noqa: E402
from mplb.shm.tables import ENTRY_WORDS  # noqa: E402
from tests.harness import Backend, Mplb, free_port, wait_for  # noqa: E402
from tests.redis_harness import RedisServer  # noqa: E402

PREFIX = "agree"


def conf(port, redis_url, backends, timeout):
    servers = " ".join(f"server {b.url};" for b in backends)
    return (f"shared_store {redis_url} prefix={PREFIX} timeout={timeout};\n"
            f"upstream app {{ persistence ip_hash table_size=4096; {servers} }}\n"
            f"server {{ listen 127.0.0.1:{port}; location = /status {{ mplb_status; }}\n"
            f"  location / {{ proxy_pass app; }} }}\n")


def request_from(port, ip):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(ip, 0))
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class TableWatch:
    """B's cluster table, read-only: is a digest there yet?"""

    def __init__(self, pid):
        self.shared = SharedState.open_readonly(segment_path(pid))
        index, d, name = next(entry for entry in self.shared._table_entries()
                              if ":ip_hash:" in entry[2])
        q = self.shared.q
        start = self.shared.off_pool + q[d + T_START] * ENTRY_WORDS
        self.k1_words = (start + 1, start + q[d + T_CAPACITY] * ENTRY_WORDS, ENTRY_WORDS)

    def holds(self, k1):
        first, end, step = self.k1_words
        return k1 in self.shared.q[first:end:step]


def store_of(port):
    import json
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/status")
        store = json.loads(conn.getresponse().read())["store"]
        return {"state": store["state"], "instances": store["instances"]}
    finally:
        conn.close()


def digest_k1(ip, key):
    raw = hashlib.blake2b(ip.encode(), digest_size=16, key=key).digest()
    return int.from_bytes(raw[:8], "little", signed=True)


def percentiles(values):
    values = sorted(values)
    pick = lambda p: values[min(len(values) - 1, int(p * len(values)))]   # noqa: E731
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": values[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--timeout", default="20ms", help="shared_store timeout=")
    parser.add_argument("--deadline", type=float, default=5.0,
                        help="seconds to wait for one entry before counting it lost")
    args = parser.parse_args()
    started = []
    try:
        redis = RedisServer()
        started.append(redis)
        backends = [Backend(f"b{i}") for i in range(1, 4)]
        started.extend(backends)
        ports = [free_port(), free_port()]
        instances = [Mplb(conf(p, redis.url, backends, args.timeout), workers=1,
                          verbose=False, wait_ports=[p], name=f"mplb{i}")
                     for i, p in enumerate(ports)]
        started.extend(instances)
        wait_for(lambda: all(store_of(p) == {"state": "ok", "instances": 2} for p in ports),
                 timeout=30, message="both instances sharing the store")
        watch = TableWatch(instances[1].pid)
        key = cluster_key(PREFIX, "")
        from_send, from_answer, lost = [], [], 0
        for n in range(args.clients):
            ip = f"127.1.{n // 250}.{n % 250 + 2}"
            k1 = digest_k1(ip, key)
            t0 = time.perf_counter()
            assert request_from(ports[0], ip) == 200
            t1 = time.perf_counter()
            while not watch.holds(k1):
                if time.perf_counter() - t0 > args.deadline:
                    lost += 1
                    break
                time.sleep(0.0001)
            else:
                t2 = time.perf_counter()
                from_send.append((t2 - t0) * 1000)
                from_answer.append(max(0.0, t2 - t1) * 1000)
        for label, values in (("request sent to A -> in B's table", from_send),
                              ("A answered -> in B's table", from_answer)):
            p = percentiles(values)
            print(f"{label:<36} ms: " + "  ".join(f"{k} {v:.2f}" for k, v in p.items()))
        print(f"clients {args.clients}, not seen on B within {args.deadline}s: {lost}; "
              f"mean {statistics.mean(from_send):.2f} ms; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        for item in reversed(started):
            item.stop()


if __name__ == "__main__":
    main()
