#!/usr/bin/env python3
"""Example WebSocket client for the mplb WebSocket demo.

Usage::

    python examples/websocket_client.py [--url ws://localhost:8080/] [--connections 10]
                                        [--reconnects 3] [--timeout 5] [--retries 5]
                                        [--distinct-ips] [--no-cookies] [--strict] [--json]

It simulates ``--connections`` clients.  Each client opens a WebSocket through the
load balancer, reads the backend's welcome message (``{"type": "welcome",
"backend": ...}``, see examples/websocket_backend.py) to learn which backend it landed
on, sends a message and checks the echo (same text, same backend).  All connections
stay open (so ``least_connections`` sees them), then every client closes and reopens
its connection ``--reconnects`` times to show session persistence:

* ``persistence ip_hash``: every connection comes from the same client IP, so every
  connection lands on the same backend; with ``--distinct-ips`` each simulated client
  connects from its own loopback address (127.1.0.2, 127.1.0.3, ...: Linux routes all
  of 127.0.0.0/8 to lo), so the clients spread over the backends and each one sticks
  to its own;
* ``persistence cookie``: each client keeps the cookies set on the ``101 Switching
  Protocols`` response (``MPLB_SESSION``) and sends them back when it reconnects, like
  a browser, so it sticks to its backend (``--no-cookies`` turns the jar off).

Connecting retries with exponential backoff (0.1 s doubling up to 2 s, with jitter),
as the WebSocket guide recommends, ``--retries`` times; every socket operation is
bounded by ``--timeout`` seconds.

At the end it prints the distribution (backend -> connections) and whether
persistence held (each client always reached the same backend).  ``--json`` prints one
JSON document instead.  Exit status: 0 success, 1 errors (a connection failed or an
echo was wrong), 2 persistence broken and ``--strict`` given.
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

try:
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("websocket_client.py needs websocket-client: pip install websocket-client")

COOKIE_ATTRIBUTES = {"path", "domain", "expires", "max-age", "samesite", "secure",
                     "httponly", "priority", "partitioned", "version", "comment"}


class ClientError(Exception):
    pass


def parse_set_cookie(value: str | None) -> dict[str, str]:
    """Cookies (name -> value) in a Set-Cookie value.

    websocket-client joins several Set-Cookie headers with '; ', so attributes and
    cookies arrive mixed; attributes are recognised by name and skipped.
    """
    cookies: dict[str, str] = {}
    if not value:
        return cookies
    for part in value.split(";"):
        name, sep, val = part.strip().partition("=")
        name = name.strip()
        if not sep or not name or name.lower() in COOKIE_ATTRIBUTES:
            continue
        cookies[name] = val.strip()
    return cookies


def backoff_delays(retries: int, base: float = 0.1, cap: float = 2.0):
    """Exponential backoff with jitter: 0.1, 0.2, 0.4 ... capped at ``cap`` seconds."""
    for attempt in range(retries):
        delay = min(cap, base * (2 ** attempt))
        yield delay * (0.5 + random.random() / 2)


def recv_json(ws, timeout: float) -> dict:
    ws.settimeout(timeout)
    raw = ws.recv()
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ClientError(f"reply is not JSON: {raw[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ClientError(f"reply is not a JSON object: {raw[:80]!r}")
    return obj


def source_ip(client_id: int) -> str:
    """The loopback source address of simulated client ``client_id`` (1-based)."""
    return f"127.1.{client_id // 250}.{client_id % 250 + 1}"


def open_socket(url: str, source: str, timeout: float) -> socket.socket:
    """A TCP connection to the URL's host and port from the address ``source``."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"          # a 127.x source address needs IPv4
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    return socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0))


