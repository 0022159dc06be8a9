#!/usr/bin/env python3
"""Example WebSocket backend for the mplb WebSocket demo.

Usage::

    python examples/websocket_backend.py --port 8001 --name backend1 [--host 127.0.0.1]

Built on gevent-websocket (``geventwebsocket.WebSocketServer`` + a WSGI app).

WebSocket (any path upgrades: ``/``, ``/ws``, ``/game/ws``, ``/chat`` ...):

* on connect the backend sends a welcome message::

      {"type": "welcome", "backend": "backend1", "client": "127.0.0.1", "path": "/ws", ...}

* echo mode (default): every text message is answered with::

      {"type": "echo", "backend": "backend1", "echo": "<the message>", "client": "<ip>"}

  A binary message is answered with a JSON text message holding it base64-encoded
  (``"echo_b64"``), so every reply names its backend.
* chat mode: a connection to a path ending in ``/chat`` (all its messages), or any
  text message that is a JSON object with ``"type": "chat"``, is broadcast to every
  client connected to *this* backend as
  ``{"type": "chat", "backend": ..., "from": ..., "text": ..., "clients": N}``.

``client`` is the address of the real client as reported by the load balancer
(``X-Real-IP``, else the first ``X-Forwarded-For`` entry), else the TCP peer.

Plain HTTP:

* ``GET /``        -> ``200 text/plain`` "backend1 OK" (for health checks)
* ``GET /health``  -> ``200 application/json`` {"status": "ok", "backend": ..., "connections": N}
* ``GET /client``  -> the browser demo page (examples/websocket_client/index.html); open
  ``http://localhost:8080/client`` through mplb.
* anything else   -> 404

SIGTERM and SIGINT stop the server cleanly: open WebSockets are closed with code
1001 (going away) and the process exits 0.
"""
from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import signal
import struct
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from geventwebsocket import WebSocketError, WebSocketServer  # noqa: E402
from geventwebsocket.websocket import WebSocket  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "websocket_client", "index.html")

log = logging.getLogger("websocket_backend")


def _close(self, code=1000, message=b""):
    """A correct WebSocket.close for gevent-websocket 0.10.1.

    Its own close() sends str(bytes) ("b'...'") as the payload, without the status
    code, so a close with a reason (a browser's ws.close(1000, "bye"), or our 1001 on
    shutdown) becomes a malformed close frame.  This one sends code + UTF-8 reason.
    """
    if self.closed:
        return
    if isinstance(message, str):
        message = message.encode("utf-8")
    payload = b"" if code is None else struct.pack("!H", code) + (message or b"")[:123]
    try:
        self.send_frame(payload, opcode=self.OPCODE_CLOSE)
    except (WebSocketError, OSError):
        pass  # the peer is gone; the socket is closed anyway
    finally:
        self.closed = True
        self.stream = None
        self.raw_write = None
        self.raw_read = None
        self.environ = None


WebSocket.close = _close


