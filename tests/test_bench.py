"""Smoke tests of scripts/bench: output parsing, ratios, table rendering, generated configs,
and (when wrk, nginx and gcc are installed) a tiny real run. Well under a minute."""

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench")


def _load():
    loader = importlib.machinery.SourceFileLoader("mplb_bench", BENCH)
    spec = importlib.util.spec_from_loader("mplb_bench", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


bench = _load()

WRK_OUT = """Running 5s test @ http://127.0.0.1:41633/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   610.73us  248.74us   2.51ms   70.78%
    Req/Sec    82.06k     9.75k  110.64k    80.00%
  Latency Distribution
     50%  580.00us
     75%  720.00us
     90%    1.02ms
     99%    1.45s
  163052 requests in 2.01s, 28.15MB read
  Socket errors: connect 1, read 3, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  81170.31
Transfer/sec:     14.01MB
"""


def test_parse_wrk_full():
    r = bench.parse_wrk(WRK_OUT)
    assert r["requests"] == 163052
    assert r["duration_s"] == pytest.approx(2.01)
    assert r["bytes"] == int(28.15 * 1024 * 1024)
    assert r["rps"] == pytest.approx(81170.31)
    assert r["p50_us"] == pytest.approx(580.0)
    assert r["p90_us"] == pytest.approx(1020.0)
    assert r["p99_us"] == pytest.approx(1.45e6)
    assert (r["err_connect"], r["err_read"], r["err_timeout"], r["non2xx"]) == (1, 3, 12, 5)
    assert r["errors"] == 1 + 3 + 12 + 5
    assert r["ok_requests"] == 163052 - 5


def test_parse_wrk_clean_and_garbage():
    clean = "\n".join(l for l in WRK_OUT.splitlines() if "errors" not in l and "Non-2xx" not in l)
    r = bench.parse_wrk(clean)
    assert r["errors"] == 0 and r["requests"] == 163052
    bad = bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    assert bad["requests"] is None and bad["rps"] is None


def test_parse_wsload():
    text = ('noise\nWSJSON {"phase":"ready","open":10,"open_us":5}\n'
            'WSJSON {"phase":"echo","msgs":7,"mismatch":0}\n')
    assert bench.parse_wsload(text, "ready")["open"] == 10
    assert bench.parse_wsload(text)["msgs"] == 7
    assert bench.parse_wsload("nothing") is None


def _run(target, scen, rep=0, **kw):
    return {"target": target, "scenario": scen, "rep": rep, **kw}


def test_summarize_ratios_and_markdown():
    runs = []
    for rep, (m, n, h, d) in enumerate([(100, 200, 400, 1000), (120, 200, 400, 1100), (80, 200, 400, 900)]):
        runs += [_run("mplb", "http-keepalive", rep, rate=m, p99_us=4000, cpu_us_per=50.0),
                 _run("nginx", "http-keepalive", rep, rate=n, p99_us=2000, cpu_us_per=20.0),
                 _run("haproxy", "http-keepalive", rep, rate=h, p99_us=1000, cpu_us_per=25.0),
                 _run("direct", "http-keepalive", rep, rate=d, p99_us=500)]
    targets = ["direct", "mplb", "nginx", "haproxy"]
    rows = bench.summarize(runs, targets, ["http-keepalive"])
    by = {r["metric"]: r for r in rows}
    assert by["req/s"]["cells"]["mplb"] == (100, "")           # median of 100, 120, 80
    assert by["req/s"]["mplb/nginx"] == pytest.approx(0.5)
    assert by["req/s"]["mplb/haproxy"] == pytest.approx(0.25)
    assert by["p99 ms"]["cells"]["nginx"][0] == pytest.approx(2.0)
    assert by["proxy CPU µs/req"]["cells"]["direct"] == ("-", "")
    assert by["proxy CPU µs/req"]["mplb/nginx"] == pytest.approx(2.5)
    md = bench.markdown(rows, targets)
    lines = md.splitlines()
    assert lines[0].startswith("| scenario | metric | direct | mplb | nginx | haproxy | mplb/nginx")
    assert all(l.count("|") == lines[0].count("|") for l in lines)
    assert "0.50x" in md and "0.25x" in md and "2.50x" in md and "req/s ↑" in md and "p99 ms ↓" in md
    assert bench.sanity_warnings(rows, runs, 25) == []


def test_both_builds_get_their_own_ratio_columns():
    runs = [_run("mplb", "http-keepalive", 0, rate=80, p99_us=1, cpu_us_per=20.0),
            _run("mplb-pure", "http-keepalive", 0, rate=60, p99_us=1, cpu_us_per=30.0),
            _run("nginx", "http-keepalive", 0, rate=100, p99_us=1, cpu_us_per=10.0),
            _run("haproxy", "http-keepalive", 0, rate=200, p99_us=1, cpu_us_per=15.0)]
    targets = ["mplb", "mplb-pure", "nginx", "haproxy"]
    rows = bench.summarize(runs, targets, ["http-keepalive"])
    by = {r["metric"]: r for r in rows}
    assert by["req/s"]["mplb/nginx"] == pytest.approx(0.8)
    assert by["req/s"]["mplb-pure/nginx"] == pytest.approx(0.6)
    assert by["proxy CPU µs/req"]["mplb-pure/haproxy"] == pytest.approx(2.0)
    head = bench.markdown(rows, targets).splitlines()[0]
    assert head.endswith("| mplb/nginx | mplb/haproxy | mplb-pure/nginx | mplb-pure/haproxy |")
    assert bench.MPLB_BUILDS["mplb-pure"] == {"MPLB_PURE_PYTHON": "1"}


def test_failed_reps_absent_targets_and_bottleneck_warning():
    runs = [_run("mplb", "ws-echo-64", 0, status="err", error="boom", errors=1),
            _run("mplb", "ws-echo-64", 1, rate=10.0, errors=2),
            _run("nginx", "ws-echo-64", 0, rate=100.0),
            _run("direct", "ws-echo-64", 0, rate=110.0)]
    targets = ["direct", "mplb", "nginx", "haproxy"]
    rows = bench.summarize(runs, targets, ["ws-echo-64"])
    rate = rows[0]
    assert rate["cells"]["mplb"] == (10.0, "*")
    assert rate["mplb/haproxy"] is None
    md = bench.markdown(rows, targets, {"haproxy": "absent"})
    assert "10.0*" in md and "absent" in md and "0.10x" in md
    w = "\n".join(bench.sanity_warnings(rows, runs, 25))
    assert "not clearly faster" in w and "boom" in w and "2 errors" in w
    assert bench.ratio(None, 1) is None and bench.ratio(1, 0) is None and bench.ratio("fail", 2) is None


def test_fmt_and_rotation():
    assert bench.fmt(123456.7) == "123,457"
    assert bench.fmt(3.14159) == "3.14"
    assert bench.fmt(None) == "n/a"
    assert bench.rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_args_defaults_and_quick():
    a = bench.parse_args([])
    assert (a.workers, a.keepalive, a.duration, a.reps, a.idle_conns) == (1, 64, 5.0, 3, 5000)
    q = bench.parse_args(["--quick", "--scenarios", "ws-idle", "--targets", "direct,mplb"])
    assert q.reps == 1 and q.duration < 5 and q.scenarios == ["ws-idle"] and q.targets == ["direct", "mplb"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--scenarios", "nope"])


def test_generated_configs(tmp_path):
    m = bench.mplb_conf(8080, 9001, 9002, 2, 64, 5000)
    assert "worker_processes 2;" in m and m.count("keepalive 64;") == 2
    assert "proxy_set_header Upgrade $http_upgrade;" in m and 'proxy_set_header Connection "";' in m
    assert "127.0.0.1:9001" in m and "127.0.0.1:9002" in m and "listen 127.0.0.1:8080;" in m
    n = bench.nginx_conf(str(tmp_path), 8080, 9001, 9002, 2, 64, 5000, 20000)
    assert "keepalive 64;" in n and "proxy_http_version 1.1;" in n and "proxy_max_temp_file_size 0;" in n
    h = bench.haproxy_conf(8080, 9001, 9002, 2, 64, 5000)
    assert "nbthread 2" in h and "http-reuse always" in h and "timeout tunnel 1h" in h
    # the real programs accept them, when installed
    if shutil.which("nginx"):
        p = tmp_path / "n.conf"
        p.write_text(n)
        r = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    if shutil.which("haproxy"):
        p = tmp_path / "h.conf"
        p.write_text(h)
        r = subprocess.run(["haproxy", "-c", "-f", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    mplb = bench.resolve_mplb(None) or bench.resolve_mplb(os.path.join(os.path.dirname(sys.executable), "mplb"))
    if mplb:
        p = tmp_path / "m.conf"
        p.write_text(m)
        r = subprocess.run([*mplb, "-t", "-conf", str(p)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not (shutil.which("wrk") and shutil.which("nginx") and shutil.which("gcc")),
                    reason="needs wrk, nginx and gcc")
def test_quick_real_run(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, BENCH, "--quick", "--duration", "1", "--targets", "direct,nginx",
                        "--scenarios", "http-keepalive,ws-echo-64", "--idle-conns", "50", "--retries", "0",
                        "--json", str(out)], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| http-keepalive | req/s ↑ |" in r.stdout
    d = json.loads(out.read_text())
    runs = {(x["target"], x["scenario"]): x for x in d["runs"]}
    assert runs[("nginx", "ws-echo-64")]["msgs"] > 0
    assert runs[("nginx", "ws-echo-64")]["errors"] == 0
    assert runs[("direct", "http-keepalive")]["requests"] > 0
    assert runs[("nginx", "http-keepalive")]["cpu_us_per"] > 0
    workdir = d["meta"]["workdir"]
    assert not os.path.exists(workdir)  # cleaned up
    assert not [l for l in os.popen("ps -eo args").read().splitlines() if workdir in l]


def test_bench_path_measures_both_modes():
    """scripts/bench_path.py drives real requests through the worker's code (a broken
    path raises in its clients) and reports a positive per-request cost.  CPU times of
    a few hundred requests are too noisy to compare; the bytecode count is exact."""
    script = os.path.join(ROOT, "scripts", "bench_path.py")
    for extra in ([], ["--new-conn"]):
        out = subprocess.run([sys.executable, script, "--requests", "300", "--conns", "4",
                              "--reps", "1", *extra], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        direct, through = (float(x) for x in
                           re.findall(r"([\d.]+) us/req", out.stdout)[:2])
        assert direct > 0 and through > 0, out.stdout
    out = subprocess.run([sys.executable, script, "--opcodes", "--requests", "200",
                          "--conns", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path = int(re.search(r"mplb path (\d+) bytecodes/req", out.stdout).group(1))
    assert path > 100, out.stdout            # the proxy path runs real Python code
    assert "on_header (http.py" in out.stdout
