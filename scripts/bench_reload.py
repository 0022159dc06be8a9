#!/usr/bin/env python3
"""How long a reload takes with N open tunnels, and whether every tunnel survives it.

Starts a WebSocket backend and mplb (2 workers) on loopback, opens N tunnels, sends
SIGHUP and measures the time from the signal to the exit of the last worker of the old
generation; then checks that every tunnel still echoes.  Usage::

    scripts/bench_reload.py [--tunnels 1000] [--reloads 3] [--workers 2]
"""
import argparse
import asyncio
import os
import resource
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import Backend, Mplb, free_port, wait_for  # noqa: E402

CONF = """
worker_processes {workers};
upstream app {{ server {backend}; }}
server {{
    listen 127.0.0.1:{port};
    proxy_read_timeout 3600s;
    location / {{ proxy_pass app; }}
}}
"""


async def open_tunnels(port, count):
    import websockets
    conns = []
    for start in range(0, count, 100):
        batch = await asyncio.gather(*[
            websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None, ping_interval=None)
            for _ in range(start, min(count, start + 100))])
        for conn in batch:
            await conn.recv()          # the backend's welcome
        conns += batch
    return conns


async def echo_all(conns):
    async def one(index, conn):
        await conn.send(f"check {index}")
        return await asyncio.wait_for(conn.recv(), 30) == f"check {index}"
    results = await asyncio.gather(*[one(i, c) for i, c in enumerate(conns)],
                                   return_exceptions=True)
    return sum(1 for result in results if result is True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    backend = Backend("reload-bench")
    port = free_port()
    mplb = Mplb(CONF.format(workers=args.workers, backend=backend.url, port=port),
                workers=args.workers, verbose=False, wait_ports=[port])
    loop = asyncio.new_event_loop()
    try:
        conns = loop.run_until_complete(open_tunnels(port, args.tunnels))
        timings = []
        for _ in range(args.reloads):
            old = set(mplb.worker_pids())
            started = time.monotonic()
            os.kill(mplb.pid, signal.SIGHUP)
            wait_for(lambda: not old & set(mplb.worker_pids()), timeout=120, interval=0.005,
                     message="old generation to exit")
            timings.append(time.monotonic() - started)
            alive = loop.run_until_complete(echo_all(conns))
            print(f"reload with {len(conns)} tunnels: {timings[-1] * 1000:.0f} ms "
                  f"(SIGHUP to last old worker exit); {alive}/{len(conns)} tunnels echo")
        print(f"median {statistics.median(timings) * 1000:.0f} ms over {len(timings)} reloads")
        for conn in conns:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()
        mplb.stop()
        backend.stop()


if __name__ == "__main__":
    main()
