"""Response-time and tunnel-duration histograms (mplb/shm/timing.py, workers/accounting.py,
mplb/status.py) and the master's ring of samples, checked with prometheus_client's own
text parser."""
import json
import math
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mplb.config.model import UpstreamServer
from mplb.sampler import Sampler
from mplb.shm import SharedState
from mplb.shm.layout import RESPONSE_BUCKETS, RING_SAMPLES, TUNNEL_BUCKETS
from mplb.shm.timing import quantile
from mplb.status import collect, to_prometheus
from mplb.workers.accounting import Accounting
from tests.harness import RawWebSocket, Stack, get, wait_for

URL = "http://127.0.0.1:9001"
SERVER = UpstreamServer(url=URL, host="127.0.0.1", port=9001, address="127.0.0.1")


@pytest.fixture
def shared(tmp_path):
    state = SharedState.create(str(tmp_path / f"mplb.{os.getpid()}"), max_workers=4,
                               max_servers=8, table_entries=64)
    for slot in range(2):
        state.worker_started(slot, os.getpid(), 1)
    yield state
    state.close()
    state.unlink()


class Record:
    """What Accounting.tunnel_ended reads of a TunnelRecord."""

    def __init__(self, opened):
        self.pick = type("Pick", (), {"server": SERVER})()
        self.opened = opened
        self.client = ("127.0.0.1", 1)


