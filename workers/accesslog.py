"""The access log: nginx's combined format plus upstream address, status and time.

One line per request, and one line per tunnel when it ends (its duration and bytes).
Durations come from the monotonic clock alone (CLOCK_MONOTONIC is one clock for every
process of the host, so a tunnel handed to another worker keeps its start), never
from the wall clock, which can step backwards.
Lines are buffered per worker and flushed at least once a second and at exit.
The worker never opens the file: it writes to a descriptor the master opened
(mplb.logfiles), and USR1 hands it a new one.
"""
from __future__ import annotations

import os
import time


def _quote(text: str) -> str:
    """Escape what could forge a log line: quotes, backslashes, control bytes."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\' or code < 0x20 or code >= 0x7f:
            out.append("\\x%02X" % (code & 0xFF) if code < 0x100 else "?")
        else:
            out.append(char)
    return "".join(out)


class AccessLog:
    """Buffered writer of access log lines for one worker (``fd`` None: no access log)."""

    def __init__(self, fd):
        self.enabled = fd is not None
        self._file = None
        self._lines = []
        self._last_flush = time.monotonic()
        if self.enabled:
            self._file = _writer(fd)

    def _write(self, line):
        self._lines.append(line)
        now = time.monotonic()
        if len(self._lines) >= 64 or now - self._last_flush >= 1.0:
            self.flush()
            self._last_flush = now

    def _prefix(self, conn, request):
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        line = _quote(f"{request.method} {request.url.decode('latin-1')} HTTP/{request.version}")
        return f'{conn.client_ip} - - [{stamp}] "{line}"'

    def request(self, conn, request, status, sent, server, upstream_status):
        referer = _quote(request.header("referer") or "-")
        agent = _quote(request.header("user-agent") or "-")
        upstream = server.hostport if server is not None else "-"
        elapsed = time.monotonic() - request.started
        self._write(f'{self._prefix(conn, request)} {status} {sent} "{referer}" "{agent}" '
                    f'upstream={upstream} upstream_status={upstream_status or "-"} '
                    f'request_time={elapsed:.3f}\n')

    def tunnel_line(self, record, server, duration, bytes_in, bytes_out):
        """One line when a tunnel ends: its whole duration and bytes, across handovers."""
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        line = _quote(f"{record.method} {record.url} HTTP/{record.version}")
        agent = _quote(record.user_agent or "-")
        self._write(f'{record.client[0]} - - [{stamp}] "{line}" 101 {bytes_out} "-" '
                    f'"{agent}" upstream={server.hostport} upstream_status=101 '
                    f'tunnel_time={duration:.3f} bytes_in={bytes_in} bytes_out={bytes_out}\n')

    def flush(self):
        if self._file is not None and self._lines:
            self._file.write("".join(self._lines))
            self._file.flush()
            self._lines.clear()

    def replace(self, fd):
        """USR1: write from now on to ``fd``, the file the master opened anew."""
        if not self.enabled:
            os.close(fd)
            return
        self.flush()
        self._file.close()
        self._file = _writer(fd)


def _writer(fd):
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")
