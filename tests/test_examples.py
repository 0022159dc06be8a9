"""End-to-end tests of the WebSocket examples (examples/, etc/*.conf).

They start the example backends (examples/websocket_backend.py) and a real ``mplb``
process on temporary copies of the WebSocket guide's configurations (etc/
websocket-basic.conf, etc/chat.conf, etc/game.conf) with free ports substituted, run
the example client (examples/websocket_client.py --json) through it and check the
echoes, the distribution and the persistence.  The demo script is run end to end on
free ports through its LB_CONF / BACKEND_PORTS overrides.

mplb is $MPLB or the console script installed next to the Python running the
tests (harness.mplb_command); a missing script fails the test.  Every
process is started in its own session and stopped by pid in a finally block.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import free_ports, mplb_command

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ETC = ROOT / "etc"
BACKEND = EXAMPLES / "websocket_backend.py"
CLIENT = EXAMPLES / "websocket_client.py"
DEMO = EXAMPLES / "run_websocket_demo.sh"
PYTHON = sys.executable

pytestmark = pytest.mark.timeout(180)


# ---------------------------------------------------------------------------
# helpers (also used by tests/test_browser.py)
# ---------------------------------------------------------------------------
def need_mplb() -> str:
    """The mplb console script next to the running Python (or $MPLB)."""
    argv = [os.environ["MPLB"]] if os.environ.get("MPLB") else mplb_command()
    if len(argv) != 1:
        pytest.fail("the mplb console script is not installed (pip install -e .)")
    return argv[0]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_until(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Procs:
    """Processes started by a test; stop() ends exactly those, by pid."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, argv: list[str], name: str, env=None) -> subprocess.Popen:
        log = self.logdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=env, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        for p, log in self.procs:
            if p is proc:
                return log.read_text(errors="replace")
        return ""

    def wait_listening(self, proc: subprocess.Popen, port: int, timeout: float = 20):
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited with {proc.returncode} before "
                                     f"listening on {port}:\n{self.log(proc)[-3000:]}")
            return port_open(port)
        wait_until(ready, timeout, f"port {port} ({proc.args[0]})")

    def stop(self):
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # its own session: the group id is its pid (mplb workers included)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)


def start_backends(procs: Procs, ports: list[int], prefix: str = "backend"):
    started = []
    for i, port in enumerate(ports, 1):
        started.append(procs.start([PYTHON, str(BACKEND), "--port", str(port),
                                    "--name", f"{prefix}{i}"], f"{prefix}{i}"))
    for proc, port in zip(started, ports):
        procs.wait_listening(proc, port)
    return started


def local_conf(src: Path, backend_ports: list[int], lb_port: int, dest: Path) -> Path:
    """A copy of ``src`` with 127.0.0.1:8001.. -> backend_ports and listen 8080 -> lb_port."""
    text = src.read_text()
    for i, port in enumerate(backend_ports):
        text = text.replace(f"127.0.0.1:{8001 + i}", f"127.0.0.1:{port}")
        # examples/docker-loadbalancer.conf names the compose services
        text = text.replace(f"http://backend{i + 1}:8001", f"http://127.0.0.1:{port}")
    text, n = re.subn(r"(?m)^(\s*listen\s+)8080\b", rf"\g<1>{lb_port}", text)
    assert n == 1, f"{src}: expected one 'listen 8080'"
    dest.write_text(text)
    return dest


def health(port: int) -> dict:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def start_mplb(procs: Procs, mplb: str, conf: Path, lb_port: int, workers: int):
    proc = procs.start([mplb, "-conf", str(conf), "-v", "-workers", str(workers)], "mplb")
    procs.wait_listening(proc, lb_port)
    return proc