def prometheus_histograms(text):
    """{family name: {(upstream, server): {"buckets": [(le, value)], "sum", "count"}}}."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        series = out.setdefault(family.name, {})
        for sample in family.samples:
            labels = dict(sample.labels)
            key = (labels.pop("upstream"), labels.pop("server"))
            entry = series.setdefault(key, {"buckets": []})
            if sample.name.endswith("_bucket"):
                entry["buckets"].append((float(labels["le"]), sample.value))
            else:
                entry[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def check_conventions(entry):
    """Cumulative le buckets, ascending, ending with +Inf; _count equals +Inf."""
    bounds = [le for le, _ in entry["buckets"]]
    values = [value for _, value in entry["buckets"]]
    assert bounds == sorted(bounds) and math.isinf(bounds[-1])
    assert values == sorted(values)
    assert entry["count"] == values[-1]
    assert entry["sum"] >= 0


# --- unit -------------------------------------------------------------------------------

@pytest.mark.parametrize("counts, fraction, expected", [
    ([0, 10, 0], 0.5, 0.0015),                 # inside (0.001, 0.002]: interpolated
    ([10, 0, 0], 0.99, 0.000990),
    ([0, 0, 4], 0.5, 0.002),                   # +Inf: the highest finite bound
    ([5, 5, 0], 0.5, 0.001),
    ([0, 0, 0], 0.5, None),
])
def test_quantile(counts, fraction, expected):
    value = quantile((0.001, 0.002), counts, fraction)
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_workers_write_their_own_buckets_and_readers_sum(shared):
    first, second = Accounting(shared, 0, None), Accounting(shared, 1, None)
    first.count_exchange(SERVER, 100, 200, 0.0003)         # le 0.0005
    first.count_exchange(SERVER, 100, 200, 0.0025)         # le 0.0025 (bounds are <=)
    second.count_exchange(SERVER, 100, 200, 120.0)         # +Inf
    second.count_exchange(SERVER, 100, 200, None)          # no response head: not timed
    second.response_timed(SERVER, 0.02)                    # a 101
    bounds, counts, total = shared.histogram(URL, "response")
    assert bounds == RESPONSE_BUCKETS
    assert counts[0] == 1 and counts[RESPONSE_BUCKETS.index(0.0025)] == 1
    assert counts[RESPONSE_BUCKETS.index(0.025)] == 1 and counts[-1] == 1
    assert sum(counts) == 4 and total == pytest.approx(120.0228, abs=1e-5)
    assert shared.server_counters(URL)["requests"] == 4     # the 101 counts elsewhere
    first.tunnel_ended(Record(time.monotonic() - 90), "client closed", 0, 0)
    second.tunnel_ended(Record(time.monotonic() - 5), "handover", 0, 0)   # goes on
    bounds, counts, total = shared.histogram(URL, "tunnel")
    assert bounds == TUNNEL_BUCKETS
    assert sum(counts) == 1 and counts[TUNNEL_BUCKETS.index(300.0)] == 1
    assert 90 <= total < 100


def test_prometheus_histograms_parse_with_prometheus_client(shared):
    accounting = Accounting(shared, 0, None)
    for seconds in (0.0001, 0.004, 0.004, 0.3, 7.0):
        accounting.count_exchange(SERVER, 1, 1, seconds)
    data = {"pid": 1, "uptime_s": 1.0, "generation": 1, "reloads": 0, "workers": [],
            "upstreams": {"u": {"persistence": "none", "persistence_entries": 0,
                                "servers": [dict(collect(shared, None)["servers"][0],
                                                 weight=1)]}}}
    families = prometheus_histograms(to_prometheus(data))
    entry = families["mplb_upstream_response_seconds"][("u", "127.0.0.1:9001")]
    check_conventions(entry)
    buckets = dict(entry["buckets"])
    assert (buckets[0.0005], buckets[0.005], buckets[0.5], buckets[10.0]) == (1, 3, 4, 5)
    assert entry["count"] == 5 and entry["sum"] == pytest.approx(7.3081, abs=1e-5)
    tunnel = families["mplb_tunnel_duration_seconds"][("u", "127.0.0.1:9001")]
    check_conventions(tunnel)
    assert tunnel["count"] == 0


def test_samples_give_rates_tunnels_and_percentiles(shared):
    accounting = Accounting(shared, 0, None)
    accounting.count_exchange(SERVER, 1, 1, 0.001)          # before the first sample
    shared.take_sample(1000.0)
    for _ in range(98):
        accounting.count_exchange(SERVER, 1, 1, 0.004)      # le 0.005
    for _ in range(2):
        accounting.count_exchange(SERVER, 1, 1, 2.0)        # le 2.5
    shared.tunnel_opened(0, URL)
    shared.take_sample(1002.0)                               # 100 requests in 2 s
    shared.take_sample(1003.0)                               # nothing new
    history = shared.history(URL)
    assert history["t"] == [1002.0, 1003.0]
    assert history["rps"] == [50.0, 0.0]
    assert history["tunnels"] == [1, 1]
    assert 2.5 < history["p50_ms"][0] <= 5.0
    assert 1000 < history["p99_ms"][0] <= 2500
    assert history["p50_ms"][1] is None                      # no responses: no point
    assert shared.history(URL, since=1002.5)["t"] == [1003.0]


def test_ring_keeps_the_last_five_minutes(shared):
    for second in range(RING_SAMPLES + 50):
        shared.take_sample(5000.0 + second)
    times = shared.history(URL)["t"]
    assert len(times) == RING_SAMPLES - 2        # the oldest slot is skipped, and rates
    assert times[-1] == 5000.0 + RING_SAMPLES + 49   # need one sample before
    assert times == sorted(times)


def test_reclaimed_server_leaves_no_histogram_or_samples(shared):
    Accounting(shared, 1, None).count_exchange(SERVER, 1, 1, 0.2)
    shared.take_sample(10.0)
    shared.take_sample(11.0)
    sid = shared.server_id(URL)
    shared.reclaim(set(), set(), set())
    other = "http://127.0.0.1:9002"
    assert shared.server_id(other) == sid              # the entry is reused ...
    _, counts, total = shared.histogram(other, "response")
    assert sum(counts) == 0 and total == 0              # ... clean
    assert shared.history(other)["rps"] == [0.0]
    assert shared.history(other)["p50_ms"] == [None]


def test_sampler_is_due_once_a_second(shared):
    sampler = Sampler(interval=3600)
    assert sampler.wait() == 0.0 and sampler.tick(shared)
    assert not sampler.tick(shared) and 0.9 <= sampler.wait() <= 1.0
    assert not Sampler().tick(None)


# --- end to end -------------------------------------------------------------------------

CONF = """
upstream app {{ server {b1}; }}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass app; }}
    location = /status {{ mplb_status; }}
}}
"""


def test_status_histograms_end_to_end():
    stack = Stack(CONF, workers=2)
    try:
        port = stack.port
        for _ in range(5):
            assert get(port, "/fast")[0] == 200
        for _ in range(2):
            assert get(port, "/slow/0.3")[0] == 200
        with RawWebSocket(port, "/ws") as ws:
            assert ws.status == 101
            assert json.loads(ws.recv_data())["type"] == "welcome"
            ws.send_close()
            ws.wait_eof()

        def histograms():
            text = get(port, "/status?format=prometheus")[2].decode()
            families = prometheus_histograms(text)
            return families if families["mplb_tunnel_duration_seconds"][
                ("app", f"127.0.0.1:{stack.backends[0].port}")]["count"] else None
        families = wait_for(histograms, message="the tunnel's duration")
        key = ("app", f"127.0.0.1:{stack.backends[0].port}")
        response = families["mplb_upstream_response_seconds"][key]
        check_conventions(response)
        check_conventions(families["mplb_tunnel_duration_seconds"][key])
        assert response["count"] == 8                  # 7 requests and the upgrade
        assert dict(response["buckets"])[0.25] <= 6    # the two slow ones are above
        assert response["sum"] >= 0.6

        # the master samples once a second: the JSON's history shows the traffic
        def history():
            data = json.loads(get(port, "/status?since=0")[2])
            return data["upstreams"]["app"]["servers"][0]["history"]
        points = wait_for(lambda: (lambda h: h if len(h["t"]) >= 2 else None)(history()),
                          message="two samples")
        assert set(points) == {"t", "rps", "tunnels", "p50_ms", "p99_ms"}
        assert "history" not in json.loads(get(port, "/status")[2])["upstreams"]["app"][
            "servers"][0]
    finally:
        stack.stop()
