"""The ``mplb_status`` location against a real mplb: JSON, Prometheus text, HTML, allow/deny.

Plus unit tests of the renderings (escaping, format negotiation) on hand-made snapshots.
"""
from __future__ import annotations

import json
import math
import re

import pytest

from mplb import dashboard, status
from tests.harness import Stack, free_port, get, wait_for

pytestmark = pytest.mark.timeout(120)

CONF = """
worker_processes 2;
upstream backend {{
    method round_robin;
    server {b1} weight=2;
    server {b2};
    server http://127.0.0.1:{dead} down;
}}
upstream sticky {{
    persistence ip_hash;
    server {b1};
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass backend; }}
    location /sticky {{ proxy_pass sticky; }}
    location = /status {{ mplb_status; }}
    location = /status-local {{ mplb_status; allow 127.0.0.1; deny all; }}
    location = /status-denied {{ mplb_status; deny all; }}
    location = /status-other {{ mplb_status; allow 10.0.0.0/8; deny all; }}
}}
"""


@pytest.fixture(scope="module")
def lb():
    stack = Stack(CONF, backends=("one", "two"), dead=free_port())
    yield stack.mplb
    stack.stop()


def status_json(port, path="/status", headers=None):
    code, hdrs, body = get(port, path, headers)
    assert code == 200, body
    assert hdrs["content-type"].startswith("application/json")
    return json.loads(body)


def by_url(data, upstream):
    return {s["url"]: s for s in data["upstreams"][upstream]["servers"]}


# -- JSON -------------------------------------------------------------------------------

def test_json_shape(lb):
    data = wait_for(lambda: (lambda d: d if len(d["workers"]) == 2 else None)(
        status_json(lb.port)), message="two workers in the status")
    assert data["pid"] == lb.pid
    assert data["generation"] == 1 and data["reloads"] == 0
    assert isinstance(data["uptime_s"], float) and 0 <= data["uptime_s"] < 120
    assert {w["pid"] for w in data["workers"]} == set(lb.worker_pids())
    for worker in data["workers"]:
        assert set(worker) >= {"pid", "generation", "connections", "requests"}
        assert worker["generation"] == 1
    assert set(data["upstreams"]) == {"backend", "sticky"}
    backend = data["upstreams"]["backend"]
    assert backend["method"] == "round_robin" and backend["persistence"] == "none"
    assert isinstance(backend["persistence_entries"], int)
    b1, b2 = lb.backends
    servers = by_url(data, "backend")
    assert len(servers) == 3
    for server in servers.values():
        assert set(server) >= {"server", "url", "state", "weight", "active", "tunnels",
                               "requests", "failures", "bytes_in", "bytes_out"}
    assert servers[b1.url]["server"] == f"127.0.0.1:{b1.port}"
    assert servers[b1.url]["weight"] == 2 and servers[b2.url]["weight"] == 1
    assert servers[b1.url]["state"] == "up" and servers[b2.url]["state"] == "up"
    dead = [s for url, s in servers.items() if url not in (b1.url, b2.url)][0]
    assert dead["state"] == "down"
    assert data["upstreams"]["sticky"]["persistence"] == "ip_hash"


def test_counters_move_with_traffic(lb):
    b1, b2 = lb.backends
    before = by_url(status_json(lb.port), "backend")
    n = 12
    for _ in range(n):
        code, _, body = get(lb.port, "/hello")
        assert code == 200, body

    def settled():
        after = by_url(status_json(lb.port), "backend")
        moved = sum(after[u]["requests"] - before[u]["requests"] for u in (b1.url, b2.url))
        return after if moved == n and all(after[u]["active"] == 0 for u in after) else None
    after = wait_for(settled, message=f"{n} more requests in the status")
    for url in (b1.url, b2.url):          # round robin: both servers got traffic
        assert after[url]["requests"] > before[url]["requests"]
        assert after[url]["bytes_in"] > before[url]["bytes_in"] > -1
        assert after[url]["bytes_out"] > before[url]["bytes_out"] > -1
        assert after[url]["bytes_in"] > 0 and after[url]["bytes_out"] > 0
        assert after[url]["failures"] == 0
    workers = status_json(lb.port)["workers"]
    assert sum(w["requests"] for w in workers) >= n


def test_persistence_entries(lb):
    code, _, _ = get(lb.port, "/sticky")
    assert code == 200
    wait_for(lambda: status_json(lb.port)["upstreams"]["sticky"]["persistence_entries"] >= 1,
             message="an ip_hash entry")
    assert status_json(lb.port)["upstreams"]["sticky"]["persistence_capacity"] >= 1


