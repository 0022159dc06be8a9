"""Balancing methods and the shared eligibility filter (no sockets, injected clock)."""
import os

import pytest
from hypothesis import given, settings, strategies as st

from mplb.balancing import init_upstream
from mplb.config.model import Upstream, UpstreamServer
from mplb.shm import SharedState


def srv(port, weight=1, **kw):
    return UpstreamServer(url=f"http://127.0.0.1:{port}", host="127.0.0.1", port=port,
                          address="127.0.0.1", weight=weight, **kw)


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def shared(tmp_path):
    state = SharedState.create(str(tmp_path / f"mplb.{os.getpid()}"), max_workers=4,
                               max_servers=64, table_entries=4096)
    for slot in range(4):
        state.worker_started(slot, 1000 + slot, 1)
    yield state
    state.close()
    state.unlink()


def picks(balancer, n, tried=frozenset()):
    out = []
    for _ in range(n):
        pick = balancer.get(None, tried)
        out.append(None if pick is None else pick.index)
        balancer.free(pick, False)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=6))
def test_wrr_every_window_has_exact_shares(weights):
    up = Upstream("b", servers=tuple(srv(8000 + i, w) for i, w in enumerate(weights)))
    balancer = init_upstream(up, None, 0)
    total = sum(weights)
    seq = picks(balancer, 3 * total)
    for start in range(len(seq) - total + 1):
        window = seq[start:start + total]
        assert [window.count(i) for i in range(len(weights))] == weights


def test_smooth_sequence_large_weights_are_scaled_not_expanded():
    from mplb.methods import MAX_SEQUENCE, smooth_sequence
    assert smooth_sequence([300, 100]) == [0, 0, 1, 0]            # divided by the gcd
    order = smooth_sequence([10**6, 3 * 10**6 + 1])
    assert len(order) <= MAX_SEQUENCE
    assert abs(order.count(1) / len(order) - 0.75) < 0.01


def test_wrr_is_smooth_not_bursty():
    up = Upstream("b", servers=(srv(1, 5), srv(2, 1), srv(3, 1)))
    assert picks(init_upstream(up, None, 0), 7) == [0, 0, 1, 0, 2, 0, 0]


