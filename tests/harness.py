"""Helpers for end-to-end tests: free ports, real mplb processes, real backends.

Every process is started in its own session and stopped by pid (its process group) at
the end; every wait polls a condition against a deadline instead of sleeping blindly.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _port_candidates():
    """Ports below the kernel's ephemeral range, from a random start.

    A port the kernel hands out with ``bind(0)`` is an ephemeral port, so
    any client socket opened between the test choosing it and mplb binding
    it may take it ("address already in use").  Ports below the range are
    never given to outgoing connections; each is handed out once per run.
    """
    low, _ = _ephemeral_range()
    first, last = 20000, max(20500, low - 1)
    span = last - first + 1
    start = random.randrange(span)
    for i in range(span):
        yield first + (start + i) % span


_PORTS = _port_candidates()


def _bindable(port: int) -> bool:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                continue
            return False
    return True


def free_port(host="127.0.0.1") -> int:
    """A TCP port free on every address, never the same twice in one run."""
    for port in _PORTS:
        if _bindable(port):
            return port
    raise RuntimeError("no free TCP port left below the ephemeral range")


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def wait_for(predicate, timeout=15.0, interval=0.02, message="condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def port_open(port, host="127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mplb_command():
    exe = shutil.which("mplb", path=os.path.dirname(sys.executable) + os.pathsep +
                       os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "mplb"]


class Process:
    """A child process in its own session, with its output captured to a file."""

    def __init__(self, argv, env=None, cwd=None, name="process"):
        self.name = name
        self.log_path = tempfile.mktemp(prefix=f"mplb-test-{name}-", suffix=".log")
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=cwd or ROOT, env=full_env, start_new_session=True)
        self.pid = self.proc.pid

    @contextlib.contextmanager
    def stopped_on_failure(self):
        """Stop the process when its start-up checks fail or are interrupted (Ctrl-C),
        so that no caller is left with a running process it has no handle on."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum):
        if self.alive():
            os.kill(self.pid, signum)

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout=5.0):
        """TERM the process group, then KILL what is left."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        self._log.close()


class Backend(Process):
    """tests/backend_server.py: HTTP test endpoints and a WebSocket echo."""

    def __init__(self, name=None, port=None, host="127.0.0.1"):
        self.port = port or free_port(host)
        self.host = host
        self.backend_name = name or f"b{self.port}"
        super().__init__([sys.executable, os.path.join(HERE, "backend_server.py"),
                          "--port", str(self.port), "--name", self.backend_name,
                          "--host", host], name=self.backend_name)
        with self.stopped_on_failure():
            wait_for(lambda: port_open(self.port, host) or self._died(),
                     message=f"backend {self.port}")
            if not self.alive():
                raise RuntimeError(f"backend failed to start:\n{self.output()}")

    def _died(self):
        return not self.alive()

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"


class Mplb(Process):
    """A real mplb master (and its workers) on a configuration written to a temp file."""

    def __init__(self, config_text, workers=1, verbose=True, extra_args=(), wait_ports=None,
                 name="mplb", command=None):
        """``command``: the mplb program as an argv list (default ``mplb_command()``)."""
        self.dir = tempfile.mkdtemp(prefix="mplb-test-")
        self.conf = os.path.join(self.dir, "mplb.conf")
        with open(self.conf, "w") as handle:
            handle.write(config_text)
        self.pid_file = os.path.join(self.dir, "mplb.pid")
        argv = list(command or mplb_command()) + ["-conf", self.conf, "-pid", self.pid_file]
        if workers:
            argv += ["-workers", str(workers)]
        if verbose:
            argv.append("-v")
        argv += list(extra_args)
        super().__init__(argv, name=name)
        with self.stopped_on_failure():
            for port in wait_ports or ():
                wait_for(lambda: port_open(port) or not self.alive(),
                         message=f"mplb port {port}")
                if not self.alive():
                    raise RuntimeError(f"mplb exited early:\n{self.output()}")
            if wait_ports:
                wait_for(lambda: len(self.worker_pids()) >= (workers or 1),
                         message="mplb workers")

    def worker_pids(self):
        """Pids of this master's live children (its workers)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as handle:
                return [int(pid) for pid in handle.read().split()]
        except OSError:
            return []

    def rewrite(self, config_text):
        with open(self.conf, "w") as handle:
            handle.write(config_text)

    def stop(self, timeout=5.0):
        super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)


