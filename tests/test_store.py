"""shared_store without a network: the directive, the frames workers send, the store's
keys and messages, cluster-keyed tables, and the health and status rules."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mplb import control
from mplb.balancing import init_upstream
from mplb.config import load
from mplb.config.model import HealthCheck, Persistence, Upstream, UpstreamServer
from mplb.errors import ConfigError
from mplb.shm.local import LocalState
from mplb.store import codec

BACKENDS = """
upstream app { persistence ip_hash; server 127.0.0.1:8001; server 127.0.0.1:8002; }
server { listen 127.0.0.1:18080; location / { proxy_pass app; } }
"""


def load_with(tmp_path, line):
    path = tmp_path / "lb.conf"
    path.write_text(f"# comment\n{line}\n{BACKENDS}")
    return load(str(path))


# -- the directive --------------------------------------------------------------------

def test_store_url_parts_and_defaults(tmp_path):
    store = load_with(tmp_path, "shared_store redis://10.0.0.5;").shared_store
    assert (store.host, store.port, store.db, store.tls) == ("10.0.0.5", 6379, 0, False)
    assert (store.prefix, store.timeout) == ("mplb", 0.005)
    store = load_with(tmp_path, "shared_store rediss://app:s%40cret@[::1]:7000/3 "
                                "prefix=shop.eu timeout=50ms;").shared_store
    assert (store.host, store.port, store.db, store.tls) == ("::1", 7000, 3, True)
    assert (store.username, store.password, store.prefix, store.timeout) == (
        "app", "s@cret", "shop.eu", 0.05)
    assert store.redacted == "rediss://app:***@[::1]:7000/3"
    assert "cret" not in repr(store)


@pytest.mark.parametrize("line, why", [
    ("shared_store http://h;", 'must start with "redis://"'),
    ("shared_store redis://;", "no valid host"),
    ("shared_store redis://h:70000;", "malformed URL"),
    ("shared_store redis://h:0;", "port must be"),
    ("shared_store redis://h/db1;", "database must be a number"),
    ("shared_store redis://h/1?x=1;", "no query"),
    ("shared_store redis://h prefix=a/b;", "a prefix is"),
    ("shared_store redis://h timeout=0;", "greater than 0"),
    ("shared_store redis://h timeout=2m;", "at most 60s"),
    ("shared_store redis://h ttl=1s;", 'unknown option "ttl"'),
    ("shared_store redis://u:hunter2@h/x;", "database must be a number"),
])
def test_malformed_store_is_an_error_naming_file_and_line(tmp_path, line, why):
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, line)
    assert info.value.line == 2 and info.value.file.endswith("lb.conf")
    assert why in info.value.message
    assert "hunter2" not in str(info.value)


def test_store_only_at_main_level_and_once(tmp_path):
    with pytest.raises(ConfigError, match="duplicate"):
        load_with(tmp_path, "shared_store redis://a; shared_store redis://b;")
    path = tmp_path / "lb.conf"
    path.write_text("upstream app { shared_store redis://a; server 127.0.0.1:1; }\n")
    with pytest.raises(ConfigError, match="not allowed here"):
        load(str(path))


def test_mplb_t_reports_a_bad_store_with_file_and_line(tmp_path):
    path = tmp_path / "lb.conf"
    path.write_text(f"shared_store redis://:pw@h:bad;\n{BACKENDS}")
    result = subprocess.run([sys.executable, "-m", "mplb", "-t", "-conf", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{path}:1: invalid value" in result.stderr and ":pw@" not in result.stderr


def test_cluster_key_from_prefix_and_password_not_the_host_spelling(tmp_path):
    one = load_with(tmp_path, "shared_store redis://:pw@10.0.0.5:6379/0;")
    two = load_with(tmp_path, "shared_store redis://:pw@redis.internal:6379/0;")
    assert one.shared_store.key == two.shared_store.key
    assert one.upstreams["app"].cluster_key == one.shared_store.key
    other_prefix = load_with(tmp_path, "shared_store redis://:pw@10.0.0.5 prefix=b;")
    other_password = load_with(tmp_path, "shared_store redis://:other@10.0.0.5;")
    assert len({one.shared_store.key, other_prefix.shared_store.key,
                other_password.shared_store.key}) == 3
    assert not load_with(tmp_path, "").upstreams["app"].shared


# -- cluster tables ---------------------------------------------------------------------

def servers(n=3):
    return tuple(UpstreamServer(url=f"http://127.0.0.1:{8001 + i}", host="127.0.0.1",
                                port=8001 + i, address="127.0.0.1") for i in range(n))


def cluster_upstream(method="weighted_round_robin", kind="ip_hash", key=b"k" * 16):
    return Upstream("app", method=method, servers=servers(),
                    persistence=Persistence(kind=kind, ttl=60), cluster_key=key)


class Request:
    def __init__(self, ip):
        self.client_ip = ip

    def header(self, name):
        return None


def test_one_digest_on_every_instance_but_groups_by_each_masters_salt():
    a, b = LocalState(), LocalState()          # two masters: two random salts
    ta = a.table("t", 4096, 60, b"cluster-key-0123")
    tb = b.table("t", 4096, 60, b"cluster-key-0123")
    keys = [b"10.0.0.%d" % i for i in range(64)]
    assert [ta.digest(k)[:2] for k in keys] == [tb.digest(k)[:2] for k in keys]
    assert [ta.digest(k)[2] for k in keys] != [tb.digest(k)[2] for k in keys]
    k1, k2, _ = ta.digest(b"10.0.0.7")
    tb.put_words(k1, k2, tb.group_of(k1, k2), 5, int(1e6))   # as the master applies it
    assert tb.get(b"10.0.0.7", 1.0) == 5
    alone = LocalState().table("t", 4096, 60)
    assert alone.digest(b"10.0.0.7")[:2] != (k1, k2)


def test_new_entries_are_announced_once_and_a_repick_replaces():
    state = LocalState()
    heard = []
    state.announce = lambda table, key, sid, first: heard.append((key, sid, first))
    balancer = init_upstream(cluster_upstream(), state, 0)
    pick = balancer.get(Request("10.1.1.1"))
    balancer.free(pick, False)
    assert heard == [(b"10.1.1.1", pick.sid, True)]
    balancer.free(balancer.get(Request("10.1.1.1")), False)          # a hit: nothing new
    assert len(heard) == 1
    state.set_health(pick.sid, False)                                 # its server is down
    repick = balancer.get(Request("10.1.1.1"))
    assert repick.persistence == "repick" and heard[1] == (b"10.1.1.1", repick.sid, False)
    plain = init_upstream(Upstream("p", servers=servers(), persistence=Persistence(
        kind="ip_hash", ttl=60)), state, 0)
    plain.get(Request("10.1.1.2"))
    assert len(heard) == 2                                            # not a cluster table


def test_least_connections_adds_what_other_instances_hold():
    state = LocalState()
    balancer = init_upstream(cluster_upstream("least_connections", "none"), state, 0)
    first = balancer.sids[0]
    state.set_remote_active(first, 3)
    picks = [balancer.get(None) for _ in range(4)]       # b2, b3 stay below 3 for 4 picks
    assert first not in {p.sid for p in picks}
    alone = init_upstream(Upstream("q", method="least_connections", servers=servers()),
                          state, 0)
    assert alone.get(None).sid == first                  # without a store: not counted


# -- frames between worker and master -----------------------------------------------------

def test_frames_survive_any_split_and_a_bad_byte_stops_the_parse():
    stream = (control.HEARTBEAT + control.encode_entry(3, 7, -5, 1 << 62, True)
              + control.READY + control.encode_entry(4, 8, 9, -1, False) + control.HEARTBEAT)
    for cut in range(len(stream) + 1):
        reader = control.ControlReader()
        one = reader.feed(stream[:cut])
        two = reader.feed(stream[cut:])
        assert one[1] + two[1] == [(3, 7, -5, 1 << 62, True), (4, 8, 9, -1, False)]
        assert one[0] or two[0]
        assert reader.buffer == b""
    reader = control.ControlReader()
    ready, entries, bad = reader.feed(b"hXr" + control.encode_entry(1, 1, 1, 1, True))
    assert bad and not ready and entries == [] and reader.buffer == b""


def test_a_full_socket_drops_entries_without_blocking_and_keeps_the_stream_framed():
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    worker.setblocking(False)
    dropped = []
    writer = control.ControlWriter(worker.fileno())
    writer.count_drop = lambda: dropped.append(1)
    table = LocalState().table("t", 64, 60, b"c" * 16)
    sent = 0
    for i in range(20000):                               # nobody reads: it fills up
        before = writer.dropped
        writer.announce(table, b"key%d" % i, i, True)
        sent += writer.dropped == before
        if writer.dropped > 50:
            break
    assert writer.dropped > 50 and len(dropped) == writer.dropped
    master.setblocking(False)
    reader, entries = control.ControlReader(), []
    while True:
        try:
            data = master.recv(65536)
        except BlockingIOError:
            if writer.pending:                           # room again: the tail goes first
                assert writer.send(control.HEARTBEAT)
                continue
            break
        ready, got, bad = reader.feed(data)
        assert not bad
        entries += got
    assert len(entries) == sent and [e[1] for e in entries] == sorted(e[1] for e in entries)
    master.close()
    worker.close()


# -- what the store holds -------------------------------------------------------------------

def test_keys_and_messages_round_trip_and_garbage_is_refused():
    names = codec.Names("shop", "host:1:abc")
    key = names.entry("0123456789ab", -2, 1 << 63 - 1).encode()
    assert names.parse_entry_key(key) == ("0123456789ab", -2, 1 << 63 - 1)
    for bad in (b"shop:e:0123456789ab:zz", b"shop:e:short:" + b"0" * 32, key + b"0"):
        assert names.parse_entry_key(bad) is None
    head = codec.entry_message_head("0123456789ab", 5, -6)
    message = f"{head} 1500 http://10.0.0.1:80".encode()
    assert codec.parse_entry_message(message) == ("0123456789ab", 5, -6, 1500,
                                                  "http://10.0.0.1:80")
    for bad in (b"", b"x" * 600, f"{head} -1 http://a:1".encode(),
                f"{head} 10 ftp://a:1".encode(), f"{head} 10 http://" .encode() + b"a" * 300,
                f"{head} 10 http://\xff:1".encode("latin-1"), "nonsense".encode(), None):
        assert codec.parse_entry_message(bad) is None, bad


def test_instance_payloads_are_bounded_and_summed():
    payload = codec.encode_payload({"http://a:1": 3, "http://b:1": 0}, ["http://c:1"]).encode()
    assert codec.parse_payload(payload) == ({"http://a:1": 3}, {"http://c:1"})
    assert codec.parse_payload(b'{"c": {"http://a:1": "3", "http://b:1": -1}, "d": [1]}') \
        == ({}, set())
    for bad in (b"[1]", b"not json", b"{" + b" " * codec.MAX_PAYLOAD + b"}",
                b'{"c": [], "d": []}', 5):
        assert codec.parse_payload(bad) is None
    totals, down = codec.sum_instances([({"http://a:1": 3}, {"http://c:1"}),
                                        ({"http://a:1": 2, "http://b:1": 1}, set())])
    assert totals == {"http://a:1": 5, "http://b:1": 1} and down == {"http://c:1"}
    assert not codec.valid_instance("a b") and codec.valid_instance("vm:42:0a1b2c")


# -- health: another instance's checks count ------------------------------------------------

def test_a_server_is_down_while_any_instances_checks_hold_it_down():
    from mplb.config.model import Config
    from mplb.health import HealthChecker
    state = LocalState()
    checked = Upstream("c", servers=servers(2), health_check=HealthCheck())
    unchecked = Upstream("u", servers=servers(3)[2:])
    config = Config(path="x", worker_processes=1, upstreams={"c": checked, "u": unchecked})
    health = HealthChecker(config, state, check=lambda server, check: (True, "ok"))
    url_a, url_c = checked.servers[0].url, unchecked.servers[0].url
    sid_a, sid_c = state.server_id(url_a), state.server_id(url_c)
    health.set_remote_down(frozenset({url_a, url_c}))
    assert state.health_down(sid_a) and state.health_down(sid_c)
    health.run_checks(list(health.targets.values()))        # our own checks pass ...
    assert state.health_down(sid_a)                         # ... another's still hold it
    health.set_remote_down(frozenset())
    assert not state.health_down(sid_a) and not state.health_down(sid_c)
    assert health.local_down() == []


# -- status ----------------------------------------------------------------------------------

def test_status_shows_the_store_without_its_password(tmp_path):
    from mplb import status
    from mplb.shm.layout import STORE_DEGRADED
    config = load_with(tmp_path, "shared_store redis://:hunter2@10.0.0.5/1 prefix=p;")
    state = LocalState()
    state.set_store(STORE_DEGRADED, 3)
    data = status.collect(state, config)
    assert data["store"] == {"url": "redis://:***@10.0.0.5:6379/1", "state": "degraded",
                             "instances": 3, "dropped": 0}
    assert data["upstreams"]["app"]["servers"][0]["remote_active"] == 0
    text = status.to_prometheus(data)
    assert "mplb_store_up 0" in text and "mplb_store_instances 3" in text
    from mplb.dashboard import render_html
    page = render_html(data)
    assert "degraded · 3 instances" in page and "hunter2" not in page + text
    plain = status.collect(state, load_with(tmp_path, ""))
    assert plain["store"] is None and "mplb_store_up" not in status.to_prometheus(plain)
