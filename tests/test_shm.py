"""Shared segment: layout, counters, fork inheritance, tables (TTL, LRU, multi-process)."""
import os
import random
from collections import OrderedDict

import pytest
from hypothesis import given, settings, strategies as st

from mplb.errors import MplbError
from mplb.shm import GROUP, SharedState, digest_words, segment_path


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
    assert reader.secret == state.secret and len(reader.secret) == 32
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
    from mplb.balancing import LocalState
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


def value_for(key, version, salt):
    return (digest_words(key, salt)[0] & ~0xFF) | (version & 0xFF)


def test_four_processes_hammer_one_table(shared):
    table = shared.table("stress", 65536, 1e6)
    keys = [b"client-%d" % i for i in range(3000)]
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                rng = random.Random(worker)
                mine = keys[worker::4]
                for i, key in enumerate(mine):           # every key inserted once
                    table.put(key, value_for(key, worker, table.salt), 1.0 + i * 1e-3)
                for _ in range(20000):
                    key = rng.choice(keys)
                    if rng.random() < 0.5:
                        table.put(key, value_for(key, rng.randrange(256), table.salt), 5.0)
                    else:
                        value = table.get(key, 6.0)
                        if value is not None and value & ~0xFF != value_for(key, 0, table.salt):
                            status = 3                    # torn or misattributed entry
            except BaseException:
                status = 4
            os._exit(status)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    for key in keys:
        value = table.get(key, 7.0)
        assert value is not None, key                    # nothing lost: capacity allows
        assert value & ~0xFF == value_for(key, 0, table.salt)
    assert shared.tables(7.0)["stress"]["entries"] == len(keys)
