"""Shared segment: layout, counters, fork inheritance, tables (TTL, LRU, multi-process)."""
import os
from collections import OrderedDict

import pytest
from hypothesis import given, settings, strategies as st

from mplb.errors import MplbError
from mplb.shm import GROUP, SharedState, segment_path


@pytest.fixture
def shared(tmp_path):
    state = SharedState.create(str(tmp_path / f"mplb.{os.getpid()}"), max_workers=4,
                               max_servers=16, table_entries=70000)
    yield state
    state.close()
    state.unlink()


def test_segment_path_names_master_pid():
    assert segment_path(4242) == "/dev/shm/mplb.4242"


def test_create_header_readonly_and_unlink(tmp_path):
    path = segment_path(os.getpid(), str(tmp_path))
    state = SharedState.create(path, max_workers=2, max_servers=8, table_entries=64)
    assert state.master_pid == os.getpid() and state.generation == 0 and state.reloads == 0
    state.set_generation(3)
    state.count_reload()
    state.server_id("http://a:1")
    reader = SharedState.open_readonly(path)
    assert (reader.generation, reader.reloads, reader.server_urls()) == (3, 1, ["http://a:1"])
    # The secrets stay in process memory: a reader of the file cannot forge cookies.
    assert reader.secret is None and len(state.secret) == 32 and len(state.salt) == 16
    with open(path, "rb") as handle:
        content = handle.read()
    assert state.secret not in content and state.salt not in content
    with pytest.raises(TypeError):
        reader.q[4] = 0                                  # mapped read-only
    with pytest.raises(KeyError):
        reader.server_id("http://unknown:1")
    reader.close()
    state.close()
    state.unlink()
    assert not os.path.exists(path)
    with pytest.raises(MplbError):
        bad = tmp_path / "mplb.1"
        bad.write_bytes(b"\0" * 4096)
        SharedState.open_readonly(str(bad))


def test_counters_summed_and_slot_reset(shared):
    for slot in range(3):
        shared.worker_started(slot, 100 + slot, 1)
    url = "http://10.0.0.1:80"
    sid = shared.server_id(url)
    for slot in range(3):
        shared.add_active(slot, sid, slot + 1)
        shared.count_request(slot, url)
        shared.add_bytes(slot, url, 10, 20)
        shared.tunnel_opened(slot, url)
    shared.tunnel_closed(0, url)
    shared.worker_connections(1, 5)
    assert shared.server_counters(url) == {"active": 6, "tunnels": 2, "requests": 3,
                                           "failures": 0, "bytes_in": 30, "bytes_out": 60}
    shared.worker_stopped(2)                     # crashed worker: live counts go
    counters = shared.server_counters(url)
    assert (counters["active"], counters["tunnels"], counters["requests"]) == (3, 1, 3)
    workers = shared.workers()
    assert [w["pid"] for w in workers] == [100, 101]
    assert workers[1]["connections"] == 5 and workers[1]["requests"] == 1


def test_directory_keeps_ids_across_reloads(shared):
    ids = [shared.server_id(f"http://h:{p}") for p in range(5)]
    assert [shared.server_id(f"http://h:{p}") for p in reversed(range(5))] == ids[::-1]
    for p in range(5, 16):
        shared.server_id(f"http://h:{p}")
    with pytest.raises(MplbError):
        shared.server_id("http://h:99")


def test_forked_worker_writes_visible_to_master(shared):
    sid = shared.server_id("http://x:1")
    shared.worker_started(1, 1, 1)
    shared.worker_started(0, 1, 1)
    pid = os.fork()
    if pid == 0:
        shared.add_active(1, sid, 7)
        shared.table("t", 64, 60).put(b"child", 42, 1.0)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert shared.active_total(sid) == 7
    assert shared.table("t", 64, 60).get(b"child", 2.0) == 42


def test_table_pool_exhaustion(shared):
    shared.table("big", 65536, 60)
    with pytest.raises(MplbError):
        shared.table("more", 65536, 60)


def test_reclaim_frees_servers_with_their_counters(shared):
    shared.worker_started(0, 100, 1)
    old = shared.server_id("http://old:1")
    shared.count_request(0, "http://old:1")
    shared.add_active(0, old, 3)
    shared.set_health(old, False)
    keep = shared.server_id("http://keep:1")
    shared.count_request(0, "http://keep:1")
    assert shared.reclaim({"http://keep:1"}, set(), set()) == {
        "servers": 1, "tables": 0, "upstreams": 0}
    assert shared.server_urls() == ["http://keep:1"]
    assert shared.usage()["servers_used"] == 1
    new = shared.server_id("http://new:1")             # the freed entry is reused, clean
    assert new == old
    assert shared.server_counters("http://new:1")["requests"] == 0
    assert shared.active_total(new) == 0 and not shared.health_down(new)
    assert shared.server_counters("http://keep:1")["requests"] == 1
    assert shared.server_id("http://keep:1") == keep


def test_directory_never_fills_when_servers_come_and_go(shared):
    """16 entries, 200 rounds of 8 fresh servers each: reclaiming keeps it going."""
    previous = set()
    for round_ in range(200):
        current = {f"http://10.{round_ // 250}.{round_ % 250}.{i}:80" for i in range(8)}
        for url in current:
            shared.server_id(url)
        shared.reclaim(current, set(), set())
        assert set(shared.server_urls()) == current
        previous = current
    assert shared.usage()["servers_used"] == len(previous)


