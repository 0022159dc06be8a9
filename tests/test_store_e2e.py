"""End to end: three real mplb instances sharing one real redis-server (shared_store).

Each instance has its own listen port and 2 workers, all share the same backends and
one redis-server started for this module (tests/redis_harness.py).  Every check waits
on a condition with a generous deadline: the 100 ms agreement is a product target that
scripts/bench_store_agreement.py measures, not something a loaded machine can promise
a test.  Clients are told apart by their source address (127.0.x.y).
"""
from __future__ import annotations

import http.client
import json
import threading

import pytest
import websocket

from tests.harness import Backend, Mplb, free_port, get_json, wait_for
from tests.redis_harness import RedisServer, needs_redis

pytestmark = [pytest.mark.timeout(240), needs_redis()]
WORKERS = 2
SLOW = 30.0          # deadline for anything that crosses instances


def instance_conf(port, store_url, backends, health_check=False, lc_servers=None):
    b1, b2, b3, bh = (b.url for b in backends)
    lc = "\n".join(f"        server {url};" for url in (lc_servers or (b1, b2, b3)))
    check = "health_check interval=200ms timeout=500ms;" if health_check else ""
    return f"""
shared_store {store_url} prefix=t timeout=500ms;
upstream iph {{ persistence ip_hash; server {b1}; server {b2}; server {b3}; }}
upstream race {{ persistence ip_hash; server {b1}; server {b2}; server {b3}; }}
upstream outage {{ persistence ip_hash; server {b1}; server {b2}; server {b3}; }}
upstream learn {{ persistence cookie learn=SID; server {b1}; server {b2}; server {b3}; }}
upstream lc {{
    method least_connections;
{lc}
}}
upstream checked {{ server {bh}; server {b1}; {check} }}
server {{
    listen 127.0.0.1:{port};
    location = /status {{ mplb_status; }}
    location /iph {{ proxy_pass iph; }}
    location /race {{ proxy_pass race; }}
    location /outage {{ proxy_pass outage; }}
    location /learn {{ proxy_pass learn; }}
    location /set-cookie/ {{ proxy_pass learn; }}
    location /lc {{ proxy_pass lc; }}
    location /checked {{ proxy_pass checked; }}
}}
"""


class Cluster:
    """redis-server, four backends (b1-b3, and bh for health checks), three instances:
    A runs the health checks and balances ``lc`` over b1 alone; B and C do neither."""

    def __init__(self):
        self.items = []
        self.redis = self.keep(RedisServer())
        self.backends = [self.keep(Backend(name)) for name in ("b1", "b2", "b3", "bh")]
        self.ports = []
        for index in range(3):
            port = free_port()
            special = index == 0
            conf = instance_conf(port, self.redis.url, self.backends, health_check=special,
                                 lc_servers=(self.backends[0].url,) if special else None)
            self.keep(Mplb(conf, workers=WORKERS, wait_ports=[port], name=f"mplb{index}"))
            self.ports.append(port)
        wait_for(lambda: all(self.store(p)["state"] == "ok" and self.store(p)["instances"] == 3
                             for p in self.ports), timeout=SLOW, message="3 instances sharing")

    def keep(self, item):
        self.items.append(item)
        return item

    def stop(self):
        for item in reversed(self.items):
            item.stop()

    @staticmethod
    def status(port):
        code, data = get_json(port, "/status")
        assert code == 200
        return data

    def store(self, port):
        return self.status(port)["store"]

    def entries(self, port, upstream):
        return self.status(port)["upstreams"][upstream]["persistence_entries"]

    def row(self, port, upstream, backend):
        servers = self.status(port)["upstreams"][upstream]["servers"]
        return next(s for s in servers if s["url"] == backend.url)


@pytest.fixture(scope="module")
def cluster():
    started = Cluster()
    try:
        yield started
    finally:
        started.stop()