def test_format_json_explicit_beats_accept(lb):
    data = status_json(lb.port, "/status?format=json", {"Accept": "text/html"})
    assert data["pid"] == lb.pid


# -- Prometheus -------------------------------------------------------------------------

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^(?P<name>{METRIC_NAME})(?P<labels>\{{(?:{LABEL}(?:,{LABEL})*)?\}})?"
                    r" (?P<value>\S+)(?: (?P<ts>-?\d+))?$")
HELP = re.compile(rf"^# HELP (?P<name>{METRIC_NAME}) (?:[^\\\n]|\\[\\n])*$")
TYPE = re.compile(rf"^# TYPE (?P<name>{METRIC_NAME}) "
                  r"(?P<type>counter|gauge|histogram|summary|untyped)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text):
    """Validate every line of the text format 0.0.4; return {(name, labels): value}."""
    assert text.endswith("\n"), "exposition must end with a newline"
    samples, types, helps, seen_families, current = {}, {}, set(), [], None
    for number, line in enumerate(text.split("\n")[:-1], 1):
        assert line, f"line {number}: empty line"
        if line.startswith("#"):
            m = HELP.match(line) or TYPE.match(line)
            if m is None:
                assert not line.startswith(("# HELP", "# TYPE")), f"line {number}: {line!r}"
                continue                         # a plain comment
            name = m.group("name")
            if line.startswith("# TYPE"):
                assert name not in types, f"line {number}: second TYPE for {name}"
                assert not any(k[0] == name for k in samples), \
                    f"line {number}: TYPE after samples of {name}"
                types[name] = m.group("type")
            else:
                assert name not in helps, f"line {number}: second HELP for {name}"
                helps.add(name)
            continue
        m = SAMPLE.match(line)
        assert m, f"line {number} does not parse: {line!r}"
        value = m.group("value")
        assert re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?Inf|NaN", value), \
            f"line {number}: bad value {value!r}"
        name = m.group("name")
        labels = tuple(LABEL_PAIR.findall(m.group("labels") or ""))
        assert len({k for k, _ in labels}) == len(labels), f"line {number}: repeated label"
        key = (name, labels)
        assert key not in samples, f"line {number}: duplicate sample {line!r}"
        family = name
        for suffix in ("_bucket", "_sum", "_count"):    # a histogram's series interleave
            if name.endswith(suffix) and types.get(name[:-len(suffix)]) == "histogram":
                family = name[:-len(suffix)]
        if family != current:                    # a family's samples are contiguous
            assert family not in seen_families, f"line {number}: {family} split up"
            seen_families.append(family)
            current = family
        if types.get(name) == "counter":
            assert name.endswith("_total"), f"counter {name} should end in _total"
            assert float(value) >= 0
        samples[key] = float(value)
    assert set(helps) == set(types), "every family has HELP and TYPE"
    return samples, types


def test_prometheus_parses(lb):
    get(lb.port, "/")
    code, hdrs, body = get(lb.port, "/status?format=prometheus")
    assert code == 200
    assert hdrs["content-type"].startswith("text/plain")
    assert "version=0.0.4" in hdrs["content-type"]
    samples, types = parse_prometheus(body.decode("utf-8"))
    assert types["mplb_server_requests_total"] == "counter"
    assert types["mplb_server_active_connections"] == "gauge"
    data = status_json(lb.port)
    b1, _ = lb.backends
    server = by_url(data, "backend")[b1.url]
    labels = (("upstream", "backend"), ("server", server["server"]))
    assert samples[("mplb_server_requests_total", labels)] == server["requests"]
    assert samples[("mplb_server_received_bytes_total", labels)] == server["bytes_in"]
    assert samples[("mplb_server_sent_bytes_total", labels)] == server["bytes_out"]
    assert samples[("mplb_server_up", labels)] == 1
    assert samples[("mplb_reloads_total", ())] == 0
    assert samples[("mplb_master_pid", ())] == lb.pid
    workers = {dict(k[1])["pid"] for k in samples if k[0] == "mplb_worker_connections"}
    assert workers == {str(p) for p in lb.worker_pids()}
    down = [dict(k[1]) for k, v in samples.items()
            if k[0] == "mplb_server_state" and v == 1 and dict(k[1]).get("state") == "down"]
    assert len(down) == 1


def test_parser_rejects_bad_lines():
    for bad in ('m{a="1"} \n', "m 1 2 3\n", 'm{a=1} 1\n', "# TYPE m gauges\n", "m{} x\n",
                "1m 1\n", 'm{a="x",a="y"} 1\n'):
        with pytest.raises(AssertionError):
            parse_prometheus("# HELP m h\n# TYPE m gauge\n" + bad)
    parse_prometheus('# HELP m h\n# TYPE m gauge\nm{a="q\\"uo\\\\te\\n"} 1.5e3\nm NaN\n')


def test_prometheus_escapes_labels():
    data = fake_snapshot('we"ird\\name\n', '<b>"x"</b>')
    samples, _ = parse_prometheus(status.to_prometheus(data))
    ups = {dict(k[1]).get("upstream") for k in samples if k[0] == "mplb_server_requests_total"}
    assert ups == {'we\\"ird\\\\name\\n'}


# -- HTML -------------------------------------------------------------------------------

def test_html_dashboard(lb):
    b1, b2 = lb.backends
    code, hdrs, body = get(lb.port, "/status", {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert code == 200
    assert hdrs["content-type"].startswith("text/html")
    assert hdrs.get("cache-control") == "no-store"
    page = body.decode("utf-8")
    assert page.startswith("<!doctype html>")
    assert '<table class="servers">' in page and 'id="workers"' in page
    assert 'id="persistence"' in page
    for backend in (b1, b2):
        assert f'data-server="127.0.0.1:{backend.port}"' in page
    assert 'class="badge state-up"' in page and 'class="badge state-down"' in page
    for pid in lb.worker_pids():
        assert f'data-pid="{pid}"' in page
    assert "format" in page and "setTimeout" in page          # refreshes itself
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no external assets
    code, hdrs, body2 = get(lb.port, "/status?format=html")
    assert code == 200 and hdrs["content-type"].startswith("text/html")


def test_json_is_default_for_non_browsers(lb):
    for accept in (None, "*/*", "application/json"):
        data = status_json(lb.port, headers={"Accept": accept} if accept else None)
        assert data["pid"] == lb.pid


def fake_snapshot(upstream, server):
    return {"pid": 1, "uptime_s": 3.5, "generation": 2, "reloads": 1,
            "workers": [{"pid": 7, "generation": 1, "connections": 0, "requests": 3,
                         "uptime_s": 1.0}],
            "upstreams": {upstream: {
                "method": "round_robin", "persistence": "</script><script>alert(1)</script>",
                "persistence_entries": 2, "persistence_capacity": 16,
                "servers": [{"server": server, "url": "http://" + server, "state": "up<i>",
                             "weight": 1, "active": 0, "tunnels": 0, "requests": 5,
                             "failures": 1, "bytes_in": 3 * 1024 * 1024, "bytes_out": 10}]}}}


def test_html_escapes_everything():
    page = dashboard.render_html(fake_snapshot("<img src=x onerror=alert(1)>", '<u>"x"</u>'))
    assert "<img src=x" not in page
    assert "<u>" not in page and "&lt;u&gt;&quot;x&quot;&lt;/u&gt;" in page
    assert "up<i>" not in page
    assert page.count("</script>") == 2                      # only our two script elements
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "3.0 MiB" in page
    assert 'class="badge retiring"' in page                  # generation 1 of 2


def test_format_negotiation():
    assert status.choose_format("", None) == "json"
    assert status.choose_format("", "text/html") == "html"
    assert status.choose_format("format=json", "text/html") == "json"
    assert status.choose_format("a=1&format=prometheus", "text/html") == "prometheus"
    assert status.choose_format("format=html", "*/*") == "html"


def test_human_units():
    assert dashboard.human_bytes(0) == "0 B"
    assert dashboard.human_bytes(1536) == "1.5 KiB"
    assert dashboard.human_bytes(5 * 1024 ** 3) == "5.0 GiB"
    assert dashboard.human_duration(3725) == "1h 2m 5s"
    assert dashboard.human_duration(90061) == "1d 1h 1m"
    assert not math.isnan(float(status._number(1.5)))


# -- access rules ----------------------------------------------------------------------

def test_allow_deny(lb):
    assert get(lb.port, "/status-denied")[0] == 403
    assert get(lb.port, "/status-other")[0] == 403
    assert get(lb.port, "/status-denied?format=prometheus")[0] == 403
    code, _, body = get(lb.port, "/status-local")
    assert code == 200 and json.loads(body)["pid"] == lb.pid
