"""A `websockets` (asyncio) echo backend for end-to-end tunnel tests.

Run as ``python tests/ws_server.py --port P --name NAME``.  permessage-deflate is on
(the library default), no keepalive pings of its own, no message size limit.

Every connection first gets a welcome text message, JSON::

    {"type": "welcome", "backend": NAME, "path": PATH, "subprotocol": "chat" | null,
     "extensions": ["permessage-deflate", ...]}

then each message is echoed back frame by frame (a fragmented message comes back with
the same fragments, text as text, binary as binary), except text commands:

- ``cmd:close CODE REASON``: the server closes with that code and reason
- ``cmd:ping PAYLOAD``: the server pings the client, waits for its Pong, answers
  ``pong-ok PAYLOAD``
- ``cmd:stats``: JSON ``{"pings": N, "pongs": N, "frames": N}`` control frames this
  connection received from its client so far (a Pong the server did not solicit
  shows up in ``pongs`` like any other)
- ``cmd:closed ID``: JSON of how connection ``?id=ID`` ended:
  ``{"code": C, "reason": R, "pings": N, "pongs": N}`` or ``null`` while it is open

Subprotocols: ``chat`` is chosen when offered, else ``v2.proto``, else none.
"""
import argparse
import asyncio
import json
import signal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

ENDED = {}          # connection id -> how it ended


class CountingConnection(ServerConnection):
    """Counts the control frames the client sent (the library answers pings itself)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = {"pings": 0, "pongs": 0, "frames": 0}

    def process_event(self, event):
        opcode = getattr(event, "opcode", None)
        if opcode is not None:
            self.counts["frames"] += 1
            if opcode is Opcode.PING:
                self.counts["pings"] += 1
            elif opcode is Opcode.PONG:
                self.counts["pongs"] += 1
        super().process_event(event)


def select_subprotocol(connection, offered):
    for name in ("chat", "v2.proto"):
        if name in offered:
            return name
    return None


def make_handler(name):
    async def handler(ws):
        path = ws.request.path
        query = parse_qs(urlsplit(path).query)
        conn_id = query.get("id", [None])[0]
        extensions = [ext.name for ext in ws.protocol.extensions]
        await ws.send(json.dumps({"type": "welcome", "backend": name, "path": path,
                                  "subprotocol": ws.subprotocol, "extensions": extensions}))
        try:
            while True:
                fragments = []
                async for fragment in ws.recv_streaming():
                    fragments.append(fragment)
                if fragments and isinstance(fragments[0], str) and \
                        "".join(fragments).startswith("cmd:"):
                    await command(ws, "".join(fragments))
                    continue
                if len(fragments) == 1:
                    await ws.send(fragments[0])
                else:
                    await ws.send(fragments)
        except ConnectionClosed:
            pass
        finally:
            if conn_id is not None:
                rcvd = ws.protocol.close_rcvd
                ENDED[conn_id] = {"code": rcvd.code if rcvd else None,
                                  "reason": rcvd.reason if rcvd else None,
                                  **ws.counts}

    async def command(ws, text):
        parts = text.split(" ", 2)
        verb = parts[0]
        if verb == "cmd:close":
            await ws.close(int(parts[1]), parts[2] if len(parts) > 2 else "")
        elif verb == "cmd:ping":
            payload = parts[1] if len(parts) > 1 else ""
            waiter = await ws.ping(payload.encode())
            await asyncio.wait_for(waiter, 30)
            await ws.send(f"pong-ok {payload}")
        elif verb == "cmd:stats":
            await ws.send(json.dumps(ws.counts))
        elif verb == "cmd:closed":
            await ws.send(json.dumps(ENDED.get(parts[1])))
        else:
            await ws.send(f"unknown command {verb}")

    return handler


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="wsbackend")
    args = parser.parse_args()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(make_handler(args.name), args.host, args.port,
                     create_connection=CountingConnection,
                     select_subprotocol=select_subprotocol, ping_interval=None,
                     max_size=None, max_queue=None, backlog=2048):
        await stop


if __name__ == "__main__":
    asyncio.run(main())