def http_request(port, raw: bytes, timeout=10.0, host="127.0.0.1") -> bytes:
    """Send raw bytes, read until the server closes (or timeout); return everything read."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def get(port, path="/", headers=None, timeout=10.0, host="127.0.0.1"):
    """A simple GET with http.client; returns (status, headers dict, body bytes)."""
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def get_json(port, path="/", headers=None):
    status, _, body = get(port, path, headers)
    return status, json.loads(body)


def raw_exchange(port, raw: bytes, timeout=10.0, host="127.0.0.1", shutdown_write=False):
    """Send raw bytes and read until the server closes or ``timeout`` passes.

    Returns ``(data, closed)``: everything read, and whether the server closed (or
    reset) the connection before the deadline.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass       # the server may answer and close before reading everything
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), False
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except socket.timeout:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not data:
                return b"".join(chunks), True
            chunks.append(data)


class Response:
    """One parsed HTTP/1.x response: status, headers (lower-case names), body."""

    def __init__(self, status, reason, headers, body, version=b"HTTP/1.1", chunked=False):
        self.status = status
        self.reason = reason
        self.headers = headers          # list of (lower-case name str, value str)
        self.body = body
        self.version = version
        self.chunked = chunked

    def header(self, name):
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} body={self.body[:80]!r}>"


def parse_responses(data: bytes, head_only=(), allow_partial=False):
    """Split raw bytes into Response objects (Content-Length, chunked or until close).

    ``head_only`` holds the indexes of responses to HEAD requests (no body).  A
    truncated last response raises ValueError unless ``allow_partial``.
    """
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ValueError(f"incomplete response head: {data[pos:pos + 200]!r}")
        lines = data[pos:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        status = int(code)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"),
                            value.strip().decode("latin-1")))
        pos = end + 4
        names = dict(headers)
        chunked = "chunked" in names.get("transfer-encoding", "").lower()
        if status == 101:
            # Switching Protocols: whatever follows belongs to the tunnel, not HTTP.
            out.append(Response(status, reason, headers, data[pos:], version))
            break
        if 100 <= status < 200 or status in (204, 304) or len(out) in head_only:
            body = b""
        elif chunked:
            parts = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    if allow_partial:
                        break
                    raise ValueError("truncated chunked body")
                size = int(data[pos:line_end].split(b";")[0], 16)
                pos = line_end + 2
                if size == 0:
                    trailer_end = data.find(b"\r\n", pos)
                    pos = trailer_end + 2 if trailer_end >= 0 else len(data)
                    break
                if pos + size + 2 > len(data) and not allow_partial:
                    raise ValueError("truncated chunk")
                parts.append(data[pos:pos + size])
                pos += size + 2
            body = b"".join(parts)
        elif "content-length" in names:
            size = int(names["content-length"])
            body = data[pos:pos + size]
            if len(body) < size and not allow_partial:
                raise ValueError(f"truncated body: {len(body)} of {size}")
            pos += size
        else:
            body = data[pos:]
            pos = len(data)
        out.append(Response(status, reason, headers, body, version, chunked))
    return out


