"""A real redis-server for the shared_store tests: own port, own directory, no persistence.

Started in its own session on a free loopback port (tests.harness.free_port) in a
temporary directory with ``--save "" --appendonly no``, stopped by pid.  ``stall`` and
``resume`` send SIGSTOP and SIGCONT; ``kill`` and ``start`` take it down and bring it
back on the same port, empty, as a crashed and restarted server would be.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile

import pytest

from tests.harness import Process, free_port, port_open, wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def needs_redis():
    """pytest mark: skip (naming the reason) when Debian's redis-server is missing."""
    return pytest.mark.skipif(not os.path.exists(REDIS_SERVER),
                              reason=f"{REDIS_SERVER} is not installed "
                                     "(scripts/install-system-deps installs it as root)")


def resp_end(buf: bytes, pos: int):
    """Where the RESP value starting at ``pos`` ends, or None if it is not all there."""
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind, head = buf[pos:pos + 1], buf[pos + 1:line_end]
    pos = line_end + 2
    if kind == b"$" and int(head) >= 0:
        return pos + int(head) + 2 if len(buf) >= pos + int(head) + 2 else None
    if kind == b"*":
        for _ in range(max(0, int(head))):
            pos = resp_end(buf, pos)
            if pos is None:
                return None
    return pos


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mplb-test-redis-")
        self.process = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self):
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"]
        self.process = Process(argv, name=f"redis{self.port}")
        with self.process.stopped_on_failure():
            wait_for(lambda: self.ping() or not self.process.alive(),
                     message=f"redis-server on {self.port}")
            if not self.process.alive():
                raise RuntimeError(f"redis-server failed:\n{self.process.output()}")

    def ping(self) -> bool:
        """A PING answered with +PONG (within a second)."""
        if not port_open(self.port):
            return False
        return self.command(b"PING") == b"+PONG\r\n"

    def command(self, *args: bytes, timeout=1.0) -> bytes:
        """One RESP command; its whole raw reply (b"" when the server does not answer)."""
        request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                     for a in args)
        reply = b""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(request)
                while resp_end(reply, 0) is None:
                    data = sock.recv(65536)
                    if not data:
                        break
                    reply += data
        except OSError:
            return b""
        return reply

    def stall(self):
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self):
        """SIGKILL: the server and everything it held are gone."""
        self.process.signal(signal.SIGCONT)
        self.process.signal(signal.SIGKILL)
        self.process.wait()
        self.process.stop()

    def stop(self):
        if self.process is not None:
            self.process.signal(signal.SIGCONT)
            self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
