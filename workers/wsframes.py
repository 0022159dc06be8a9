"""WebSocket frame-boundary tracking for tunnels with keepalive framing on.

Only headers are parsed (FIN, opcode, mask, 7/16/64-bit length); payload bytes are
counted, never copied or inspected, so relaying stays cheap.  Knowing where frames end
lets the tunnel inject its own Ping/Close frames between frames, and holding back the
few bytes of a candidate Pong lets it swallow the answers to its own pings.
"""
from __future__ import annotations

import os

OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
PING_MAGIC = b"mplb"
PING_LEN = 12                   # b'mplb' + 4-byte worker token + 4-byte counter
CLOSE_GOING_AWAY = 1001


class ProtocolError(Exception):
    """The byte stream cannot be a WebSocket stream (e.g. a 64-bit length with the MSB set)."""


def parse_header(data) -> tuple | None:
    """Return (header_len, byte0, payload_len, masked) or None when `data` is too short."""
    n = len(data)
    if n < 2:
        return None
    b1 = data[1]
    plen = b1 & 0x7F
    masked = b1 & 0x80
    hlen = 2
    if plen == 126:
        if n < 4:
            return None
        plen = (data[2] << 8) | data[3]
        hlen = 4
    elif plen == 127:
        if n < 10:
            return None
        plen = int.from_bytes(data[2:10], "big")
        if plen >> 63:
            raise ProtocolError("64-bit payload length with the high bit set")
        hlen = 10
    if masked:
        hlen += 4
        if n < hlen:
            return None
    return hlen, data[0], plen, masked


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR `payload` with the 4-byte `key` (RFC 6455 5.3); only used for tiny control frames."""
    return bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def build_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """A single FIN control frame; masked (random key) when it goes client->server."""
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + mask_bytes(payload, key)


def close_payload(code: int) -> bytes:
    return code.to_bytes(2, "big")


class FrameTracker:
    """Tracks frame boundaries of one direction and filters out mplb's own Pongs.

    `feed(view)` returns what must be forwarded: usually `view` itself (fast path, the
    whole chunk is payload of the current frame); a Pong whose payload length matches
    mplb's pings is held (at most 14 + 12 bytes) until complete and dropped when it
    carries `prefix`.  A header split across reads is held until complete, so the
    emitted stream is always either inside a frame (`need` > 0) or at a boundary.
    """

    __slots__ = ("need", "head", "held", "held_need", "close_seen", "prefix", "pongs",
                 "old_prefix")

    def __init__(self, prefix: bytes | None):
        self.need = 0                 # payload bytes of the current frame still to pass
        self.head = b""               # partial header waiting for its remaining bytes
        self.held = None              # bytearray: a candidate Pong being held back
        self.held_need = 0
        self.close_seen = False       # a Close frame went through this direction
        self.prefix = prefix          # 8-byte payload prefix of our pings; None: no filter
        self.pongs = 0                # our pongs swallowed so far
        self.old_prefix = None        # a previous worker's prefix (tunnel handed over)

    def at_boundary(self) -> bool:
        """True when everything forwarded so far ends exactly at a frame end."""
        return self.need == 0

    def feed(self, mv):
        n = len(mv)
        need = self.need
        if need >= n:                 # hot path: pure payload
            self.need = need - n
            return mv
        out = []
        start = 0                     # start of the current run forwarded as-is
        i = need
        self.need = 0
        while i < n:
            if self.need:
                take = min(self.need, n - i)
                i += take
                self.need -= take
                continue
            if self.held is not None:
                take = min(self.held_need, n - i)
                self.held += mv[i:i + take]
                i += take
                start = i
                self.held_need -= take
                if self.held_need == 0:
                    frame = bytes(self.held)
                    self.held = None
                    if self._is_ours(frame):
                        self.pongs += 1
                    else:
                        out.append(frame)
                continue
            old = self.head
            avail = old + bytes(mv[i:i + 14]) if old else mv[i:i + 14]
            parsed = parse_header(avail)
            if parsed is None:        # header continues in the next read: hold it
                if i > start:
                    out.append(mv[start:i])
                self.head = bytes(avail)
                start = i = n
                break
            hlen, b0, plen, _ = parsed
            used = hlen - len(old)
            opcode = b0 & 0x0F
            if opcode == OP_CLOSE:
                self.close_seen = True
            if (opcode == OP_PONG and b0 & 0x80 and plen == PING_LEN
                    and self.prefix is not None):
                if i > start:
                    out.append(mv[start:i])
                self.held = bytearray(avail[:hlen])
                self.held_need = plen
                self.head = b""
                i += used
                start = i
                if plen == 0:
                    self.held_need = 0
                continue
            if old:
                if i > start:
                    out.append(mv[start:i])
                out.append(old)
                self.head = b""
                start = i
            i += used
            self.need = plen
        if start == 0 and not out:
            return mv
        if start < n:
            out.append(mv[start:n])
        return b"".join(out)

    def _is_ours(self, frame: bytes) -> bool:
        hlen, _, _, masked = parse_header(frame)
        payload = frame[hlen:]
        if masked:
            payload = mask_bytes(payload, frame[hlen - 4:hlen])
        return payload[:8] == self.prefix or payload[:8] == self.old_prefix

    def export(self) -> dict:
        """The tracking state, so another worker can carry on mid-stream (handover)."""
        return {"need": self.need, "head": self.head.hex(),
                "held": self.held.hex() if self.held is not None else None,
                "held_need": self.held_need, "close_seen": self.close_seen,
                "prefix": self.prefix.hex() if self.prefix else None}

    def restore(self, state: dict) -> None:
        """Continue from ``export()`` of a tracker in another process."""
        self.need = int(state["need"])
        self.head = bytes.fromhex(state["head"])
        self.held = bytearray.fromhex(state["held"]) if state["held"] is not None else None
        self.held_need = int(state["held_need"])
        self.close_seen = bool(state["close_seen"])
        if state.get("prefix"):
            self.old_prefix = bytes.fromhex(state["prefix"])