class RawConnection:
    """A client connection that sends raw bytes and reads one response at a time."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.closed = False

    def send(self, raw: bytes):
        self.sock.sendall(raw)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0 or self.closed:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def read_response(self, head_only=False) -> Response:
        """Read exactly one complete response (raises AssertionError on timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                try:
                    responses = parse_responses(self.buffer, head_only={0} if head_only else ())
                    response = responses[0]
                    complete = True
                except ValueError:
                    complete = False
                if complete and (response.status < 200 or response.status == 101):
                    self.buffer = self.buffer[end + 4:]
                    return response
                if complete and (response.header("content-length") is not None
                                 or response.chunked or head_only
                                 or response.status in (204, 304)):
                    self.buffer = self.buffer[self._length(response, end, head_only):]
                    return response
                if self.closed:
                    if complete:
                        self.buffer = b""
                        return response
                    raise AssertionError(f"connection closed mid-response: {self.buffer[:300]!r}")
            elif self.closed:
                raise AssertionError(f"connection closed; read {self.buffer[:300]!r}")
            if not self._fill(deadline) and not self.closed:
                raise AssertionError(f"timed out reading a response; read {self.buffer[:300]!r}")

    def _length(self, response, head_end, head_only):
        """Bytes of the buffer the first response occupies."""
        start = head_end + 4
        if head_only or response.status in (204, 304):
            return start
        if not response.chunked:
            return start + int(response.header("content-length"))
        pos = start
        while True:
            line_end = self.buffer.find(b"\r\n", pos)
            size = int(self.buffer[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                return self.buffer.find(b"\r\n", pos) + 2
            pos += size + 2

    def wait_closed(self, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._fill(deadline)
        return self.closed

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- WebSocket helpers (tests/test_websocket_e2e.py, tests/test_tls.py) ------------------

class WsBackend(Process):
    """tests/ws_server.py: a `websockets` asyncio echo backend (permessage-deflate,
    subprotocols, close/ping commands, per-connection control-frame counts)."""

    def __init__(self, name=None, port=None, host="127.0.0.1"):
        self.port = port or free_port(host)
        self.host = host
        self.backend_name = name or f"ws{self.port}"
        super().__init__([sys.executable, os.path.join(HERE, "ws_server.py"),
                          "--port", str(self.port), "--name", self.backend_name,
                          "--host", host], name=self.backend_name)
        with self.stopped_on_failure():
            wait_for(lambda: port_open(self.port, host) or not self.alive(),
                     message=f"ws backend {self.port}")
            if not self.alive():
                raise RuntimeError(f"ws backend failed to start:\n{self.output()}")

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit (children inherit)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def process_nofile_limit(pid) -> int:
    """The soft 'Max open files' limit of another process (from /proc)."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no open-files limit for pid {pid}")


class RawWebSocket:
    """A minimal WebSocket client on a plain (or TLS) socket, frame by frame.

    It shows exactly what arrives: mplb's own Ping frames, Close frames (or a bare TCP
    close), nothing answered automatically.  Frames it sends are masked (client rule).
    """

    def __init__(self, port, path="/ws", host="127.0.0.1", timeout=10.0, ssl_context=None,
                 headers=(), early=b"", host_header=None):
        import base64
        sock = socket.create_connection((host, port), timeout=timeout)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.buffer = b""
        self.eof = False
        key = self.key = base64.b64encode(os.urandom(16)).decode()
        host_header = host_header or f"{host}:{port}"
        head = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n")
        head += "".join(f"{name}: {value}\r\n" for name, value in headers)
        # ``early``: bytes (frames) sent in the same write as the request head
        sock.sendall((head + "\r\n").encode() + early)
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill(deadline):
                raise AssertionError(f"no upgrade response: {self.buffer[:300]!r}")
        end = self.buffer.index(b"\r\n\r\n")
        self.head = self.buffer[:end].decode("latin-1")
        self.buffer = self.buffer[end + 4:]
        self.status = int(self.head.split()[1])

    def _fill(self, deadline) -> bool:
        left = deadline - time.monotonic()
        if left <= 0 or self.eof:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except OSError as exc:          # ssl.SSLError on a TLS-level EOF and the like
            if "timed out" in str(exc):
                return False
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def send_frame(self, opcode, payload=b"", fin=True):
        self.sock.sendall(self.frame(opcode, payload, fin))

    @staticmethod
    def frame(opcode, payload=b"", fin=True) -> bytes:
        """A masked client frame."""
        import struct
        key = os.urandom(4)
        n = len(payload)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            head = bytes((first, 0x80 | n))
        elif n < 65536:
            head = bytes((first, 0x80 | 126)) + struct.pack(">H", n)
        else:
            head = bytes((first, 0x80 | 127)) + struct.pack(">Q", n)
        masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        return head + key + masked

    def send_text(self, text):
        self.send_frame(0x1, text.encode())

    def send_close(self, code=1000, reason=""):
        import struct
        self.send_frame(0x8, struct.pack(">H", code) + reason.encode())

    def recv_frame(self, timeout=10.0):
        """(fin, opcode, payload) of the next frame, or None on EOF/timeout (see .eof)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            if not self._fill(deadline):
                return None

    def _parse(self):
        buf = self.buffer
        if len(buf) < 2:
            return None
        n = buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = int.from_bytes(buf[2:10], "big"), 10
        if buf[1] & 0x80:
            pos += 4                     # servers never mask; tolerate it anyway
        if len(buf) < pos + n:
            return None
        payload = buf[pos:pos + n]
        if buf[1] & 0x80:
            key = buf[pos - 4:pos]
            payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        self.buffer = buf[pos + n:]
        return bool(buf[0] & 0x80), buf[0] & 0x0F, payload

    def recv_data(self, timeout=10.0):
        """The next data frame's payload, skipping (and recording) control frames."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                raise AssertionError(f"no data frame (eof={self.eof})")
            if frame[1] in (0x1, 0x2, 0x0):
                return frame[2]
            self.controls.append(frame)

    @property
    def controls(self):
        if not hasattr(self, "_controls"):
            self._controls = []
        return self._controls

    def wait_eof(self, timeout=10.0):
        """Read (and keep) frames until the peer closes the TCP connection."""
        deadline = time.monotonic() + timeout
        frames = []
        while not self.eof and time.monotonic() < deadline:
            frame = self._parse()
            if frame is not None:
                frames.append(frame)
                continue
            self._fill(deadline)
        while True:
            frame = self._parse()
            if frame is None:
                break
            frames.append(frame)
        return self.eof, frames

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Headless Chromium from Debian's package, driven by Playwright (never a downloaded
# browser); the flags keep it off the network this machine does not have.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)


def browser_marks(timeout=180):
    """pytest marks for a browser test module: a time bound, skip without Chromium."""
    import pytest
    return [pytest.mark.timeout(timeout),
            pytest.mark.skipif(not os.path.exists(CHROMIUM),
                               reason=f"{CHROMIUM} is not installed")]


class Stack:
    """An mplb in front of named test backends; started together, stopped together.

    ``config`` is a template: ``{b1}``, ``{b2}`` ... are the backends' URLs, ``{port}``
    mplb's listen port, and any keyword given here (e.g. ``dead=free_port()``) too.
    """

    def __init__(self, config, backends=("b1",), workers=2, **values):
        self.backends = []
        self.mplb = None
        try:
            self.backends = [Backend(name) for name in backends]
            self.port = free_port()
            urls = {f"b{i + 1}": backend.url for i, backend in enumerate(self.backends)}
            self.values = dict(values, port=self.port, **urls)
            self.mplb = Mplb(config.format(**self.values), workers=workers,
                             wait_ports=[self.port])
            self.mplb.port, self.mplb.backends = self.port, tuple(self.backends)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.mplb is not None:
            self.mplb.stop()
        for backend in self.backends:
            backend.stop()


@contextlib.contextmanager
def backend_pool(prefix, count=3):
    """``count`` test backends named ``<prefix>0``, ``<prefix>1`` ..., stopped at the end."""
    started = []
    try:
        for index in range(count):
            started.append(Backend(f"{prefix}{index}"))
        yield started
    finally:
        for backend in started:
            backend.stop()


def fake_segment(path, pid, version=None, magic=None):
    """A shared segment file as a master ``pid`` leaves it when killed (no lock held);
    ``version`` and ``magic`` default to this mplb's."""
    from mplb.shm import layout
    header, total = layout.segment_layout(1, 1, 16, 1)
    header = bytearray(header)
    header[:8] = magic or layout.MAGIC
    struct.pack_into("<q", header, layout.HDR_VERSION * 8, version or layout.VERSION)
    struct.pack_into("<q", header, layout.HDR_MASTER_PID * 8, pid)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(total)