class Backend:
    """The WSGI application: HTTP endpoints plus WebSocket echo/chat."""

    def __init__(self, name: str):
        self.name = name
        self.clients: dict[int, object] = {}     # connection id -> websocket
        self._ids = itertools.count(1)
        self.total = 0

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def client_ip(environ) -> str:
        real = environ.get("HTTP_X_REAL_IP")
        if real:
            return real.strip()
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        if xff:
            return xff.split(",")[0].strip()
        return environ.get("REMOTE_ADDR", "")

    def _send(self, ws, obj) -> bool:
        try:
            ws.send(json.dumps(obj))
            return True
        except (WebSocketError, OSError):
            return False

    def broadcast(self, obj) -> int:
        sent = 0
        for ws in list(self.clients.values()):
            if self._send(ws, obj):
                sent += 1
        return sent

    # -- WSGI ----------------------------------------------------------------
    def __call__(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            self.websocket(environ, ws)
            return []
        return self.http(environ, start_response)

    def http(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self._reply(start_response, "405 Method Not Allowed", "text/plain",
                               b"405 method not allowed\n", method)
        if path == "/":
            return self._reply(start_response, "200 OK", "text/plain; charset=utf-8",
                               f"{self.name} OK\n".encode(), method)
        if path == "/health":
            body = json.dumps({"status": "ok", "backend": self.name,
                               "connections": len(self.clients),
                               "total_connections": self.total}).encode()
            return self._reply(start_response, "200 OK", "application/json", body, method)
        if path in ("/client", "/client/", "/client/index.html"):
            try:
                with open(PAGE, "rb") as f:
                    body = f.read()
            except OSError:
                return self._reply(start_response, "404 Not Found", "text/plain",
                                   b"404 client page not found\n", method)
            return self._reply(start_response, "200 OK", "text/html; charset=utf-8",
                               body, method)
        return self._reply(start_response, "404 Not Found", "text/plain",
                           f"404 not found ({self.name})\n".encode(), method)

    def _reply(self, start_response, status, ctype, body, method):
        start_response(status, [("Content-Type", ctype),
                                ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"),
                                ("X-Backend", self.name)])
        return [] if method == "HEAD" else [body]

    def websocket(self, environ, ws):
        cid = next(self._ids)
        ip = self.client_ip(environ)
        path = environ.get("PATH_INFO", "/")
        chat_path = path.rstrip("/").endswith("/chat")
        self.clients[cid] = ws
        self.total += 1
        log.info("%s: connect #%d from %s path=%s (%d open)",
                 self.name, cid, ip, path, len(self.clients))
        try:
            self._send(ws, {"type": "welcome", "backend": self.name, "client": ip,
                            "path": path, "id": cid, "mode": "chat" if chat_path else "echo",
                            "cookie": environ.get("HTTP_COOKIE", "")})
            while True:
                msg = ws.receive()
                if msg is None:
                    break
                if isinstance(msg, (bytes, bytearray)):
                    self._send(ws, {"type": "echo", "backend": self.name, "binary": True,
                                    "length": len(msg),
                                    "echo_b64": base64.b64encode(bytes(msg)).decode(),
                                    "client": ip})
                    continue
                chat_text = None
                if chat_path:
                    chat_text = msg
                else:
                    try:
                        obj = json.loads(msg)
                    except ValueError:
                        obj = None
                    if isinstance(obj, dict) and obj.get("type") == "chat":
                        chat_text = obj.get("text", obj.get("message", ""))
                if chat_text is not None:
                    self.broadcast({"type": "chat", "backend": self.name,
                                    "from": f"{ip}#{cid}", "text": chat_text,
                                    "clients": len(self.clients)})
                else:
                    self._send(ws, {"type": "echo", "backend": self.name, "echo": msg,
                                    "client": ip})
        except (WebSocketError, OSError) as exc:
            log.debug("%s: connection #%d error: %s", self.name, cid, exc)
        finally:
            self.clients.pop(cid, None)
            log.info("%s: disconnect #%d (%d open)", self.name, cid, len(self.clients))

    def close_all(self, code=1001):
        for ws in list(self.clients.values()):
            try:
                ws.close(code, b"server shutting down")
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="mplb example WebSocket backend")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    ap.add_argument("--name", default=None, help="backend name (default backend-PORT)")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = ap.parse_args(argv)
    name = args.name or f"backend-{args.port}"
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", stream=sys.stderr)

    app = Backend(name)
    server = WebSocketServer((args.host, args.port), app)

    def stop(signum):
        log.info("%s: signal %d, stopping", name, signum)
        app.close_all()
        gevent.spawn(server.stop, timeout=1)

    gevent.signal_handler(signal.SIGTERM, stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, stop, signal.SIGINT)
    try:
        server.start()
    except OSError as exc:
        print(f"{name}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"{name} listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        app.close_all()
        server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