def backend_from(port, source_ip, path="/iph", headers=None):
    """The backend answering a new connection from ``source_ip`` (status must be 200)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source_ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body[:200])
        return json.loads(body)["backend"]
    finally:
        conn.close()


def answers(cluster, ip, path="/iph"):
    return [backend_from(port, ip, path) for port in cluster.ports]


def wait_entries(cluster, upstream, at_least):
    """Every instance's table holds at least ``at_least`` entries of ``upstream``."""
    wait_for(lambda: all(cluster.entries(p, upstream) >= at_least for p in cluster.ports),
             timeout=SLOW, message=f"{at_least} {upstream} entries on every instance")


def test_three_instances_agree_on_ip_hash_clients(cluster):
    clients = [f"127.0.3.{i}" for i in range(2, 32)]
    first = {}
    for i, ip in enumerate(clients):              # each client first seen on one instance
        first[ip] = backend_from(cluster.ports[i % 3], ip)
    assert len(set(first.values())) == 3          # the clients are spread over b1-b3
    wait_entries(cluster, "iph", len(clients))
    for port in reversed(cluster.ports):          # then every instance, in another order
        for ip in reversed(clients):
            assert backend_from(port, ip) == first[ip], (port, ip)
    keys = cluster.redis.command(b"KEYS", b"t:e:*")
    assert keys.count(b"t:e:") >= len(clients) and b"127.0." not in keys   # digests only