def connect(url: str, cookies: dict[str, str], timeout: float, retries: int,
            source: str | None = None):
    """Open a WebSocket (retrying with backoff); return (ws, welcome, set_cookies)."""
    last_error: Exception | None = None
    delays = backoff_delays(retries)
    while True:
        ws = None
        try:
            cookie_header = "; ".join(f"{k}={v}" for k, v in cookies.items()) or None
            extra = {}
            if source:
                extra["socket"] = open_socket(url, source, timeout)
            ws = websocket.create_connection(url, timeout=timeout, cookie=cookie_header,
                                             enable_multithread=False, **extra)
            set_cookies = parse_set_cookie((ws.getheaders() or {}).get("set-cookie"))
            welcome = recv_json(ws, timeout)
            if welcome.get("type") != "welcome" or "backend" not in welcome:
                raise ClientError(f"expected a welcome message, got {welcome!r}")
            return ws, welcome, set_cookies
        except websocket.WebSocketBadStatusException as exc:
            last_error = exc
            if ws is not None:
                ws.close()
            # a 4xx answer (404: no location, 403: denied) will not change on retry
            if 400 <= getattr(exc, "status_code", 0) < 500:
                break
        except (OSError, websocket.WebSocketException, ClientError) as exc:
            last_error = exc
            if ws is not None:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001
                    pass
        delay = next(delays, None)
        if delay is None:
            break
        time.sleep(delay)
    raise ClientError(f"cannot connect to {url}: {describe(last_error)}")


