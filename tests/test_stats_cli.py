"""``scripts/mplb-stats`` against a real mplb: table, --json, -conf lookup, --watch."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import ROOT, Stack, fake_segment, get, wait_for

pytestmark = pytest.mark.timeout(120)

SCRIPT = os.path.join(ROOT, "scripts", "mplb-stats")
CLEAR = "\x1b[H\x1b[2J"

CONF = """
upstream app {{
    method least_connections;
    persistence ip_hash;
    server {b1} weight=3;
    server {b2};
}}
upstream other {{
    server {b2};
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass app; }}
    location /other {{ proxy_pass other; }}
    location = /status {{ mplb_status; }}
}}
"""


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(*args, timeout=30):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)


@pytest.fixture(scope="module")
def lb():
    stack = Stack(CONF, backends=("s1", "s2"))
    try:
        for path in ("/", "/a", "/b", "/other", "/other/x"):
            assert get(stack.port, path)[0] == 200
        yield stack.mplb
    finally:
        stack.stop()


def status_json(lb):
    code, _, body = get(lb.port, "/status")
    assert code == 200
    return json.loads(body)


def quiet_status(lb):
    """The status once no connection to a backend is open (counters then stand still)."""
    def settled():
        data = status_json(lb)
        busy = any(s["active"] for u in data["upstreams"].values() for s in u["servers"])
        return None if busy else data
    return wait_for(settled, message="no active backend connections")


def test_json_pid_file(lb):
    data = quiet_status(lb)
    result = run("-pid", lb.pid_file, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["master"]["pid"] == lb.pid
    assert doc["master"]["shm"] == f"/dev/shm/mplb.{lb.pid}"
    assert doc["master"]["generation"] == 1 and doc["master"]["reloads"] == 0
    roles = {p["pid"]: p for p in doc["processes"]}
    assert roles[lb.pid]["role"] == "master"
    workers = set(lb.worker_pids())
    assert len(workers) == 2
    assert {pid for pid, p in roles.items() if p["role"] == "worker"} == workers
    for proc in doc["processes"]:
        assert proc["generation"] == 1
        assert isinstance(proc["cpu_percent"], float) and proc["cpu_percent"] >= 0
        assert proc["rss"] > 1 << 20
        assert proc["uptime_s"] >= 0
        assert proc["connections"] >= 0 and proc["listening"] >= 1   # own user: visible
    # without -conf the servers are listed by URL from shared memory
    shm = {s["url"]: s for s in doc["servers"]}
    b1, b2 = lb.backends
    assert set(shm) == {b1.url, b2.url}
    assert all(s["upstream"] is None for s in doc["servers"])
    for url in (b1.url, b2.url):
        # both upstreams share b2's counters (keyed by URL), so compare summed over upstreams
        expected = {}
        for info in data["upstreams"].values():
            for server in info["servers"]:
                if server["url"] == url:
                    expected = server
        for field in ("requests", "failures", "bytes_in", "bytes_out", "active", "tunnels"):
            assert shm[url][field] == expected[field], (url, field)
    assert shm[b1.url]["requests"] + shm[b2.url]["requests"] >= 5


def test_table_with_conf(lb):
    data = quiet_status(lb)
    result = run("-conf", lb.conf)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"mplb master {lb.pid}")
    proc_rows = {}
    for line in lines:
        cells = line.split()
        if len(cells) >= 8 and cells[0].isdigit():
            proc_rows[int(cells[0])] = cells
    assert proc_rows[lb.pid][1] == "master"
    for pid in lb.worker_pids():
        assert proc_rows[pid][1] == "worker" and proc_rows[pid][2] == "1"
    header = [line for line in lines if line.startswith("UPSTREAM")]
    assert header and header[0].split()[:3] == ["UPSTREAM", "SERVER", "STATE"]
    server_rows = [line.split() for line in lines
                   if line.split() and line.split()[0] in ("app", "other")]
    got = {(cells[0], cells[1]): cells for cells in server_rows}
    for upstream, info in data["upstreams"].items():
        for server in info["servers"]:
            cells = got[(upstream, server["server"])]
            assert cells[2] == server["state"]
            assert int(cells[3]) == server["weight"]
            assert int(cells[6]) == server["requests"]       # REQUESTS column
            assert int(cells[7]) == server["failures"]
    assert any(line.startswith("PERSISTENCE") for line in lines)


def test_json_with_conf_groups_by_upstream(lb):
    data = quiet_status(lb)
    result = run("-conf", lb.conf, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["master"]["pid"] == lb.pid
    got = {(s["upstream"], s["url"]): s for s in doc["servers"]}
    for upstream, info in data["upstreams"].items():
        for server in info["servers"]:
            mine = got[(upstream, server["url"])]
            for field in ("state", "weight", "requests", "failures", "bytes_in", "bytes_out"):
                assert mine[field] == server[field], (upstream, server["url"], field)
    assert doc["persistence"]["app"]["kind"] == "ip_hash"
    assert doc["persistence"]["app"]["entries"] == data["upstreams"]["app"]["persistence_entries"]


def test_conf_pid_directive(lb, tmp_path):
    """-conf with a ``pid`` directive reads that pid file instead of searching titles."""
    with open(lb.conf) as handle:
        text = handle.read()
    conf = tmp_path / "with-pid.conf"
    conf.write_text(f"pid {lb.pid_file};\n" + text)
    result = run("-conf", str(conf), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"]["pid"] == lb.pid


def test_by_title_alone(lb):
    """No -pid/-conf: the only master, or (other masters running) a list naming ours."""
    result = run("--json")
    if result.returncode == 0:
        assert json.loads(result.stdout)["master"]["pid"] == lb.pid
    else:
        assert result.returncode == 2, result.stderr
        assert "several mplb masters" in result.stderr
        assert f"{lb.pid}  mplb: master process -conf {lb.conf}" in result.stderr


def test_a_stale_segment_is_ignored(lb, tmp_path):
    """A segment file named after the master but held by no live master (a killed
    master's, its pid since reused) is not read: no counters, one warning."""
    fake_segment(str(tmp_path / f"mplb.{lb.pid}"), lb.pid)
    doc = json.loads(run("-pid", lb.pid_file, "--json", "--shm-dir", str(tmp_path)).stdout)
    assert any("is stale" in warning for warning in doc["warnings"]), doc["warnings"]
    assert doc["servers"] == []
    live = json.loads(run("-pid", lb.pid_file, "--json").stdout)        # the real one
    assert not any("stale" in warning for warning in live["warnings"]) and live["servers"]


def test_errors(tmp_path):
    result = run("-pid", str(tmp_path / "missing.pid"))
    assert result.returncode == 1 and "cannot read pid file" in result.stderr
    conf = tmp_path / "nobody.conf"
    conf.write_text("upstream u { server http://127.0.0.1:9; }\n"
                    "server { listen 127.0.0.1:9; location / { proxy_pass u; } }\n")
    result = run("-conf", str(conf))
    assert result.returncode == 1 and "no running mplb master" in result.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text(f"{dead.pid}\n")
    result = run("-pid", str(pid_file))
    assert result.returncode == 1 and "no process with pid" in result.stderr
    assert run("--watch", "0").returncode == 2


def read_until(proc, predicate, timeout):
    """Read the child's stdout until ``predicate(text)`` holds or the deadline passes."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not predicate(buf.decode("utf-8", "replace")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; output so far:\n{buf.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"mplb-stats exited early ({proc.wait()}):\n"
                                     f"{buf.decode(errors='replace')}\n{proc.stderr.read()}")
            buf += chunk
    return buf.decode("utf-8", "replace")


@pytest.mark.parametrize("as_json", [False, True])
def test_watch_redraws_until_interrupted(lb, as_json):
    args = [sys.executable, SCRIPT, "-pid", lb.pid_file, "--watch", "0.3"]
    if as_json:
        args.append("--json")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            cwd=ROOT, start_new_session=True)
    try:
        if as_json:
            text = read_until(proc, lambda t: t.count("\n") >= 3, timeout=20)
            frames = [json.loads(line) for line in text.splitlines()[:3]]
            assert all(f["master"]["pid"] == lb.pid for f in frames)
            assert frames[0]["time"] < frames[1]["time"] < frames[2]["time"]
        else:
            text = read_until(proc, lambda t: t.count(CLEAR) >= 3, timeout=20)
            frames = [f for f in text.split(CLEAR) if f.strip()]
            assert len(frames) >= 2
            for frame in frames[:2]:
                assert frame.startswith(f"mplb master {lb.pid}")
                assert "Ctrl-C" in frame
        assert proc.poll() is None, "--watch must keep running until interrupted"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
