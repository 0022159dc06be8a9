"""Active health checks, run once per instance by the master (not once per worker).

The master never imports gevent, so this uses plain blocking sockets with timeouts: one
scheduler thread wakes when a check is due and runs the due checks on a small thread pool.
Results go to shared memory (single writer: only this module sets the 'down' flag and the
consecutive pass/fail counts), where every worker's eligibility filter reads them.
State is per server URL; if two upstreams check the same URL, the first (by name) wins.

With a shared_store, other instances' checks count too: the store thread hands over the
URLs some other live instance's checks hold down (``set_remote_down``) and a server is
down while either this instance's checks or another's say so.  The flag is still
written here alone, under one lock, from whichever thread learnt something new.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("mplb.health")
MAX_RESPONSE_LINE = 1024


def check_server(server, check) -> tuple:
    """One HTTP/1.0 GET: (passed, reason).  2xx and 3xx pass."""
    host = server.address or server.host
    deadline = time.monotonic() + check.timeout
    try:
        with socket.create_connection((host, server.port), timeout=check.timeout) as sock:
            request = (f"GET {check.uri} HTTP/1.0\r\nHost: {server.hostport}\r\n"
                       f"User-Agent: mplb-health-check\r\nConnection: close\r\n\r\n")
            sock.sendall(request.encode("latin-1"))
            data = b""
            while b"\n" not in data and len(data) < MAX_RESPONSE_LINE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False, "timed out"
                sock.settimeout(remaining)
                chunk = sock.recv(MAX_RESPONSE_LINE - len(data))
                if not chunk:
                    break
                data += chunk
    except ConnectionRefusedError:
        return False, "connection refused"
    except socket.timeout:
        return False, "timed out"
    except OSError as exc:
        return False, exc.strerror or str(exc)
    parts = data.split(b"\n", 1)[0].split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "bad response"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, f"status {status}"
    return False, f"status {status}"


class _Target:
    """One server to check and its consecutive results."""

    __slots__ = ("upstream", "server", "check", "sid", "due", "fails", "passes", "up")

    def __init__(self, upstream, server, check, sid, up):
        self.upstream, self.server, self.check, self.sid = upstream, server, check, sid
        self.due = 0.0
        self.fails = self.passes = 0
        self.up = up


class HealthChecker:
    """Master-side scheduler: ``start()``, ``update_config(config)`` on reload, ``stop()``."""

    def __init__(self, config, shared, check=check_server, clock=time.monotonic):
        self.shared = shared
        self.check = check
        self.clock = clock
        self.targets = {}
        self.sids = {}                 # url -> sid of every configured server
        self.remote_down = frozenset()  # URLs another instance's checks hold down
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = None
        self._pool = None
        self.update_config(config)

    def update_config(self, config) -> None:
        """Take the new configuration's checks; keep results of servers still checked."""
        targets = {}
        for name in sorted(config.upstreams):
            upstream = config.upstreams[name]
            if upstream.health_check is None:
                continue
            for server in upstream.servers:
                if server.url in targets:
                    continue
                old = self.targets.get(server.url)
                sid = self.shared.server_id(server.url)
                target = _Target(name, server, upstream.health_check, sid,
                                 old.up if old else not self.shared.health_down(sid))
                if old is not None:
                    target.fails, target.passes, target.due = old.fails, old.passes, old.due
                targets[server.url] = target
        sids = {server.url: self.shared.server_id(server.url)
                for upstream in config.upstreams.values() for server in upstream.servers}
        with self._lock:
            dropped = [url for url in self.targets if url not in targets]
            self.targets = targets
            for url in dropped:                   # no longer checked: not held down by us
                self._write_flag(url, self.targets_sid(url, sids))
            self.sids = sids
        self._wake.set()

    def targets_sid(self, url, sids):
        old = self.sids.get(url)
        return old if old is not None else sids.get(url)

    def _write_flag(self, url, sid, local_up=None) -> None:
        """The one rule (lock held): down while our checks or another instance's say so."""
        if sid is None:
            return
        if local_up is None:
            target = self.targets.get(url)
            local_up = target is None or target.up
        self.shared.set_health(sid, local_up and url not in self.remote_down)

    def local_down(self) -> list:
        """URLs this instance's own checks hold down (published to the other instances)."""
        with self._lock:
            return [url for url, target in self.targets.items() if not target.up]

    def set_remote_down(self, urls: frozenset) -> None:
        """The store thread: URLs some other live instance's checks hold down now."""
        with self._lock:
            changed, self.remote_down = self.remote_down ^ urls, urls
            for url in changed:
                sid = self.sids.get(url)
                if sid is None:
                    continue
                if url in urls:
                    log.warning("server %s is down (another instance's health check)",
                                url.split("://", 1)[-1])
                else:
                    log.warning("server %s is no longer held down by another instance",
                                url.split("://", 1)[-1])
                self._write_flag(url, sid)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mplb-health")
        self._thread = threading.Thread(target=self._run, name="mplb-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _run(self) -> None:
        while not self._stop:
            now = self.clock()
            with self._lock:
                due = [t for t in self.targets.values() if t.due <= now]
                upcoming = [t.due for t in self.targets.values() if t.due > now]
            if due:
                self.run_checks(due)
                continue
            self._wake.wait(min(upcoming) - now if upcoming else 1.0)
            self._wake.clear()

    def run_checks(self, targets) -> None:
        """Check ``targets`` (in parallel when a pool runs) and record the results."""
        if self._pool is not None:
            results = list(self._pool.map(lambda t: self.check(t.server, t.check), targets))
        else:
            results = [self.check(t.server, t.check) for t in targets]
        now = self.clock()
        for target, (passed, reason) in zip(targets, results):
            target.due = now + target.check.interval
            self.record(target, passed, reason, now)

    def record(self, target, passed: bool, reason: str, now: float) -> None:
        """Count consecutive results; ``fails`` in a row -> down, ``passes`` -> up."""
        check = target.check
        if passed:
            target.passes, target.fails = target.passes + 1, 0
            if not target.up and target.passes >= check.passes:
                target.up = True
                log.warning("upstream %s server %s is up (health check: %s)",
                            target.upstream, target.server.hostport, reason)
        else:
            target.fails, target.passes = target.fails + 1, 0
            if target.up and target.fails >= check.fails:
                target.up = False
                log.warning("upstream %s server %s is down (health check: %s)",
                            target.upstream, target.server.hostport, reason)
        self.shared.set_health_record(target.sid, target.fails, target.passes, now)
        with self._lock:
            self._write_flag(target.server.url, target.sid, target.up)
