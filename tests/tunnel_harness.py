"""A tiny gevent 'worker' for tunnel tests, run as a subprocess (no monkey patching in pytest).

argv[1] is JSON: {"backend": [host, port], "mode": "http"|"raw", "settings": {...},
"use_splice": null|bool}.  It listens on a free port for clients and on a control port,
prints `READY <port> <ctlport>`, and prints `CLOSE <json>` for each on_close.  In http
mode it relays one request head and one response head (the upgrade) and then calls
start_tunnel with whatever bytes followed the heads.  Control lines: count, mem, gc,
close_all.
"""
import gc
import json
import os
import resource
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gevent                                   # noqa: E402
from gevent import socket                       # noqa: E402

from mplb.config.model import ProxySettings     # noqa: E402
from mplb.workers import tunnel                      # noqa: E402


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("EOF before head end")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def emit(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def on_close(reason, backend_failed, bytes_in, bytes_out):
    emit("CLOSE " + json.dumps({"reason": reason, "backend_failed": backend_failed,
                                "bytes_in": bytes_in, "bytes_out": bytes_out}))


def handle(csock, cfg, settings):
    try:
        bsock = socket.create_connection(tuple(cfg["backend"]))
        rest = brest = b""
        if cfg.get("mode", "http") == "http":
            head, rest = read_head(csock)
            bsock.sendall(head)
            rhead, brest = read_head(bsock)
            csock.sendall(rhead)
    except OSError as exc:
        emit("HANDSHAKE-ERROR " + repr(exc))
        csock.close()
        return
    tunnel.start_tunnel(csock, bsock, rest, brest, settings, on_close,
                        use_splice=cfg.get("use_splice"))


def control(conn):
    f = conn.makefile("rwb")
    for line in f:
        cmd = line.strip().decode()
        if cmd == "count":
            reply = {"live": tunnel.live_tunnel_count()}
        elif cmd == "gc":
            gc.collect()
            reply = {"ok": True}
        elif cmd == "mem":
            gc.collect()
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            reply = {"live": tunnel.live_tunnel_count(), "rss": rss, "traced": traced,
                     "objects": len(gc.get_objects())}
        elif cmd == "close_all":
            reply = {"closed": tunnel.close_all_tunnels("shutdown")}
        else:
            reply = {"error": cmd}
        f.write((json.dumps(reply) + "\n").encode())
        f.flush()


def serve(lsock, fn, *args):
    while True:
        conn, _ = lsock.accept()
        gevent.spawn(fn, conn, *args)


def main():
    cfg = json.loads(sys.argv[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cfg.get("tracemalloc"):
        tracemalloc.start()
    settings = ProxySettings(**cfg.get("settings", {}))
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    csock = socket.socket()
    csock.bind(("127.0.0.1", 0))
    csock.listen(16)
    emit(f"READY {lsock.getsockname()[1]} {csock.getsockname()[1]}")
    gevent.spawn(serve, csock, control)
    serve(lsock, handle, cfg, settings)


if __name__ == "__main__":
    main()
