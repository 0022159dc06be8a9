"""Persistence wrappers: ip_hash, insert cookie, learn cookie, consistent hash."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from mplb.balancing import init_upstream
from mplb.config.model import Persistence, Template, Upstream, UpstreamServer
from mplb.config.values import Stmt, compile_template
from mplb.shm import SharedState


def srv(port, weight=1, **kw):
    return UpstreamServer(url=f"http://10.0.0.1:{port}", host="10.0.0.1", port=port,
                          address="10.0.0.1", weight=weight, **kw)


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class Req:
    def __init__(self, ip="192.0.2.1", cookie=None, **variables):
        self.client_ip = ip
        self.headers = {} if cookie is None else {"cookie": cookie}
        self.variables = variables

    def header(self, name):
        return self.headers.get(name)

    def variable(self, name):
        return self.variables.get(name, "")


@pytest.fixture
def shared(tmp_path):
    state = SharedState.create(str(tmp_path / f"mplb.{os.getpid()}"), max_workers=4,
                               max_servers=64, table_entries=200000)
    for slot in range(4):
        state.worker_started(slot, 1000 + slot, 1)
    yield state
    state.close()
    state.unlink()


def upstream(servers, **persistence):
    return Upstream("app", persistence=Persistence(**persistence), servers=tuple(servers))


def get_free(balancer, request, tried=frozenset(), failed=False):
    pick = balancer.get(request, tried)
    balancer.free(pick, failed)
    return pick


# -- ip_hash ---------------------------------------------------------------------------

def test_ip_hash_sticks_across_workers(shared):
    up = upstream([srv(1), srv(2), srv(3)], kind="ip_hash", ttl=3600)
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    first = get_free(w0, Req("198.51.100.7"))
    assert first.persistence == "miss"
    for worker in (w1, w0, w1):
        again = get_free(worker, Req("198.51.100.7"))
        assert (again.index, again.persistence) == (first.index, "hit")
    assert shared.tables()["app:ip_hash:65536"]["entries"] == 1


def test_ip_hash_repick_updates_record(shared):
    up = upstream([srv(1), srv(2)], kind="ip_hash", ttl=3600)
    balancer = init_upstream(up, shared, 0)
    first = get_free(balancer, Req())
    moved = get_free(balancer, Req(), tried=frozenset({first.index}))
    assert moved.persistence == "repick" and moved.index != first.index
    again = get_free(balancer, Req())
    assert (again.index, again.persistence) == (moved.index, "hit")


def test_ip_hash_racing_first_requests_follow_the_first_record(shared):
    up = upstream([srv(1), srv(2), srv(3)], kind="ip_hash", ttl=3600)
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    get_free(w1, Req("192.0.2.200"))                   # w1's rotation moves on
    first = get_free(w0, Req("198.51.100.9"))
    w1.persistence.lookup = lambda request, now: None  # w1 looked before w0 recorded
    pick = get_free(w1, Req("198.51.100.9"))
    assert (pick.index, pick.persistence) == (first.index, "hit")
    del w1.persistence.lookup
    assert get_free(w1, Req("198.51.100.9")).index == first.index


def test_ip_hash_survives_reordered_reload(shared):
    servers = [srv(1), srv(2), srv(3)]
    before = init_upstream(upstream(servers, kind="ip_hash", ttl=60), shared, 0)
    first = get_free(before, Req("203.0.113.9"))
    after = init_upstream(upstream(servers[::-1], kind="ip_hash", ttl=60), shared, 1)
    again = get_free(after, Req("203.0.113.9"))
    assert again.persistence == "hit" and again.server.url == first.server.url


def test_ip_hash_removed_server_is_repicked(shared):
    servers = [srv(1), srv(2)]
    before = init_upstream(upstream(servers, kind="ip_hash", ttl=60), shared, 0)
    first = get_free(before, Req())
    rest = [s for s in servers if s.url != first.server.url]
    after = init_upstream(upstream(rest, kind="ip_hash", ttl=60), shared, 0)
    assert get_free(after, Req()).persistence == "repick"


def test_ip_hash_ttl_expiry():
    clock = Clock()
    up = upstream([srv(1), srv(2)], kind="ip_hash", ttl=30)
    balancer = init_upstream(up, None, 0, clock=clock)
    get_free(balancer, Req())
    clock.t += 29
    assert get_free(balancer, Req()).persistence == "hit"     # use refreshes the entry
    clock.t += 29
    assert get_free(balancer, Req()).persistence == "hit"
    clock.t += 31
    assert get_free(balancer, Req()).persistence == "miss"


def test_ip_hash_backup_gives_way_to_primary():
    up = upstream([srv(1), srv(2, backup=True)], kind="ip_hash", ttl=60)
    balancer = init_upstream(up, None, 0)
    assert get_free(balancer, Req(), tried=frozenset({0})).index == 1
    pick = get_free(balancer, Req())
    assert (pick.index, pick.persistence) == (0, "repick")


def test_ip_hash_bounds_hostile_input():
    up = upstream([srv(1)], kind="ip_hash", ttl=60)
    balancer = init_upstream(up, None, 0)
    assert get_free(balancer, Req("x" * 100000 + "\udcff")).index == 0


# -- cookie (insert) -------------------------------------------------------------------

def set_cookie(lines):
    assert len(lines) == 1
    line = lines[0].decode()
    assert line.startswith("Set-Cookie: MPLB_SESSION=") and line.endswith("\r\n")
    assert "; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400" in line
    return line.split(":", 1)[1].strip().split(";")[0]


def cookie_for(balancer, request=None):
    pick = get_free(balancer, request or Req())
    return pick, set_cookie(balancer.response_headers(pick, request, []))


def test_cookie_inserted_then_hit():
    balancer = init_upstream(upstream([srv(1), srv(2)], kind="cookie"), None, 0)
    first, cookie = cookie_for(balancer)
    assert first.persistence == "miss"
    for _ in range(3):
        request = Req(cookie=f"other=1; {cookie}; x=y")
        pick = get_free(balancer, request)
        assert (pick.index, pick.persistence) == (first.index, "hit")
        assert balancer.response_headers(pick, request, []) == []


@pytest.mark.parametrize("mangle", [
    lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"),        # altered mac
    lambda v: ("A" if v[0] != "A" else "B") + v[1:],           # altered server token
    lambda v: v + "A",                                          # too long
    lambda v: "garbage",
    lambda v: "x" * 100000,
    lambda v: "",
])
def test_cookie_forged_or_altered_is_replaced(mangle):
    balancer = init_upstream(upstream([srv(1), srv(2)], kind="cookie"), None, 0)
    _, cookie = cookie_for(balancer)
    name, value = cookie.split("=", 1)
    request = Req(cookie=f"{name}={mangle(value)}")
    pick = get_free(balancer, request)
    assert pick.persistence == "miss"
    assert set_cookie(balancer.response_headers(pick, request, []))


def test_cookie_forged_for_other_server_rejected():
    balancer = init_upstream(upstream([srv(1), srv(2)], kind="cookie", secret="s1"), None, 0)
    forger = init_upstream(upstream([srv(1), srv(2)], kind="cookie", secret="s2"), None, 0)
    _, cookie = cookie_for(forger)
    assert get_free(balancer, Req(cookie=cookie)).persistence == "miss"


def test_cookie_same_secret_interchangeable():
    up = upstream([srv(1), srv(2), srv(3)], kind="cookie", secret="shared-secret")
    one, two = init_upstream(up, None, 0), init_upstream(up, None, 0)   # two instances
    first, cookie = cookie_for(one)
    pick = get_free(two, Req(cookie=cookie))
    assert (pick.index, pick.persistence) == (first.index, "hit")


def test_cookie_random_secret_shared_by_workers(shared, tmp_path):
    up = upstream([srv(1), srv(2)], kind="cookie")
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    first, cookie = cookie_for(w0)
    assert get_free(w1, Req(cookie=cookie)).persistence == "hit"
    other = SharedState.create(str(tmp_path / "mplb.1"), max_workers=1, max_servers=8,
                               table_entries=16)
    try:
        stranger = init_upstream(up, other, 0)
        assert get_free(stranger, Req(cookie=cookie)).persistence == "miss"
    finally:
        other.close()
        other.unlink()


def test_cookie_server_down_repicks_and_resets_cookie():
    up = upstream([srv(1), srv(2)], kind="cookie")
    balancer = init_upstream(up, None, 0)
    first, cookie = cookie_for(balancer)
    request = Req(cookie=cookie)
    pick = get_free(balancer, request, tried=frozenset({first.index}))
    assert pick.persistence == "repick" and pick.index != first.index
    assert set_cookie(balancer.response_headers(pick, request, [])) != cookie


# -- cookie learn ----------------------------------------------------------------------

def test_learn_mode(shared):
    up = upstream([srv(1), srv(2), srv(3)], kind="cookie", learn="JSESSIONID", ttl=600)
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    pick = get_free(w0, Req())
    assert pick.persistence == "miss"
    backend = [(b"Content-Type", b"text/html"),
               (b"Set-Cookie", b"JSESSIONID=abc123; Path=/; HttpOnly")]
    assert w0.response_headers(pick, Req(), backend) == []
    for _ in range(4):
        again = get_free(w1, Req(cookie="JSESSIONID=abc123"))
        assert (again.index, again.persistence) == (pick.index, "hit")
    unknown = get_free(w1, Req(cookie="JSESSIONID=zzz"))
    assert unknown.persistence == "miss"
    assert get_free(w0, Req(cookie="JSESSIONID=zzz")).index == unknown.index
    moved = get_free(w1, Req(cookie="JSESSIONID=abc123"), tried=frozenset({pick.index}))
    assert moved.persistence == "repick"
    assert get_free(w0, Req(cookie="JSESSIONID=abc123")).index == moved.index


def test_learn_mode_ignores_oversized_session():
    up = upstream([srv(1), srv(2)], kind="cookie", learn="SID", ttl=600)
    balancer = init_upstream(up, None, 0)
    pick = get_free(balancer, Req())
    balancer.response_headers(pick, Req(), [("set-cookie", "SID=" + "a" * 5000)])
    assert get_free(balancer, Req(cookie="SID=" + "a" * 5000)).persistence == "miss"


# -- consistent hash -------------------------------------------------------------------

def ring(servers, key="$uri"):
    template = Template(compile_template(Stmt("key", [], "test.conf", 1), key))
    return init_upstream(upstream(servers, kind="consistent_hash", key=template), None, 0)


def test_consistent_hash_stable_and_walks_on():
    balancer = ring([srv(p) for p in range(1, 5)])
    owner = get_free(balancer, Req(uri="/a")).index
    assert all(get_free(balancer, Req(uri="/a")).index == owner for _ in range(5))
    seen = {owner}
    for _ in range(3):
        pick = get_free(balancer, Req(uri="/a"), tried=frozenset(seen))
        assert pick.persistence == "repick" and pick.index not in seen
        seen.add(pick.index)
    assert get_free(balancer, Req(uri="/a"), tried=frozenset(seen)) is None


def test_consistent_hash_key_template():
    balancer = ring([srv(p) for p in range(1, 9)], key="$http_x_user:${uri}")
    owners = {get_free(balancer, Req(http_x_user=f"u{i}", uri="/")).index for i in range(200)}
    assert len(owners) == 8


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 10), st.data())
def test_consistent_hash_removal_moves_about_one_nth(n, data):
    servers = [srv(9000 + i) for i in range(n)]
    removed = data.draw(st.integers(0, n - 1))
    before, after = ring(servers), ring(servers[:removed] + servers[removed + 1:])
    moved = 0
    for k in range(1000):
        a = get_free(before, Req(uri=f"/k{k}")).server.url
        b = get_free(after, Req(uri=f"/k{k}")).server.url
        if a != b:
            assert a == servers[removed].url
            moved += 1
    assert 1000 * 0.5 / n <= moved <= 1000 * 2 / n


def test_consistent_hash_weight_proportional():
    balancer = ring([srv(1, 3), srv(2, 1)])
    counts = [0, 0]
    for k in range(2000):
        counts[get_free(balancer, Req(uri=f"/{k}")).index] += 1
    assert 2.2 < counts[0] / counts[1] < 4.0
