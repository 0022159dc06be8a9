"""The control socket between the master and each worker: a tiny framed protocol.

A worker writes, never waits: ``h`` (heartbeat, every second), ``r`` (ready: accepting
and able to adopt tunnels) and, when the configuration has a shared_store, ``e`` plus a
fixed 23-byte body for each new persistence-table entry it made (which table, which
server slot, the key's digest, and whether the entry replaces another).  Frames are
written non-blocking: when the socket is full an entry is dropped and counted (the
master's store thread is then the bottleneck, and a dropped entry only means the other
instances learn that client on its next request); a partial write keeps its unsent tail,
at most one frame, and sends it before anything else so the stream stays framed.

The master reads with :class:`ControlReader`, which keeps less than one frame between
reads and stops at the first byte that starts no frame.  Neither side imports gevent.
"""
from __future__ import annotations

import os
import struct

HEARTBEAT = b"h"
READY = b"r"
ENTRY = b"e"
_ENTRY = struct.Struct("<HiqqB")          # table index, server slot, k1, k2, flags
ENTRY_BYTES = 1 + _ENTRY.size
FIRST = 1                                # made for a new client: first writer wins
READ_CHUNK = 65536


def encode_entry(table_index: int, sid: int, k1: int, k2: int, first: bool) -> bytes:
    return ENTRY + _ENTRY.pack(table_index, sid, k1, k2, FIRST if first else 0)


class ControlWriter:
    """The worker's end: every frame goes through ``send`` so frames never interleave."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pending = b""          # unsent tail of a partly written frame
        self.dropped = 0            # entries the full socket did not take
        self.count_drop = None      # and a callable that counts them where status sees

    def send(self, frame: bytes) -> bool:
        """Write ``frame`` now or not at all (True if written); OSError other than a
        full socket propagates (the master is gone)."""
        data = self.pending + frame
        try:
            written = os.write(self.fd, data)
        except BlockingIOError:
            written = 0
        if written < len(self.pending):          # not even the old tail went out
            self.pending = self.pending[written:]
            return False
        self.pending = data[written:]
        return True

    def announce(self, table, key: bytes, sid: int, first: bool) -> None:
        """A new entry in a cluster table (SharedState.announce): tell the master."""
        k1, k2, _ = table.digest(key)
        try:
            sent = self.send(encode_entry(table.index, sid, k1, k2, first))
        except OSError:
            sent = False                         # the heartbeat notices a lost master
        if not sent:
            self.dropped += 1
            if self.count_drop is not None:
                self.count_drop()


class ControlReader:
    """The master's end for one worker: bytes in, (ready seen, entries, bad byte) out."""

    __slots__ = ("buffer",)

    def __init__(self):
        self.buffer = b""

    def feed(self, data: bytes) -> tuple:
        """Parse what arrived; entries are (table index, sid, k1, k2, first)."""
        buf = self.buffer + data
        ready, bad, entries = False, False, []
        i, n = 0, len(buf)
        while i < n:
            c = buf[i:i + 1]
            if c == HEARTBEAT:
                i += 1
            elif c == READY:
                ready = True
                i += 1
            elif c == ENTRY:
                if n - i < ENTRY_BYTES:
                    break
                index, sid, k1, k2, flags = _ENTRY.unpack_from(buf, i + 1)
                entries.append((index, sid, k1, k2, bool(flags & FIRST)))
                i += ENTRY_BYTES
            else:
                bad = True                       # out of step: drop what is left
                i = n
        self.buffer = buf[i:]
        return ready, entries, bad