def test_reclaimed_tables_leave_room_and_come_back_empty(shared):
    capacity = shared.usage()["table_entries_max"]
    for size in (capacity // 2, capacity // 3, capacity // 2, capacity // 4):
        name = f"t:{size}"
        table = shared.table(name, size, 60)
        table.put(b"k", 1, 1.0)
        assert table.get(b"k", 2.0) == 1
        shared.reclaim(set(), {name}, set())            # only this one remains
        assert list(shared.tables()) == [name]
    shared.reclaim(set(), set(), set())
    assert shared.usage()["table_entries_used"] == 0
    again = shared.table(f"t:{capacity // 4}", capacity // 4, 60)
    assert again.get(b"k", 2.0) is None                 # a freed table starts empty


def test_upstream_words_are_shared_and_reclaimed(shared):
    word = shared.upstream_word("app")
    assert shared.upstream_word("other") != word
    shared.q[word] = 7
    assert shared.usage()["upstreams_used"] == 2
    shared.reclaim(set(), set(), {"app"})
    assert shared.usage()["upstreams_used"] == 1 and shared.q[word] == 7
    shared.reclaim(set(), set(), set())
    assert shared.q[shared.upstream_word("fresh")] == 0


def test_workers_find_but_never_reserve(shared):
    shared.server_id("http://known:1")
    shared.table("known", 64, 60)
    shared.allocating = False                           # as in a forked worker
    assert shared.server_id("http://known:1") == 0
    assert shared.table("known", 64, 60).capacity == 64
    for reserve in (lambda: shared.server_id("http://new:1"),
                    lambda: shared.table("new", 64, 60),
                    lambda: shared.upstream_word("new"),
                    lambda: shared.reclaim(set(), set(), set())):
        with pytest.raises(MplbError):
            reserve()


def test_table_ttl_expiry(shared):
    table = shared.table("ttl", 1024, 10.0)
    table.put(b"k", 5, 100.0)
    assert table.get(b"k", 109.0) == 5                 # use refreshes: expiry is idle time
    assert table.get(b"k", 118.0) == 5
    assert shared.tables(118.0)["ttl"]["entries"] == 1
    assert table.get(b"k", 128.5) is None
    assert shared.tables(128.5)["ttl"]["entries"] == 0
    table.put(b"k", 6, 130.0)
    assert table.get(b"k", 131.0) == 6
    table.delete(b"k")
    assert table.get(b"k", 131.0) is None


def test_put_first_writer_wins_unless_replacing(shared):
    table = shared.table("first", 64, 10.0)
    assert table.put(b"client", 1, 100.0, replace=False) is None
    assert table.put(b"client", 2, 101.0, replace=False) == 1      # another worker was first
    assert table.get(b"client", 101.0) == 1
    table.put(b"client", 3, 102.0)                                  # a repick overwrites
    assert table.get(b"client", 102.0) == 3
    assert table.put(b"client", 4, 200.0, replace=False) is None    # expired: replaced
    assert table.get(b"client", 200.0) == 4


def test_count_ignores_empty_entries_early_after_boot(shared):
    table = shared.table("early", 64, 3600.0)           # cutoff below zero: 1 s after boot
    table.put(b"a", 1, 0.5)
    table.put(b"b", 2, 0.7)
    table.delete(b"b")
    assert table.count(1.0) == 1
    assert table.count(3600.6) == 0


def test_dead_writer_entry_is_repaired(shared):
    table = shared.table("torn", GROUP, 60)
    table.put(b"a", 1, 1.0)
    off = table.start
    shared.q[off] |= 1                                  # writer died mid-update
    assert table.get(b"a", 2.0) is None
    table.put(b"a", 2, 3.0)
    assert shared.q[off] % 2 == 0 and table.get(b"a", 4.0) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 40)), max_size=120))
def test_table_is_lru_within_a_group(ops):
    """One group (capacity 16): the table must behave exactly like an LRU cache."""
    from mplb.shm.local import LocalState
    table = LocalState().table("lru", GROUP, 1e6)
    model = OrderedDict()
    t = 10.0
    for op, k in ops:
        t += 2.0                                        # beyond the 1 s refresh granularity
        key = b"key%d" % k
        if op == "put":
            if key not in model and len(model) == GROUP:
                model.popitem(last=False)
            model[key] = k
            model.move_to_end(key)
            table.put(key, k, t)
        else:
            expected = model.get(key)
            if expected is not None:
                model.move_to_end(key)
            assert table.get(key, t) == expected


def test_tables_hammered_by_four_processes(tmp_path):
    """4 processes, all keys forced into a few groups so writers collide constantly.

    The interleaved runs make another process run in the middle of table updates; with
    the stripe locks switched off (``python -m tests.shm_stress --interleave --no-locks``)
    hundreds of keys are lost or duplicated, and without the seqlock (``--no-seqlock``)
    readers return values written for other keys: this test fails without either.
    """
    from tests.shm_stress import churn, interleaved, race_inserts, torn_reads
    shared = SharedState.create(str(tmp_path / "mplb.stress"), max_workers=4, max_servers=8,
                                table_entries=24 * GROUP + 5 * GROUP)
    try:
        race = shared.table("race", 24 * GROUP, 1e6)
        assert race_inserts(interleaved(race), 24) == []
        assert churn(interleaved(shared.table("churn", 2 * GROUP, 1e6), read_every=3),
                     1000) == []
        assert churn(shared.table("fast", 2 * GROUP, 1e6), 20000) == []   # full speed
        assert torn_reads(interleaved(shared.table("torn", GROUP, 1e6), read_every=3),
                          2000) == []
    finally:
        shared.close()
        shared.unlink()
