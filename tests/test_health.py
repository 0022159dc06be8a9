"""Active health checks against a tiny real HTTP server on 127.0.0.1."""
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mplb.config.model import Config, HealthCheck, Upstream, UpstreamServer
from mplb.health import HealthChecker, check_server
from mplb.shm import SharedState
from tests.harness import free_port


class Backend:
    """HTTP server whose status code the test controls."""

    def __init__(self):
        backend = self
        self.status = 200

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(backend.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def server_at(port):
    return UpstreamServer(url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port,
                          address="127.0.0.1")


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture
def shared(tmp_path):
    state = SharedState.create(str(tmp_path / f"mplb.{os.getpid()}"), max_workers=2,
                               max_servers=16, table_entries=16)
    yield state
    state.close()
    state.unlink()


def config_for(*servers, check=HealthCheck(interval=0.02, fails=2, passes=2, timeout=0.5)):
    return Config(path="t.conf", worker_processes=1,
                  upstreams={"backend": Upstream("backend", servers=servers, health_check=check)})


def test_check_server_results():
    backend = Backend()
    try:
        check = HealthCheck(timeout=1.0)
        assert check_server(server_at(backend.port), check) == (True, "status 200")
        backend.status = 302
        assert check_server(server_at(backend.port), check)[0]
        backend.status = 503
        assert check_server(server_at(backend.port), check) == (False, "status 503")
    finally:
        backend.close()
    assert check_server(server_at(free_port()), check) == (False, "connection refused")


def test_check_server_timeout_on_silent_backend():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert check_server(server_at(port), HealthCheck(timeout=0.1)) == (False, "timed out")


def test_consecutive_thresholds(shared):
    results = []
    checker = HealthChecker(config_for(server_at(1)), shared,
                            check=lambda server, check: results.pop(0))
    sid = shared.server_id("http://127.0.0.1:1")
    target = list(checker.targets.values())
    for outcome, down in [(False, False), (True, False), (False, False), (False, True),
                          (True, True), (True, False)]:
        results.append((outcome, "x"))
        checker.run_checks(target)
        assert shared.health_down(sid) is down


def test_checker_marks_down_and_up(shared, caplog):
    backend = Backend()
    dead = server_at(free_port())
    checker = HealthChecker(config_for(server_at(backend.port), dead), shared)
    live_sid = shared.server_id(f"http://127.0.0.1:{backend.port}")
    dead_sid = shared.server_id(dead.url)
    caplog.set_level(logging.WARNING, logger="mplb.health")
    checker.start()
    try:
        wait_for(lambda: shared.health_down(dead_sid))
        assert not shared.health_down(live_sid)
        assert f"upstream backend server 127.0.0.1:{dead.port} is down " \
               "(health check: connection refused)" in caplog.text
        backend.status = 500
        wait_for(lambda: shared.health_down(live_sid))
        backend.status = 204
        wait_for(lambda: not shared.health_down(live_sid))
        assert f"server 127.0.0.1:{backend.port} is up" in caplog.text
        checker.update_config(Config(path="t", worker_processes=1))   # checks removed
        wait_for(lambda: not shared.health_down(dead_sid))   # unchecked: no longer held down
    finally:
        checker.stop()
        backend.close()
