"""End to end: balancing, persistence and health through a real mplb with 4 workers.

Every test starts real backends (tests/backend_server.py, which names itself in every JSON
answer and WebSocket welcome) and a real mplb master with 4 workers, then drives it with
new client connections: each one may be accepted by any worker, so what is checked here
is what the workers share through the segment (tables, counters, health).
"""
from __future__ import annotations

import json
import re

import pytest
import websocket

from tests.harness import backend_pool, Backend, Mplb, free_port, get, get_json, wait_for

pytestmark = pytest.mark.timeout(180)
WORKERS = 4


def conf_for(port, servers, method="weighted_round_robin", persistence="none", extra=""):
    """One upstream ``app`` behind ``/``, and the status location."""
    lines = "\n".join(f"        server {s};" for s in servers)
    return f"""
worker_processes {WORKERS};
upstream app {{
    method {method};
    persistence {persistence};
{lines}
    {extra}
}}
server {{
    listen 127.0.0.1:{port};
    location = /status {{ mplb_status; }}
    location / {{ proxy_pass app; }}
}}
"""


def start(servers, **kw):
    port = free_port()
    lb = Mplb(conf_for(port, servers, **kw), workers=WORKERS, wait_ports=[port])
    return lb, port


def backend_of(port, path="/", headers=None):
    """(status, backend name or None, response headers) of one request on a new connection."""
    status, headers_out, body = get(port, path, headers)
    name = None
    if status == 200:
        name = json.loads(body)["backend"]
    return status, name, headers_out


def backend_from(port, source_ip):
    """The backend answering a new connection made from ``source_ip`` (any 127.x works)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source_ip, 0))
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["backend"]
    finally:
        conn.close()


def open_ws(port, path="/ws", **options):
    """A WebSocket through mplb and the name of the backend that welcomed it."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=10, **options)
    return ws, json.loads(ws.recv())["backend"]


def status(port):
    code, data = get_json(port, "/status")
    assert code == 200
    return data


def server_rows(port, upstream="app"):
    return {row["server"]: row for row in status(port)["upstreams"][upstream]["servers"]}


def worker_requests(port):
    return {w["pid"]: w["requests"] for w in status(port)["workers"]}


def hostport(backend):
    return f"127.0.0.1:{backend.port}"


@pytest.fixture(scope="module")
def backends():
    with backend_pool("b") as started:
        yield started


@pytest.fixture
def cleanup():
    """Stops whatever the test registers, even when it fails."""
    items = []
    yield items
    for item in reversed(items):
        try:
            item.close() if isinstance(item, websocket.WebSocket) else item.stop()
        except Exception as exc:            # noqa: BLE001 - report, keep cleaning up
            print(f"cleanup: {exc!r}")


def spread_over_workers(port, before) -> int:
    """How many workers served requests since ``before`` (a worker_requests snapshot)."""
    after = worker_requests(port)
    return sum(1 for pid, n in after.items() if n > before.get(pid, 0))


def across_workers(port, request, count=40, limit=400):
    """``request()`` on ``count`` new connections, and on more until at least two
    workers served some.  The kernel decides which worker accepts a connection; going
    on until it spread keeps these tests about what workers share, not about luck."""
    before = worker_requests(port)
    results = [request() for _ in range(count)]
    while spread_over_workers(port, before) < 2:
        assert len(results) < limit, f"{limit} connections all landed on one worker"
        results += [request() for _ in range(10)]
    return results


# -- persistence ---------------------------------------------------------------------------