def run_client(url: str, connections: int, reconnects: int, *extra: str,
               timeout: float = 120) -> tuple[int, dict | None, str]:
    res = subprocess.run([PYTHON, str(CLIENT), "--url", url, "--connections",
                          str(connections), "--reconnects", str(reconnects),
                          "--timeout", "5", "--json", *extra],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    try:
        data = json.loads(res.stdout)
    except ValueError:
        data = None
    return res.returncode, data, res.stdout + res.stderr


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()


# ---------------------------------------------------------------------------
# the example backend and client on their own (no mplb needed)
# ---------------------------------------------------------------------------
def test_backend_http_and_websocket(procs):
    import urllib.request

    import websocket

    (port,) = free_ports(1)
    (backend,) = start_backends(procs, [port])
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(base + "/", timeout=5) as r:
        assert r.status == 200 and r.read().decode().strip() == "backend1 OK"
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["backend"] == "backend1"
    with urllib.request.urlopen(base + "/client", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
        assert "new WebSocket(" in page and "<script src" not in page
        assert "http://" not in page.split("<script>")[1]   # no external assets

    # any path upgrades; welcome then echo, every reply naming the backend
    for path in ("/", "/ws", "/game/ws"):
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=5)
        try:
            welcome = json.loads(ws.recv())
            assert welcome["type"] == "welcome" and welcome["backend"] == "backend1"
            ws.send("ping me")
            assert json.loads(ws.recv()) == {"type": "echo", "backend": "backend1",
                                             "echo": "ping me", "client": "127.0.0.1"}
        finally:
            ws.close()

    # chat: /chat broadcasts to every client of this backend
    a = websocket.create_connection(f"ws://127.0.0.1:{port}/chat", timeout=5)
    b = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=5)
    try:
        a.recv(), b.recv()
        a.send("hello room")
        for ws in (a, b):
            msg = json.loads(ws.recv())
            assert msg["type"] == "chat" and msg["text"] == "hello room"
            assert msg["backend"] == "backend1" and msg["clients"] == 2
        b.send(json.dumps({"type": "chat", "text": "from b"}))
        assert json.loads(a.recv())["text"] == "from b"
        assert json.loads(b.recv())["text"] == "from b"

        # SIGTERM: open sockets are closed with 1001 and the process exits 0
        backend.send_signal(signal.SIGTERM)
        assert backend.wait(10) == 0
        a.settimeout(5)
        while True:
            opcode, frame = a.recv_data_frame(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
        assert int.from_bytes(frame.data[:2], "big") == 1001
    finally:
        a.close()
        b.close()


def test_client_against_backend_directly(procs):
    (port,) = free_ports(1)
    start_backends(procs, [port])
    rc, data, out = run_client(f"ws://127.0.0.1:{port}/ws", 5, 2)
    assert rc == 0, out
    assert data["ok"] and data["persistent"] and data["errors"] == []
    assert data["distribution"] == {"backend1": 5}
    assert data["total_distribution"] == {"backend1": 15}

    # human-readable report
    res = subprocess.run([PYTHON, str(CLIENT), "--url", f"ws://127.0.0.1:{port}/",
                          "--connections", "2", "--reconnects", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Distribution" in res.stdout and "Persistence: held" in res.stdout


def test_client_fails_cleanly_when_nothing_listens():
    (port,) = free_ports(1)
    started = time.monotonic()
    rc, data, out = run_client(f"ws://127.0.0.1:{port}/", 3, 2, "--retries", "3",
                               timeout=60)
    assert rc == 1, out
    assert not data["ok"] and "Connection refused" in data["errors"][0]
    assert time.monotonic() - started < 30     # backoff is bounded


# ---------------------------------------------------------------------------
# the guide's configurations, as files
# ---------------------------------------------------------------------------
WS_DIRECTIVES = ["proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                 'proxy_set_header Connection "upgrade";']


@pytest.mark.parametrize("name,expect", [
    ("websocket-basic.conf", ["upstream backend {", "method weighted_round_robin;",
                              "persistence ip_hash;", "listen 8080;",
                              "server_name localhost;", "location / {",
                              "proxy_pass backend;", "proxy_set_header Host $host;",
                              "proxy_set_header X-Real-IP $remote_addr;"]),
    ("chat.conf", ["upstream chat_backend {", "method least_connections;",
                   "persistence ip_hash;", "listen 8080;", "location /ws {",
                   "proxy_pass chat_backend;", "server_name chat.example.com;"]),
    ("game.conf", ["upstream game_backend {", "method weighted_round_robin;",
                   "persistence cookie;", "server http://127.0.0.1:8001 weight=3;",
                   "server http://127.0.0.1:8002 weight=1;", "location /game/ws {",
                   "proxy_pass game_backend;", "server_name game.example.com;"]),
])
def test_guide_configs_as_written(name, expect):
    text = (ETC / name).read_text()
    for line in expect + WS_DIRECTIVES:
        assert line in text, f"{name} lacks {line!r}"


@pytest.mark.parametrize("name", ["websocket-basic.conf", "chat.conf", "game.conf"])
def test_guide_configs_pass_mplb_t(name):
    mplb = need_mplb()
    res = subprocess.run([mplb, "-t", "-conf", str(ETC / name)], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "test is successful" in res.stdout + res.stderr


# ---------------------------------------------------------------------------
# through mplb
# ---------------------------------------------------------------------------
def test_basic_conf_ip_hash(procs, tmp_path):
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports)
    conf = local_conf(ETC / "websocket-basic.conf", bports, lb, tmp_path / "basic.conf")
    # two workers: the ip_hash table is shared, so the client sticks whichever accepts
    start_mplb(procs, mplb, conf, lb, workers=2)
    for path in ("/", "/ws"):
        rc, data, out = run_client(f"ws://127.0.0.1:{lb}{path}", 12, 3)
        assert rc == 0, out
        assert data["ok"] and data["errors"] == []
        # one client IP (127.0.0.1) -> one backend, for every connection
        assert len(data["total_distribution"]) == 1, data["total_distribution"]
        assert sum(data["total_distribution"].values()) == 48
        assert data["persistent"]


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="needs all of 127.0.0.0/8 on loopback (Linux)")
def test_basic_conf_ip_hash_many_clients(procs, tmp_path):
    """30 clients with their own addresses: WRR 1:1:1 spreads them 10/10/10 exactly
    (one worker), and ip_hash keeps each one on its backend."""
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports)
    conf = local_conf(ETC / "websocket-basic.conf", bports, lb, tmp_path / "basic.conf")
    start_mplb(procs, mplb, conf, lb, workers=1)
    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/ws", 30, 2, "--distinct-ips")
    assert rc == 0, out
    assert data["distribution"] == {"backend1": 10, "backend2": 10, "backend3": 10}
    assert data["persistent"], data["moved_clients"]
    for c in data["clients"]:   # X-Real-IP $remote_addr reached the backend
        assert c["seen_as"] == [c["source_ip"]], c


def test_chat_conf_least_connections_ip_hash(procs, tmp_path):
    import websocket

    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports, prefix="chat")
    conf = local_conf(ETC / "chat.conf", bports, lb, tmp_path / "chat.conf")
    mplb_proc = start_mplb(procs, mplb, conf, lb, workers=2)
    if sys.platform.startswith("linux"):
        # 12 clients with their own addresses, all kept open: least_connections
        # (counters shared by both workers) spreads them 4/4/4; ip_hash keeps them
        rc, data, out = run_client(f"ws://127.0.0.1:{lb}/ws", 12, 2, "--distinct-ips")
        assert rc == 0, out
        assert data["distribution"] == {"chat1": 4, "chat2": 4, "chat3": 4}, data
        assert data["persistent"], data["moved_clients"]
        # the client closed them all: wait until mplb let go of the tunnels
        wait_until(lambda: all(health(p)["connections"] == 0 for p in bports), 10,
                   "backends to see every tunnel closed")

    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/ws", 10, 3)
    assert rc == 0, out
    assert len(data["total_distribution"]) == 1 and data["persistent"]
    (chat_backend,) = data["total_distribution"]

    # the broadcast room: both sockets land on the same backend (ip_hash) and hear
    # each other
    a = websocket.create_connection(f"ws://127.0.0.1:{lb}/ws/chat", timeout=5)
    b = websocket.create_connection(f"ws://127.0.0.1:{lb}/ws/chat", timeout=5)
    try:
        assert json.loads(a.recv())["backend"] == chat_backend
        assert json.loads(b.recv())["backend"] == chat_backend
        a.send("hi everyone")
        for ws in (a, b):
            msg = json.loads(ws.recv())
            assert (msg["type"], msg["text"], msg["backend"]) == \
                ("chat", "hi everyone", chat_backend)
    finally:
        a.close()
        b.close()

    # only /ws is proxied: the client gets the 404 at once (no retries on 4xx)
    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/", 1, 0)
    assert rc == 1 and "404" in data["errors"][0], out

    # -v logs one line per upgrade naming upstream, server and persistence decision
    log = procs.log(mplb_proc)
    lines = [ln for ln in log.splitlines() if "upgrade" in ln and "/ws" in ln]
    assert lines, log[-2000:]
    assert any("chat_backend" in ln and "ip_hash" in ln and " hit" in ln for ln in lines), \
        "\n".join(lines[-5:])


def test_game_conf_cookie_weights(procs, tmp_path):
    mplb = need_mplb()
    *bports, lb = free_ports(3)
    start_backends(procs, bports, prefix="game")
    conf = local_conf(ETC / "game.conf", bports, lb, tmp_path / "game.conf")
    start_mplb(procs, mplb, conf, lb, workers=1)
    url = f"ws://127.0.0.1:{lb}/game/ws"

    # 40 new clients (no cookie): smooth WRR 3:1 gives exactly 30/10; each client keeps
    # the MPLB_SESSION cookie from its 101 response and sticks on 2 reconnects
    rc, data, out = run_client(url, 40, 2)
    assert rc == 0, out
    assert data["distribution"] == {"game1": 30, "game2": 10}, data["distribution"]
    assert data["total_distribution"] == {"game1": 90, "game2": 30}
    assert data["cookies"] == 40
    assert data["persistent"], data["moved_clients"]

    # without the cookie every connection is a new pick: 12 picks -> 9/3, and clients
    # move (6 is not a multiple of the WRR period 4, so the second round is shifted)
    rc, data, out = run_client(url, 6, 1, "--no-cookies")
    assert rc == 0, out
    assert data["total_distribution"] == {"game1": 9, "game2": 3}, data
    assert data["cookies"] == 6     # mplb still offered one each time
    assert not data["persistent"]


# ---------------------------------------------------------------------------
# the demo script
# ---------------------------------------------------------------------------
def demo_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("KEEP_RUNNING", None)
    env.update(PYTHON=PYTHON, **extra)
    return env


def test_demo_script_end_to_end(tmp_path):
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    src = ETC / "loadbalancer.conf"
    if not src.exists():
        src = ETC / "websocket-basic.conf"
    conf = local_conf(src, bports, lb, tmp_path / "demo.conf")
    env = demo_env(MPLB=mplb, LB_CONF=str(conf), BACKEND_PORTS=" ".join(map(str, bports)),
                   CONNECTIONS="6", RECONNECTS="2")
    proc = subprocess.Popen([str(DEMO)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, out
    assert "Distribution of 6 new connections" in out
    assert "Demo finished: OK" in out
    assert out.count("Persistence: held") == (2 if sys.platform.startswith("linux") else 1)
    # everything it started is gone, and its ports are free again
    pids = [int(p) for p in re.search(r"Stopping processes: ([\d ]+)", out).group(1).split()]
    assert len(pids) == 4

    def gone():
        for pid in pids:
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                pass
        return True
    wait_until(gone, 10, "demo processes to exit")
    wait_until(lambda: not any(port_open(p) for p in bports + [lb]), 10, "ports to close")


def test_demo_script_refuses_busy_port(tmp_path):
    (bport, lb) = free_ports(2)
    conf = local_conf(ETC / "websocket-basic.conf", [bport, bport + 1, bport + 2], lb,
                      tmp_path / "demo.conf")
    busy = socket.socket()
    busy.bind(("127.0.0.1", bport))
    busy.listen(1)
    try:
        res = subprocess.run([str(DEMO)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env=demo_env(MPLB="/bin/false", LB_CONF=str(conf),
                                                      BACKEND_PORTS=str(bport)))
    finally:
        busy.close()
    assert res.returncode == 1
    assert f"port {bport} is already in use" in res.stderr


def test_demo_script_interrupt_cleans_up(tmp_path):
    """Ctrl-C (SIGINT) while the demo keeps running stops every process it started."""
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    conf = local_conf(ETC / "websocket-basic.conf", bports, lb, tmp_path / "demo.conf")
    env = demo_env(MPLB=mplb, LB_CONF=str(conf), BACKEND_PORTS=" ".join(map(str, bports)),
                   CONNECTIONS="2", RECONNECTS="0", KEEP_RUNNING="1")
    proc = subprocess.Popen([str(DEMO)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""
    try:
        deadline = time.monotonic() + 90
        while "keep running" not in out:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, out
            out += line
        proc.send_signal(signal.SIGINT)
        out += proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 130, out
    assert "Stopping processes" in out
    wait_until(lambda: not any(port_open(p) for p in bports + [lb]), 10, "ports to close")


def test_backend_failure_client_reconnects(procs, tmp_path):
    """The guide's "Handling WebSocket Disconnections": the backend a client sticks to
    goes away; its tunnel is closed, and the client's reconnect (with backoff) lands on
    another backend and sticks there (the ip_hash record is updated)."""
    import websocket

    mplb = need_mplb()
    *bports, lb = free_ports(4)
    backends = start_backends(procs, bports)
    conf = local_conf(ETC / "websocket-basic.conf", bports, lb, tmp_path / "basic.conf")
    start_mplb(procs, mplb, conf, lb, workers=2)
    ws = websocket.create_connection(f"ws://127.0.0.1:{lb}/ws", timeout=5)
    try:
        first = json.loads(ws.recv())["backend"]
        victim = backends[int(first[-1]) - 1]
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(10) == 0
        # the tunnel ends: the backend's close frame (1001) comes through, then EOF
        ws.settimeout(10)
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame.data[:2], "big") == 1001
    finally:
        ws.close()
    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/ws", 4, 3)
    assert rc == 0, out
    assert len(data["total_distribution"]) == 1 and first not in data["total_distribution"]
    assert data["persistent"]

    # the guide's "Connection Refused": no backend left -> the upgrade is refused with
    # 502, and the client gives up after its bounded retries
    for proc in backends:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/ws", 1, 0, "--retries", "2")
    assert rc == 1 and "HTTP 502" in data["errors"][0], out


def test_docker_conf_through_mplb(procs, tmp_path):
    """examples/docker-loadbalancer.conf (the guide's timeouts and
    proxy_websocket_keepalive on), with the service names replaced by local ports."""
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports)
    conf = local_conf(EXAMPLES / "docker-loadbalancer.conf", bports, lb,
                      tmp_path / "docker.conf")
    assert "backend1:8001" not in conf.read_text()
    res = subprocess.run([mplb, "-t", "-conf", str(conf)], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    start_mplb(procs, mplb, conf, lb, workers=2)
    rc, data, out = run_client(f"ws://127.0.0.1:{lb}/", 10, 2)
    assert rc == 0, out
    assert len(data["total_distribution"]) == 1 and data["persistent"]


# ---------------------------------------------------------------------------
# docker files
# ---------------------------------------------------------------------------
def test_docker_files_consistent():
    compose = (EXAMPLES / "docker-compose-websocket.yml").read_text()
    dockerfile = (EXAMPLES / "Dockerfile").read_text()
    conf = (EXAMPLES / "docker-loadbalancer.conf").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile
    ignore = (EXAMPLES / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    for name in ("backend1", "backend2", "backend3"):
        assert f"  {name}:" in compose
        assert f'"--name", "{name}"' in compose
        assert f"server http://{name}:8001 weight=1;" in conf
    assert "examples/docker-loadbalancer.conf" in compose
    assert '"8080:8080"' in compose and "dockerfile: examples/Dockerfile" in compose
    for line in WS_DIRECTIVES:
        assert line in conf


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        res = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if res.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    res = subprocess.run(cmd + ["-f", str(EXAMPLES / "docker-compose-websocket.yml"),
                                "config"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    for name in ("backend1", "backend2", "backend3", "loadbalancer", "client"):
        assert name in res.stdout


def test_cluster_compose_and_its_configuration_agree(tmp_path):
    """examples/docker-compose-cluster.yml: redis, three backends, two instances of
    examples/docker-cluster.conf, which names those services and passes -t."""
    compose = (EXAMPLES / "docker-compose-cluster.yml").read_text()
    conf = (EXAMPLES / "docker-cluster.conf").read_text()
    for name in ("redis", "backend1", "backend2", "backend3", "lb1", "lb2"):
        assert f"\n  {name}:" in compose
    for name in ("backend1", "backend2", "backend3"):
        assert f'"--name", "{name}"' in compose and f"server http://{name}:8001;" in conf
    assert compose.count('"8080:8080"') == 1 and '"8081:8080"' in compose
    assert "examples/docker-cluster.conf" in compose and '"--save", ""' in compose
    assert "shared_store redis://redis:6379/0" in conf and "least_connections" in conf
    local = tmp_path / "cluster.conf"
    local.write_text(re.sub(r"backend(\d):8001", r"127.0.0.1:800\1", conf)
                     .replace("listen 8080", f"listen {free_ports(1)[0]}"))
    res = subprocess.run([need_mplb(), "-t", "-conf", str(local)], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