def describe(exc: Exception | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return f"handshake failed: HTTP {exc.status_code}"
    return f"{type(exc).__name__}: {exc}"


def echo_check(ws, backend: str, message: str, timeout: float) -> None:
    ws.settimeout(timeout)
    ws.send(message)
    reply = recv_json(ws, timeout)
    if reply.get("type") != "echo" or reply.get("echo") != message:
        raise ClientError(f"bad echo for {message!r}: {reply!r}")
    if reply.get("backend") != backend:
        raise ClientError(f"echo came from {reply.get('backend')!r}, welcome from {backend!r}")


class SimClient:
    """One simulated client: its cookie jar and the backends it reached."""

    def __init__(self, cid: int):
        self.id = cid
        self.cookies: dict[str, str] = {}
        self.backends: list[str] = []
        self.ws = None
        self.errors: list[str] = []
        self.got_cookie = False
        self.seen_as: list[str] = []     # client address as the backend saw it

    def close(self):
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass
            self.ws = None

    def open(self, args, round_no: int) -> None:
        jar = self.cookies if not args.no_cookies else {}
        source = source_ip(self.id) if args.distinct_ips else None
        ws, welcome, set_cookies = connect(args.url, jar, args.timeout, args.retries, source)
        self.ws = ws
        if set_cookies:
            self.got_cookie = True
            if not args.no_cookies:
                self.cookies.update(set_cookies)
        backend = str(welcome["backend"])
        self.backends.append(backend)
        self.seen_as.append(str(welcome.get("client", "")))
        echo_check(ws, backend, f"hello from client {self.id} (connection {round_no})",
                   args.timeout)

    @property
    def persistent(self) -> bool:
        return len(set(self.backends)) <= 1


def run(args) -> dict:
    clients = [SimClient(i + 1) for i in range(args.connections)]
    errors: list[str] = []
    started = time.monotonic()

    def attempt(client: SimClient, round_no: int):
        try:
            client.open(args, round_no)
        except (ClientError, OSError, websocket.WebSocketException) as exc:
            msg = f"client {client.id} connection {round_no}: {exc}"
            client.errors.append(msg)
            errors.append(msg)
            client.close()
            return
        if not args.json:
            note = ""
            if round_no > 0 and len(client.backends) > 1:
                note = " (same backend)" if client.backends[-1] == client.backends[0] \
                    else f" (MOVED from {client.backends[0]})"
            print(f"client {client.id:3d} connection {round_no}: {client.backends[-1]}{note}",
                  flush=True)

    try:
        # Phase 1: every client connects; the connections stay open.
        for client in clients:
            attempt(client, 0)
        # Phase 2: reconnects, to show persistence (pointless when nothing connected).
        if not any(c.backends for c in clients):
            errors.append("no connection succeeded; reconnects skipped")
            return_early = True
        else:
            return_early = False
        for round_no in range(1, 0 if return_early else args.reconnects + 1):
            for client in clients:
                client.close()
                attempt(client, round_no)
    finally:
        for client in clients:
            client.close()

    first = Counter(c.backends[0] for c in clients if c.backends)
    total = Counter(b for c in clients for b in c.backends)
    moved = [c.id for c in clients if not c.persistent]
    return {
        "url": args.url,
        "connections": args.connections,
        "reconnects": args.reconnects,
        "ok": not errors,
        "errors": errors,
        "distribution": dict(sorted(first.items())),
        "total_distribution": dict(sorted(total.items())),
        "persistent": not moved and not errors,
        "moved_clients": moved,
        "cookies": sum(1 for c in clients if c.got_cookie),
        "elapsed_s": round(time.monotonic() - started, 3),
        "clients": [{"id": c.id, "backends": c.backends,
                     "backend": c.backends[0] if c.backends else None,
                     "persistent": c.persistent, "cookie": c.got_cookie,
                     "source_ip": source_ip(c.id) if args.distinct_ips else None,
                     "seen_as": sorted(set(c.seen_as)),
                     "errors": c.errors} for c in clients],
    }


def print_report(result: dict) -> None:
    print()
    print(f"Distribution of {result['connections']} new connections through {result['url']}:")
    dist = result["distribution"]
    total = result["total_distribution"]
    width = max([len("backend")] + [len(b) for b in total])
    print(f"  {'backend':<{width}}  {'new':>5}  {'all':>5}")
    for backend in sorted(total):
        n = dist.get(backend, 0)
        print(f"  {backend:<{width}}  {n:>5}  {total[backend]:>5}  {'#' * n}")
    if result["reconnects"] and not result["distribution"]:
        print("Persistence: not checked (no connection succeeded)")
    elif result["reconnects"]:
        if result["persistent"]:
            print(f"Persistence: held - every client stayed on its backend over "
                  f"{result['reconnects']} reconnect(s)")
        elif result["moved_clients"]:
            print(f"Persistence: BROKEN - clients that moved: {result['moved_clients']}")
        else:
            print("Persistence: not established - some connections failed (see errors)")
    else:
        print("Persistence: not checked (--reconnects 0)")
    if result["cookies"]:
        print(f"Cookies: {result['cookies']} client(s) received a cookie on the 101 response")
    if result["errors"]:
        print(f"Errors ({len(result['errors'])}):")
        for err in result["errors"]:
            print(f"  {err}")
    else:
        print("All echoes correct.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="mplb WebSocket demo client")
    ap.add_argument("--url", default="ws://localhost:8080/",
                    help="WebSocket URL (default ws://localhost:8080/)")
    ap.add_argument("-n", "--connections", type=int, default=10,
                    help="number of simulated clients (default 10)")
    ap.add_argument("-r", "--reconnects", type=int, default=3,
                    help="reconnects per client to check persistence (default 3)")
    ap.add_argument("--timeout", type=float, default=5.0,
                    help="timeout of each connect/send/receive in seconds (default 5)")
    ap.add_argument("--retries", type=int, default=5,
                    help="connect retries with exponential backoff (default 5)")
    ap.add_argument("--distinct-ips", action="store_true",
                    help="give every simulated client its own loopback source address "
                         "(127.1.x.y; Linux), so ip_hash sees N different clients")
    ap.add_argument("--no-cookies", action="store_true",
                    help="do not keep or send back cookies")
    ap.add_argument("--strict", action="store_true",
                    help="exit 2 when persistence did not hold")
    ap.add_argument("--json", action="store_true", help="print a JSON report only")
    args = ap.parse_args(argv)
    if args.connections < 1 or args.reconnects < 0 or args.timeout <= 0 or args.retries < 0:
        ap.error("--connections must be >= 1, --reconnects and --retries >= 0, --timeout > 0")

    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    if not result["ok"]:
        return 1
    if args.strict and args.reconnects and not result["persistent"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