def test_ip_hash_sticks_whichever_worker_accepts(backends, cleanup):
    lb, port = start([b.url for b in backends], persistence="ip_hash")
    cleanup.append(lb)
    names = set(across_workers(port, lambda: backend_of(port)[1]))
    assert len(names) == 1, names
    wait_for(lambda: status(port)["upstreams"]["app"]["persistence_entries"] == 1,
             timeout=5, message="one table entry (counts are cached for a second)")
    ws, name = open_ws(port)
    cleanup.append(ws)
    assert {name} == names
    # Many clients, so every worker's rotation moves on: each must still stick.
    clients = [f"127.0.0.{i}" for i in range(2, 14)]
    seen = {ip: set() for ip in clients}
    for _ in range(6):
        for ip in clients:
            seen[ip].add(backend_from(port, ip))
    assert all(len(owners) == 1 for owners in seen.values()), seen
    assert len({owner for owners in seen.values() for owner in owners}) >= 2, seen
    line = wait_for(lambda: re.search(
        r"upgrade GET /ws client=127\.0\.0\.1:\d+ upstream=app server=127\.0\.0\.1:\d+ "
        r"persistence=ip_hash (hit|miss|repick)", lb.output()), message="upgrade log line")
    assert line.group(1) == "hit"


def test_cookie_sticks_forged_is_replaced_and_set_on_101(backends, cleanup):
    lb, port = start([b.url for b in backends], persistence="cookie ttl=1h")
    cleanup.append(lb)
    _, first, headers = backend_of(port)
    cookie_line = headers["set-cookie"]
    assert re.fullmatch(r"MPLB_SESSION=[\w-]+\.[\w-]+; Path=/; HttpOnly; SameSite=Lax; "
                        r"Max-Age=3600", cookie_line), cookie_line
    cookie = cookie_line.split(";")[0]
    for _, name, headers in across_workers(
            port, lambda: backend_of(port, headers={"Cookie": f"x=1; {cookie}"})):
        assert name == first and "set-cookie" not in headers
    value = cookie.split("=", 1)[1]
    token, mac = value.split(".")
    for forged in (f"{token}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",   # altered mac
                   f"{'A' if token[0] != 'A' else 'B'}{token[1:]}.{mac}",   # altered server
                   "garbage"):
        _, _, headers = backend_of(port, headers={"Cookie": f"MPLB_SESSION={forged}"})
        fresh = headers["set-cookie"].split(";")[0]
        assert fresh.startswith("MPLB_SESSION=") and fresh != f"MPLB_SESSION={forged}"
        owner = backend_of(port, headers={"Cookie": fresh})[1]
        assert all(backend_of(port, headers={"Cookie": fresh})[1] == owner for _ in range(5))
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=10)
    cleanup.append(ws)
    assert ws.getstatus() == 101
    assert ws.getheaders()["set-cookie"].startswith("MPLB_SESSION=")
    ws2 = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=10,
                                      cookie=cookie)
    cleanup.append(ws2)
    assert json.loads(ws2.recv())["backend"] == first
    assert "set-cookie" not in ws2.getheaders()


def test_learned_session_cookie_routes_to_its_backend(backends, cleanup):
    lb, port = start([b.url for b in backends], persistence="cookie learn=JSESSIONID")
    cleanup.append(lb)
    owners = {}
    for session in ("abc", "def", "ghi"):
        status_code, owner, headers = backend_of(port, f"/set-cookie/JSESSIONID/{session}")
        assert status_code == 200 and headers["set-cookie"].startswith(f"JSESSIONID={session}")
        owners[session] = owner
    # The rotation is shared by the workers: three new sessions, three servers.
    assert len(set(owners.values())) == 3, owners
    sessions = list(owners.items()) * 40

    def next_session_routed():
        session, owner = sessions.pop()
        return backend_of(port, headers={"Cookie": f"a=b; JSESSIONID={session}"})[1] == owner
    assert all(across_workers(port, next_session_routed, count=45, limit=100))


def test_repick_when_persisted_backend_dies(cleanup):
    pool = [Backend(f"r{i}") for i in range(3)]
    cleanup.extend(pool)
    lb, port = start([b.url for b in pool], persistence="ip_hash")
    cleanup.append(lb)
    first = backend_of(port)[1]
    dead = next(b for b in pool if b.backend_name == first)
    dead.stop()
    ws, moved = open_ws(port)             # connect refused -> failed -> fresh pick
    cleanup.append(ws)
    assert moved != first
    line = wait_for(lambda: re.search(r"upgrade GET /ws client=\S+ upstream=app "
                                      r"server=(\S+) persistence=ip_hash repick", lb.output()),
                    message="repick log line")
    moved_backend = next(b for b in pool if b.backend_name == moved)
    assert line.group(1) == hostport(moved_backend)
    assert {backend_of(port)[1] for _ in range(20)} == {moved}     # the record moved
    assert server_rows(port)[hostport(dead)]["state"] == "failed"