def test_instances_picking_at_once_converge_on_one_winner(cluster):
    clients = [f"127.0.4.{i}" for i in range(2, 22)]
    barrier = threading.Barrier(2)
    errors = []

    def race(port):
        try:
            barrier.wait(10)
            for ip in clients:
                backend_from(port, ip, "/race")
        except Exception as exc:                  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(port,)) for port in cluster.ports[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    wait_for(lambda: all(len(set(answers(cluster, ip, "/race"))) == 1 for ip in clients),
             timeout=SLOW, message="one server per client on every instance")


def test_learned_cookie_clients_agree(cluster):
    sessions = {}
    for i in range(12):                           # the backend sets SID on instance i % 3
        port = cluster.ports[i % 3]
        sessions[f"s{i}"] = backend_from(port, "127.0.0.1", f"/set-cookie/SID/s{i}")
    assert len(set(sessions.values())) > 1
    wait_entries(cluster, "learn", len(sessions))
    for port in cluster.ports:
        for session, owner in sessions.items():
            assert backend_from(port, "127.0.0.1", "/learn",
                                {"Cookie": f"SID={session}"}) == owner


def test_least_connections_counts_another_instances_tunnels(cluster):
    a, b = cluster.ports[0], cluster.ports[1]
    b1 = cluster.backends[0]
    held = [websocket.create_connection(f"ws://127.0.0.1:{a}/lc", timeout=10) for _ in range(3)]
    opened = []
    try:
        assert {json.loads(ws.recv())["backend"] for ws in held} == {"b1"}   # A: b1 only
        wait_for(lambda: cluster.row(b, "lc", b1)["remote_active"] == 3, timeout=SLOW,
                 message="B sees A's 3 tunnels on b1")
        for _ in range(4):                        # b2 and b3 stay below 3 for 4 tunnels
            ws = websocket.create_connection(f"ws://127.0.0.1:{b}/lc", timeout=10)
            opened.append(ws)
            assert json.loads(ws.recv())["backend"] != "b1"
    finally:
        for ws in held + opened:
            ws.close()
    wait_for(lambda: cluster.row(b, "lc", b1)["remote_active"] == 0, timeout=SLOW,
             message="A's closed tunnels no longer counted on B")


def test_server_down_by_one_instances_checks_is_down_for_all(cluster):
    bh = cluster.backends[3]
    b, c = cluster.ports[1], cluster.ports[2]
    port = bh.port
    bh.stop()
    wait_for(lambda: cluster.row(b, "checked", bh)["state"] == "down"
             and cluster.row(c, "checked", bh)["state"] == "down", timeout=SLOW,
             message="bh down on B and C (only A checks it)")
    assert {backend_from(b, "127.0.0.1", "/checked") for _ in range(6)} == {"b1"}
    cluster.backends[3] = cluster.keep(Backend("bh", port=port))
    wait_for(lambda: cluster.row(b, "checked", bh)["state"] == "up", timeout=SLOW,
             message="bh up again on B once A's checks pass")


def served_everywhere(cluster, ips, path="/outage"):
    """One request per client on every instance, every one answered; and an upgrade."""
    seen = {}
    for i, ip in enumerate(ips):
        seen[ip] = backend_from(cluster.ports[i % 3], ip, path)
    for port in cluster.ports:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/lc", timeout=10)
        try:
            assert json.loads(ws.recv())["backend"]
        finally:
            ws.close()
    return seen


def states(cluster):
    return [cluster.store(port)["state"] for port in cluster.ports]


def test_stalled_killed_and_restarted_store_leaves_every_request_served(cluster):
    redis = cluster.redis
    redis.stall()
    try:
        stalled = served_everywhere(cluster, [f"127.0.5.{i}" for i in range(2, 14)])
        wait_for(lambda: states(cluster) == ["degraded"] * 3, timeout=SLOW,
                 message="every instance reports the stalled store")
        served_everywhere(cluster, [f"127.0.5.{i}" for i in range(20, 26)])
    finally:
        redis.resume()
    wait_for(lambda: states(cluster) == ["ok"] * 3, timeout=SLOW, message="store back")
    # Entries made while it was stalled were written back: every instance learns them.
    for ip, owner in stalled.items():
        wait_for(lambda: set(answers(cluster, ip, "/outage")) == {owner}, timeout=SLOW,
                 message=f"{ip} on {owner} everywhere")

    redis.kill()
    served_everywhere(cluster, [f"127.0.6.{i}" for i in range(2, 8)])
    wait_for(lambda: states(cluster) == ["degraded"] * 3, timeout=SLOW,
             message="every instance reports the killed store")
    served_everywhere(cluster, [f"127.0.6.{i}" for i in range(10, 16)])
    redis.start()                                 # empty, on the same port
    wait_for(lambda: states(cluster) == ["ok"] * 3
             and all(cluster.store(p)["instances"] == 3 for p in cluster.ports),
             timeout=SLOW, message="sharing resumed after the restart")
    clients = [f"127.0.7.{i}" for i in range(2, 14)]
    first = {ip: backend_from(cluster.ports[0], ip, "/outage") for ip in clients}
    for ip, owner in first.items():
        wait_for(lambda: set(answers(cluster, ip, "/outage")) == {owner}, timeout=SLOW,
                 message=f"{ip} shared after the restart")
    log = "".join(mplb.output() for mplb in cluster.items if isinstance(mplb, Mplb))
    assert "redis://127.0.0.1" in log and "unreachable" in log and "is back" in log


def test_a_reload_joins_changes_and_leaves_the_store(cluster):
    import signal
    port = free_port()
    b1 = cluster.backends[0].url

    def conf(store_line):
        return (f"{store_line}\nupstream app {{ persistence ip_hash; server {b1}; }}\n"
                f"server {{ listen 127.0.0.1:{port}; location = /status {{ mplb_status; }}"
                f" location / {{ proxy_pass app; }} }}\n")

    lb = Mplb(conf(""), workers=1, wait_ports=[port], name="mplb-reload")
    try:
        assert Cluster.status(port)["store"] is None
        steps = [(f"shared_store {cluster.redis.url} prefix=other timeout=500ms;", "ok"),
                 (f"shared_store redis://127.0.0.1:{free_port()} prefix=other;", "degraded"),
                 ("", None)]
        for line, state in steps:
            lb.rewrite(conf(line))
            lb.signal(signal.SIGHUP)
            wait_for(lambda: (Cluster.status(port)["store"] or {}).get("state") == state,
                     timeout=SLOW, message=f"store {state} after the reload")
            assert backend_from(port, "127.0.0.1", "/") == "b1"
        assert "left" in lb.output()
    finally:
        lb.stop()