def test_rotation_is_shared_by_the_workers(shared):
    """A handful of requests taken by different workers still rotates over the servers
    (each worker starting its own rotation at server 0 sent them all to one server)."""
    up = Upstream("b", servers=(srv(1), srv(2), srv(3)))
    workers = [init_upstream(up, shared, slot) for slot in range(3)]
    seen = []
    for worker in workers:
        pick = worker.get(None, frozenset())
        seen.append(pick.index)
        worker.free(pick, False)
    assert seen == [0, 1, 2]
    weighted = Upstream("w", servers=(srv(1, 5), srv(2, 1), srv(3, 1)))
    workers = [init_upstream(weighted, shared, slot) for slot in range(2)]
    assert [picks(workers[k % 2], 1)[0] for k in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_least_connections_ties_rotate_across_workers(shared):
    up = Upstream("lc", method="least_connections", servers=(srv(1), srv(2), srv(3)))
    workers = [init_upstream(up, shared, slot) for slot in range(3)]
    assert [picks(worker, 1)[0] for worker in workers] == [0, 1, 2]


def test_round_robin_ignores_weights():
    up = Upstream("b", method="round_robin", servers=(srv(1, 5), srv(2, 1), srv(3, 1)))
    assert picks(init_upstream(up, None, 0), 6) == [0, 1, 2, 0, 1, 2]


def test_least_connections_ties_rotate():
    up = Upstream("b", method="least_conn", servers=(srv(1), srv(2), srv(3)))
    assert picks(init_upstream(up, None, 0), 6) == [0, 1, 2, 0, 1, 2]


def test_least_connections_counts_all_workers(shared):
    up = Upstream("b", method="least_connections", servers=(srv(1), srv(2)))
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    a = w0.get(None, frozenset())
    b = w1.get(None, frozenset())            # sees w0's connection on a
    assert a.index != b.index
    c = w0.get(None, frozenset())
    d = w0.get(None, frozenset())
    assert {c.index, d.index} == {0, 1}
    assert shared.active_total(a.sid) == 2 and shared.active_total(b.sid) == 2
    for p, w in ((a, w0), (c, w0), (d, w0)):
        w.free(p, False)
    assert shared.active_total(b.sid) == 1 and shared.active_total(a.sid) == 0
    assert w0.get(None, frozenset()).index == a.index


def test_least_connections_divides_by_weight(shared):
    up = Upstream("b", method="least_connections", servers=(srv(1, 3), srv(2, 1)))
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    held = [w0.get(None, frozenset()) if i % 2 else w1.get(None, frozenset()) for i in range(8)]
    assert [p.index for p in held].count(0) == 6       # 6/3 == 2/1


def test_max_conns_across_workers(shared):
    up = Upstream("b", servers=(srv(1, max_conns=1), srv(2, backup=True)))
    w0, w1 = init_upstream(up, shared, 0), init_upstream(up, shared, 1)
    first = w0.get(None, frozenset())
    assert first.index == 0
    assert w1.get(None, frozenset()).index == 1          # primary full in another worker
    w0.free(first, False)
    assert w1.get(None, frozenset()).index == 0


def test_backup_only_when_no_primary():
    up = Upstream("b", servers=(srv(1), srv(2), srv(3, backup=True)))
    balancer = init_upstream(up, None, 0)
    assert 2 not in picks(balancer, 10)
    assert picks(balancer, 3, frozenset({0, 1})) == [2, 2, 2]
    assert picks(balancer, 1, frozenset({0, 1, 2})) == [None]


def test_down_servers_skipped():
    up = Upstream("b", servers=(srv(1, down=True), srv(2)))
    assert picks(init_upstream(up, None, 0), 4) == [1, 1, 1, 1]
    up = Upstream("b", servers=(srv(1, down=True),))
    assert picks(init_upstream(up, None, 0), 1) == [None]


@pytest.mark.parametrize("use_shm", [False, True])
def test_passive_failure_and_recovery(use_shm, shared):
    clock = Clock()
    up = Upstream("b", servers=(srv(1, max_fails=2, fail_timeout=10), srv(2)))
    balancer = init_upstream(up, shared if use_shm else None, 0, clock=clock)
    for _ in range(2):
        pick = balancer.get(None, frozenset({1}))
        assert pick.index == 0
        balancer.free(pick, True)
    assert picks(balancer, 4) == [1, 1, 1, 1]
    assert picks(balancer, 1, frozenset({1})) == [None]
    clock.t += 10.0
    assert sorted(picks(balancer, 2)) == [0, 1]         # success after the window resets
    clock.t += 100
    pick = balancer.get(None, frozenset({1}))
    balancer.free(pick, True)                           # one failure: below max_fails
    assert sorted(picks(balancer, 2)) == [0, 1]


def test_failures_outside_window_do_not_accumulate():
    clock = Clock()
    up = Upstream("b", servers=(srv(1, max_fails=2, fail_timeout=10),))
    balancer = init_upstream(up, None, 0, clock=clock)
    balancer.free(balancer.get(None, frozenset()), True)
    clock.t += 11
    balancer.free(balancer.get(None, frozenset()), True)
    assert picks(balancer, 1) == [0]


def test_max_fails_zero_disables_accounting():
    up = Upstream("b", servers=(srv(1, max_fails=0),))
    balancer = init_upstream(up, None, 0)
    for _ in range(5):
        balancer.free(balancer.get(None, frozenset()), True)
    assert picks(balancer, 1) == [0]


def test_active_health_down_skipped(shared):
    up = Upstream("b", servers=(srv(1), srv(2)))
    balancer = init_upstream(up, shared, 0)
    shared.set_health(balancer.sids[0], False)
    assert picks(balancer, 3) == [1, 1, 1]
    shared.set_health(balancer.sids[0], True)
    assert sorted(picks(balancer, 2)) == [0, 1]


def test_free_is_idempotent_and_counts(shared):
    up = Upstream("b", servers=(srv(1),))
    balancer = init_upstream(up, shared, 2)
    pick = balancer.get(None, frozenset())
    balancer.free(pick, True)
    balancer.free(pick, True)
    assert shared.active_total(pick.sid) == 0
    assert shared.server_counters(pick.server.url)["failures"] == 1


def test_slots_started_later_are_summed(tmp_path):
    """A worker slot that starts after the balancer was built still counts (max_conns)."""
    shared = SharedState.create(str(tmp_path / "mplb.late"), max_workers=8, max_servers=8,
                                table_entries=16)
    shared.worker_started(0, 1000, 1)
    up = Upstream("b", servers=(srv(1, max_conns=2), srv(2)))
    w0 = init_upstream(up, shared, 0)
    assert w0.active_total(0) == 0
    shared.worker_started(5, 2000, 1)                 # e.g. TTIN: a new slot in use
    late = init_upstream(up, shared, 5)
    held = [late.get(None, frozenset({1})) for _ in range(2)]
    assert [p.index for p in held] == [0, 0]
    assert w0.active_total(0) == 2
    assert picks(w0, 3) == [1, 1, 1]                   # server 0 is at max_conns
    late.free(held[0], False)
    assert 0 in picks(w0, 2)
    shared.close()
    shared.unlink()


def test_clock_read_only_when_failures_exist():
    calls = []

    def clock():
        calls.append(1)
        return 1000.0
    up = Upstream("b", servers=(srv(1), srv(2, max_conns=5)))
    balancer = init_upstream(up, None, 0, clock=clock)
    picks(balancer, 10)
    assert calls == []                                  # the hot path never asked
    balancer.free(balancer.get(None, frozenset({1})), True)
    assert picks(balancer, 3) == [1, 1, 1] and calls


def test_word_sum_matches_slices():
    from mplb.balancing import word_sum
    words = list(range(1000))
    for count in (0, 1, 4, 32, 33, 60):
        assert word_sum(7, 8, count)(words) == sum(words[7:7 + 8 * count:8])


def test_single_server_is_never_failed_by_passive_checks():
    """nginx rule: max_fails/fail_timeout are ignored when a group has one server."""
    from mplb.config.model import Upstream, UpstreamServer
    from mplb.balancing import init_upstream
    server = UpstreamServer(url="http://127.0.0.1:9", host="127.0.0.1", port=9,
                            address="127.0.0.1", max_fails=1, fail_timeout=60.0)
    balancer = init_upstream(Upstream(name="one", servers=(server,)), None, 0)
    for _ in range(3):
        pick = balancer.get(None)
        assert pick is not None
        balancer.free(pick, True)
    pair = Upstream(name="two", servers=(server, UpstreamServer(
        url="http://127.0.0.1:10", host="127.0.0.1", port=10, address="127.0.0.1")))
    balancer = init_upstream(pair, None, 0)
    first = balancer.get(None)
    balancer.free(first, True)
    assert all(balancer.get(None).index != first.index for _ in range(3))