def stale_pooled_connection(cleanup):
    """One worker, two servers, ip_hash: the client's server answers once (its upstream
    connection goes back to the pool) and then dies.  Returns (port, dead server name)."""
    pool = [Backend(f"s{i}") for i in range(2)]
    cleanup.extend(pool)
    port = free_port()
    lb = Mplb(conf_for(port, [b.url for b in pool], persistence="ip_hash"), workers=1,
              wait_ports=[port])
    cleanup.append(lb)
    first = backend_of(port)[1]
    next(b for b in pool if b.backend_name == first).stop()
    return port, first


def test_upgrade_on_stale_pooled_connection_moves_to_next_server(cleanup):
    """The upgrade takes the very connection the previous request pooled: its backend is
    gone, reconnecting is refused, and the upgrade must still succeed on the other server
    (proxy_next_upstream error), not end in 502."""
    port, first = stale_pooled_connection(cleanup)
    ws, moved = open_ws(port)
    cleanup.append(ws)
    assert moved != first


def test_post_never_uses_a_stale_pooled_connection(cleanup):
    """A body cannot be replayed, so a pooled connection is checked before a POST uses it:
    the dead server's connection is noticed and the POST goes to the other server."""
    import http.client
    port, first = stale_pooled_connection(cleanup)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/echo-body", body=b"payload")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"payload"
        assert response.getheader("X-Backend") != first
    finally:
        conn.close()


# -- least_connections ----------------------------------------------------------------------

def test_least_connections_balances_tunnels_across_workers(backends, cleanup):
    lb, port = start([b.url for b in backends], method="least_connections")
    cleanup.append(lb)
    tunnels = {b.backend_name: [] for b in backends}
    for _ in range(30):
        ws, name = open_ws(port)
        cleanup.append(ws)
        tunnels[name].append(ws)
    counts = {name: len(held) for name, held in tunnels.items()}
    assert all(9 <= n <= 11 for n in counts.values()), counts
    rows = server_rows(port)
    assert sorted(r["tunnels"] for r in rows.values()) == sorted(counts.values())
    # b0 keeps its tunnels, the others lose 6 each: new tunnels must go to b1 and b2.
    for name in ("b1", "b2"):
        for ws in tunnels[name][:6]:
            ws.close()
    wait_for(lambda: sum(r["active"] for r in server_rows(port).values()) == 30 - 12,
             message="closed tunnels released")
    newcomers = [open_ws(port) for _ in range(10)]
    cleanup.extend(ws for ws, _ in newcomers)
    assert "b0" not in {name for _, name in newcomers}
    active = {row["server"]: row["active"] for row in server_rows(port).values()}
    assert max(active.values()) - min(active.values()) <= 2, active


# -- limits, backup, down --------------------------------------------------------------------

def test_max_conns_counts_tunnels_of_all_workers(backends, cleanup):
    b0, b1, _ = backends
    lb, port = start([f"{b0.url} weight=10 max_conns=2", f"{b1.url} max_conns=2"])
    cleanup.append(lb)
    names = []
    for _ in range(4):
        ws, name = open_ws(port)
        cleanup.append(ws)
        names.append(name)
    assert names[:2] == ["b0", "b0"] and sorted(names[2:]) == ["b1", "b1"], names
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        open_ws(port)
    assert refused.value.status_code == 502
    assert get(port, "/")[0] == 502                     # plain HTTP too: nothing available
    cleanup[-1].close()                                 # one b1 tunnel ends
    wait_for(lambda: server_rows(port)[hostport(b1)]["active"] == 1, message="slot freed")
    ws, name = open_ws(port)
    cleanup.append(ws)
    assert name == "b1"


