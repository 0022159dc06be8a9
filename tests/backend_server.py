"""A test backend: HTTP endpoints that misbehave on request, and a WebSocket echo.

Run as ``python tests/backend_server.py --port P --name NAME``.  Endpoints:

- any path: JSON ``{"backend", "method", "path", "query", "target", "headers",
  "body_len"}`` (``target``: the request target exactly as received)
- ``/status/NNN``: answers with that status
- ``/size/N``: N bytes of body (Content-Length)
- ``/chunked/N``: N bytes in chunks of 1000 (Transfer-Encoding: chunked)
- ``/slow/SECONDS``: waits, then answers
- ``/truncate``: promises 1000 bytes, sends 10, closes
- ``/truncate-big``: promises 4 MiB, sends 600 KiB of ``pattern``, closes
- ``/pattern/N``: N bytes of ``pattern(N)`` (every 8-byte word numbers its offset, so a
  lost, repeated or reordered piece shows)
- ``/garbage``: answers with bytes that are not HTTP
- ``/hop``: a response full of hop-by-hop headers (and ``X-Kept: yes``)
- ``/fake-101``: answers 101 Switching Protocols to a plain request
- ``/set-cookie/NAME/VALUE``: sets a cookie
- ``/echo-body``: echoes the request body
- ``/once/...``: like any path, and remembered; ``/once-log`` lists every ``/once/``
  path this backend has answered, in order (shows a request served twice)
- ``/peer``: JSON ``{"backend", "peer_port"}``: the client port of this connection
  (shows whether a proxy reused its upstream connection)
- WebSocket upgrade on any path: welcome message, then echo (text and binary); the
  text ``cmd:request`` is answered with JSON ``{"method", "target", "headers"}`` of the
  upgrade request instead
"""
import argparse
import json
import signal
import sys

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402
from patterns import pattern  # noqa: E402  (run as a script: tests/ is on sys.path)


def headers_of(environ) -> dict:
    """The request's headers, lower case (repeated ones joined by the server)."""
    return {key[5:].replace("_", "-").lower(): value
            for key, value in environ.items() if key.startswith("HTTP_")}


def make_app(name):
    answered_once = []

    def app(environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            return websocket(ws, environ)
        path = environ.get("PATH_INFO", "/")
        parts = path.strip("/").split("/")
        body = environ["wsgi.input"].read() if environ.get("CONTENT_LENGTH") or \
            environ.get("HTTP_TRANSFER_ENCODING") else b""
        if parts[0] == "status" and len(parts) > 1:
            code = int(parts[1])
            start_response(f"{code} Status", [("Content-Type", "text/plain"),
                                              ("X-Backend", name)])
            return [f"{name} status {code}\n".encode()]
        if parts[0] == "size" and len(parts) > 1:
            size = int(parts[1])
            start_response("200 OK", [("Content-Length", str(size)), ("X-Backend", name)])
            return [b"x" * size]
        if parts[0] == "pattern" and len(parts) > 1:
            body = pattern(int(parts[1]))
            start_response("200 OK", [("Content-Length", str(len(body))), ("X-Backend", name)])
            return [body]
        if parts[0] == "chunked" and len(parts) > 1:
            size = int(parts[1])
            start_response("200 OK", [("X-Backend", name)])
            return (b"y" * min(1000, size - i) for i in range(0, size, 1000))
        if parts[0] == "slow" and len(parts) > 1:
            gevent.sleep(float(parts[1]))
        if parts[0] == "echo-body":
            start_response("200 OK", [("Content-Length", str(len(body))), ("X-Backend", name)])
            return [body]
        if parts[0] == "once":
            answered_once.append(path)
        if parts[0] == "once-log":
            payload = json.dumps(answered_once).encode()
            start_response("200 OK", [("Content-Length", str(len(payload))),
                                      ("Content-Type", "application/json")])
            return [payload]
        if parts[0] == "peer":
            payload = json.dumps({"backend": name,
                                  "peer_port": int(environ.get("REMOTE_PORT") or 0)}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(payload))),
                                      ("X-Backend", name)])
            return [payload]
        if parts[0] == "set-cookie" and len(parts) > 2:
            start_response("200 OK", [("Set-Cookie", f"{parts[1]}={parts[2]}; Path=/"),
                                      ("Content-Type", "application/json"),
                                      ("X-Backend", name)])
            return [json.dumps({"backend": name}).encode()]
        payload = json.dumps({"backend": name, "method": environ["REQUEST_METHOD"],
                              "path": path, "query": environ.get("QUERY_STRING", ""),
                              "target": environ.get("mplb.target"),
                              "headers": headers_of(environ), "body_len": len(body)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(payload))), ("X-Backend", name)])
        return [payload]

    def websocket(ws, environ):
        ws.send(json.dumps({"backend": name, "type": "welcome"}))
        while True:
            message = ws.receive()
            if message is None:
                break
            if message == "cmd:request":
                ws.send(json.dumps({"method": environ["REQUEST_METHOD"],
                                    "target": environ.get("mplb.target"),
                                    "headers": headers_of(environ)}))
                continue
            ws.send(message, binary=isinstance(message, (bytes, bytearray)))
        return []

    return app


class RawHandler(WebSocketHandler):
    """Adds the misbehaving endpoints that need the raw socket."""

    def get_environ(self):
        environ = super().get_environ()
        environ["mplb.target"] = self.path           # the request target as received
        return environ

    def handle_one_response(self):
        if self.path == "/truncate":
            self.socket.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            self.close_connection = True
            return
        if self.path == "/truncate-big":
            self.socket.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n"
                                + pattern(600 * 1024))
            self.close_connection = True
            return
        if self.path == "/hop":
            # Hop-by-hop response headers, including one named by Connection.
            self.socket.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                b"Connection: X-Secret\r\nX-Secret: s\r\n"
                                b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
                                b"Trailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\n"
                                b"X-Kept: yes\r\n\r\nok")
            self.close_connection = True
            return
        if self.path == "/fake-101":
            self.socket.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\n\r\n\x81\x02hi")
            self.close_connection = True
            return
        if self.path == "/garbage":
            self.socket.sendall(b"\x00\x01 this is not http\r\n\r\n")
            self.close_connection = True
            return
        return super().handle_one_response()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    server = WSGIServer((args.host, args.port), make_app(args.name), handler_class=RawHandler,
                        log=None, error_log=None)
    gevent.signal_handler(signal.SIGTERM, lambda: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