def test_backup_only_when_primaries_are_gone_and_down_never(backends, cleanup):
    pool = [Backend(f"p{i}") for i in range(2)]
    cleanup.extend(pool)
    b_down, b_backup = backends[0], backends[1]
    lb, port = start([pool[0].url, pool[1].url, f"{b_down.url} down",
                      f"{b_backup.url} backup"])
    cleanup.append(lb)
    assert {backend_of(port)[1] for _ in range(20)} == {"p0", "p1"}
    rows = server_rows(port)
    assert rows[hostport(b_down)]["state"] == "down"
    assert rows[hostport(b_backup)]["state"] == "backup"
    for backend in pool:
        backend.stop()
    assert {backend_of(port)[1] for _ in range(10)} == {b_backup.backend_name}
    assert server_rows(port)[hostport(b_down)]["requests"] == 0


# -- health ---------------------------------------------------------------------------------

def test_passive_failure_is_shared_by_all_workers(backends, cleanup):
    dead_port = free_port()
    lb, port = start([f"http://127.0.0.1:{dead_port} max_fails=1 fail_timeout=30s",
                      backends[0].url, backends[1].url])
    cleanup.append(lb)
    names = across_workers(port, lambda: backend_of(port)[1])
    assert set(names) == {"b0", "b1"}                   # retried elsewhere, never failed
    dead = server_rows(port)[f"127.0.0.1:{dead_port}"]
    assert dead["state"] == "failed"
    assert dead["failures"] == 1, "each worker had to find the dead server by itself"


def test_active_health_check_once_for_all_workers(cleanup):
    pool = [Backend(f"h{i}") for i in range(2)]
    cleanup.extend(pool)
    lb, port = start([b.url for b in pool],
                     extra="health_check interval=0.5s fails=1 passes=1 timeout=1s;")
    cleanup.append(lb)
    watched = pool[1]
    wait_for(lambda: {backend_of(port)[1] for _ in range(4)} == {"h0", "h1"},
             message="both up")
    watched.stop()
    wait_for(lambda: server_rows(port)[hostport(watched)]["state"] == "down", timeout=10,
             message="health check marks it down")
    assert {backend_of(port)[1] for _ in range(20)} == {"h0"}
    assert server_rows(port)[hostport(watched)]["failures"] == 0   # no request tried it
    revived = Backend("h1", port=watched.port)
    cleanup.append(revived)
    wait_for(lambda: server_rows(port)[hostport(watched)]["state"] == "up", timeout=10,
             message="health check marks it up")
    assert "h1" in {backend_of(port)[1] for _ in range(10)}
    output = lb.output()
    down = re.findall(rf"\[warn\] (\d+)#\d+: upstream app server {hostport(watched)} "
                      rf"is down", output)
    up = re.findall(rf"\[warn\] (\d+)#\d+: upstream app server {hostport(watched)} is up",
                    output)
    assert down == [str(lb.pid)] and up == [str(lb.pid)], output[-2000:]


def test_records_survive_a_reload_that_reorders_servers(cleanup):
    pool = [Backend(f"o{i}") for i in range(4)]
    cleanup.extend(pool)
    port = free_port()
    servers = [b.url for b in pool[:3]]
    lb = Mplb(conf_for(port, servers, persistence="ip_hash"), workers=WORKERS,
              wait_ports=[port])
    cleanup.append(lb)
    clients = [f"127.0.0.{i}" for i in range(2, 10)]
    owners = {ip: backend_from(port, ip) for ip in clients}
    assert len(set(owners.values())) >= 2
    generation = status(port)["generation"]
    lb.rewrite(conf_for(port, [pool[3].url] + servers[::-1], persistence="ip_hash"))
    lb.signal(1)                                        # SIGHUP: reload
    wait_for(lambda: status(port)["generation"] > generation and
             all(w["generation"] > generation for w in status(port)["workers"]),
             timeout=20, message="new generation of workers")
    for _ in range(3):
        assert {ip: backend_from(port, ip) for ip in clients} == owners
