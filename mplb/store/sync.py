"""StoreSync: the master's two store threads, between the segment and a Redis server.

Why the master and not the workers: a worker's event loop must never wait on the
network for shared state, and one connection per instance is what a store should
carry, not one per worker.  Workers tell the master of new table entries over their
control socket (mplb.control); everything else the store threads read from and write
to the segment, which the workers read as they always do.

- The *writer* thread drains a bounded queue of new entries (one pipelined round trip
  per batch, first writer wins: codec.WRITE_ENTRY) and every TICK publishes this
  instance's state (active connections per server, servers its health checks hold
  down) under a key that expires INSTANCE_TTL_MS after its last refresh, then reads
  every other live instance's, sums them and writes the sums into the segment
  (``remote_active`` per server, and remote health through mplb.health).
- The *subscriber* thread applies every entry published by any instance, its own
  included, in the order the store executed them, so all instances end with the last
  write.  After each (re)connection it subscribes, then loads the entries already in
  the store (what was published while it was away).  It is the only thread that
  writes table entries in the master.

The store is never on the failure path: a failed call marks the store degraded (logged
once), entries made meanwhile wait in a bounded backlog and are written back when a
call succeeds again, and workers go on with local state alone whatever happens here.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import re
import socket
import threading
import time

from mplb.shm.layout import STORE_DEGRADED, STORE_NONE, STORE_OK, now_us
from mplb.store import client as store_client
from mplb.store import codec
from mplb.store.plan import Plan

log = logging.getLogger("mplb.store")

TICK = 0.25                   # publish and read the instances' counts this often
QUEUE_MAX = 8192              # entries waiting for the writer thread
BACKLOG_MAX = 16384           # entries kept while the store is unreachable
BATCH = 256                   # entries per pipelined round trip
RETRY = 0.5                   # a degraded store is tried again this often
SUBSCRIBE_WAIT = 0.25
SUBSCRIBER_TIMEOUT = 1.0      # the subscriber's calls (it is on no one's path)
SCAN_COUNT = 1000


def instance_name() -> str:
    """This instance in the store: host name, master pid and a random tag."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}:{os.getpid()}:{os.urandom(3).hex()}"


class StoreSync:
    """``start()``, ``offer(entries)`` from the main thread, ``update_config``, ``stop()``."""

    def __init__(self, config, shared, health=None, lock=None, clock=time.monotonic):
        self.store = config.shared_store
        self.shared = shared
        self.health = health
        self.lock = lock or threading.Lock()   # segment writes vs reserve and reclaim
        self.clock = clock
        self.names = codec.Names(self.store.prefix, instance_name())
        self.plan = Plan(config, shared)
        self.queue = queue.Queue(QUEUE_MAX)
        self.backlog = collections.deque(maxlen=BACKLOG_MAX)
        self.state = None             # None before the first call, then "ok" / "degraded"
        self.degraded_since = 0.0
        self.remote_cleared = True
        self.retry_at = 0.0
        self.instances = 1
        self.resync = threading.Event()
        self.stopping = threading.Event()
        self.threads = []
        self.client = store_client.connect(self.store)
        self.sub_client = store_client.connect(self.store,
                                               max(self.store.timeout, SUBSCRIBER_TIMEOUT))

    # -- main thread ------------------------------------------------------------------

    def start(self) -> None:
        self.shared.set_store(STORE_DEGRADED, 1)
        for name, target in (("mplb-store", self._run_writer),
                             ("mplb-store-sub", self._run_subscriber)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def offer(self, entries) -> None:
        """Entries workers announced (mplb.control): queue them for the writer thread."""
        plan, now = self.plan, self.clock()
        for index, sid, k1, k2, first in entries:
            table = plan.by_index.get(index)
            url = table.url_of.get(sid) if table is not None else None
            if url is None:
                continue                     # an older generation's table or server
            try:
                self.queue.put_nowait((table.tag, k1, k2, url, table.ttl_ms, first, now))
            except queue.Full:
                self.shared.count_store_dropped()

    def update_config(self, config) -> None:
        """A reload: the new configuration's tables and servers (already reserved)."""
        plan = Plan(config, self.shared)
        with self.lock:
            old, self.plan = self.plan, plan
            for url, sid in old.sids.items():
                if url not in plan.sids:
                    self.shared.set_remote_active(sid, 0)
        if set(plan.by_tag) != set(old.by_tag):
            self.resync.set()                # load the new tables' entries

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads, leave the cluster and clear what the store put in the segment."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)
        self.threads = []
        try:
            self.client.delete(self.names.instance_key(self.names.instance))
        except store_client.Error:
            pass
        store_client.close(self.client)
        store_client.close(self.sub_client)
        self.apply_remote({}, set())
        self.shared.set_store(STORE_NONE, 0)

    # -- writer thread ----------------------------------------------------------------

    def _run_writer(self) -> None:
        next_tick = self.clock()
        while not self.stopping.is_set():
            try:
                first = self.queue.get(timeout=max(0.001, next_tick - self.clock()))
            except queue.Empty:
                first = None
            if first is not None:
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(self.queue.get_nowait())
                    except queue.Empty:
                        break
                self.write(batch)
            if self.clock() >= next_tick:
                self.tick()
                next_tick = self.clock() + TICK

    def write(self, batch) -> None:
        """Write entries to the store, or keep them for when it is back."""
        if self.state != "ok":
            self.backlog.extend(batch)
            return
        try:
            self.write_entries(batch)
        except store_client.Error as exc:
            self.backlog.extend(batch)
            self.degrade(exc)

    def write_entries(self, batch) -> int:
        """One pipelined round trip; entries whose ttl ran out meanwhile are skipped."""
        now = self.clock()
        pipe = self.client.pipeline(transaction=False)
        written = 0
        for tag, k1, k2, url, ttl_ms, first, made in batch:
            left = ttl_ms - int((now - made) * 1000)
            if left <= 0:
                continue
            pipe.eval(codec.WRITE_ENTRY, 1, self.names.entry(tag, k1, k2), url, left,
                      self.names.channel, codec.entry_message_head(tag, k1, k2),
                      "1" if first else "0")
            written += 1
        if written:
            pipe.execute()
        return written

    def tick(self) -> None:
        """Every TICK: reach a degraded store again, then exchange instance state."""
        if self.state != "ok":
            if self.clock() < self.retry_at:
                self.expire_remote()
                return
            try:
                self.client.ping()
                self.recover()
            except store_client.Error as exc:
                self.degrade(exc)
                return
        try:
            self.exchange_state()
        except store_client.Error as exc:
            self.degrade(exc)

    def degrade(self, exc) -> None:
        if self.state != "degraded":
            log.error("shared store %s unreachable (%s): sharing paused, serving with "
                      "this instance's own state", self.store.redacted,
                      type(exc).__name__ if not str(exc) else str(exc)[:200])
            self.degraded_since = self.clock()
        self.state = "degraded"
        self.retry_at = self.clock() + RETRY
        self.shared.set_store(STORE_DEGRADED, self.instances)
        store_client.close(self.client)      # replies to a timed-out call may follow
        self.expire_remote()

    def expire_remote(self) -> None:
        """Other instances' counts and health stop counting, as their keys would expire."""
        if not self.remote_cleared and \
                self.clock() - self.degraded_since >= codec.INSTANCE_TTL_MS / 1000:
            self.apply_remote({}, set())
            self.remote_cleared = True
            self.instances = 1

    def recover(self) -> None:
        """The store answers again: resume sharing and write back what was made meanwhile."""
        first = self.state is None
        self.state = "ok"
        self.resync.set()
        written = 0
        while self.backlog:
            batch = [self.backlog.popleft() for _ in range(min(BATCH, len(self.backlog)))]
            try:
                written += self.write_entries(batch)
            except store_client.Error as exc:
                self.backlog.extendleft(reversed(batch))
                self.degrade(exc)
                raise
        if first:
            log.info("shared store %s connected", self.store.redacted)
        else:
            log.warning("shared store %s is back: sharing resumed, %d entr%s written back",
                        self.store.redacted, written, "y" if written == 1 else "ies")

    def exchange_state(self) -> None:
        """Publish this instance's counts and down servers; read and sum the others'."""
        names, plan = self.names, self.plan
        counts = {url: self.shared.active_total(sid) for url, sid in plan.sids.items()}
        down = self.health.local_down() if self.health is not None else ()
        pipe = self.client.pipeline(transaction=False)
        pipe.set(names.instance_key(names.instance), codec.encode_payload(counts, down),
                 px=codec.INSTANCE_TTL_MS)
        pipe.sadd(names.instances, names.instance)
        pipe.smembers(names.instances)
        members = pipe.execute()[2]
        others = sorted(name for name in (m.decode("ascii", "replace") for m in members)
                        if codec.valid_instance(name) and name != names.instance)
        others = others[:codec.MAX_INSTANCES]
        values = self.client.mget([names.instance_key(o) for o in others]) if others else []
        gone = [o for o, value in zip(others, values) if value is None]
        if gone:
            self.client.srem(names.instances, *gone)
        payloads = [p for p in map(codec.parse_payload, values) if p is not None]
        totals, held = codec.sum_instances(payloads)
        self.apply_remote(totals, held)
        self.remote_cleared = False
        self.instances = 1 + len(payloads)
        self.shared.set_store(STORE_OK, self.instances)

    def apply_remote(self, totals: dict, down: set) -> None:
        with self.lock:
            for url, sid in self.plan.sids.items():
                self.shared.set_remote_active(sid, totals.get(url, 0))
        if self.health is not None:
            self.health.set_remote_down(frozenset(down))

    # -- subscriber thread ------------------------------------------------------------

    def _run_subscriber(self) -> None:
        pubsub = None
        while not self.stopping.is_set():
            if pubsub is None or self.resync.is_set():
                self.resync.clear()
                self._close_pubsub(pubsub)
                try:
                    pubsub = self.subscribe_and_load()
                except store_client.Error:
                    pubsub = None
                    self.stopping.wait(RETRY)
                    continue
            try:
                message = pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=SUBSCRIBE_WAIT)
            except store_client.Error:
                self._close_pubsub(pubsub)
                pubsub = None
                continue
            if message and message.get("type") == "message":
                parsed = codec.parse_entry_message(message.get("data"))
                if parsed is not None:
                    self.apply_entry(*parsed)
        self._close_pubsub(pubsub)

    @staticmethod
    def _close_pubsub(pubsub) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except store_client.Error:
                pass

    def subscribe_and_load(self):
        """Subscribe (confirmed), then load what the store holds: nothing published
        after the load can be missed, and nothing before it is lost."""
        pubsub = self.sub_client.pubsub()
        try:
            pubsub.subscribe(self.names.channel)
            deadline = self.clock() + SUBSCRIBER_TIMEOUT
            while True:
                message = pubsub.get_message(timeout=SUBSCRIBE_WAIT)
                if message and message.get("type") == "subscribe":
                    break
                if self.clock() > deadline:
                    raise TimeoutError("no subscription confirmed")
            self.load_entries()
        except BaseException:
            self._close_pubsub(pubsub)
            raise
        return pubsub

    def load_entries(self) -> int:
        """Apply the cluster tables' entries found in the store (bounded by capacity)."""
        client, names = self.sub_client, self.names
        budget, loaded, cursor = self.plan.capacity, 0, 0
        while True:
            cursor, keys = client.scan(cursor, match=names.entries_match, count=SCAN_COUNT)
            found = [parsed for parsed in map(names.parse_entry_key, keys)
                     if parsed is not None and parsed[0] in self.plan.by_tag]
            if found:
                pipe = client.pipeline(transaction=False)
                for tag, k1, k2 in found:
                    key = names.entry(tag, k1, k2)
                    pipe.get(key)
                    pipe.pttl(key)
                replies = pipe.execute()
                for (tag, k1, k2), url, left in zip(found, replies[::2], replies[1::2]):
                    url = codec.parse_url(url)
                    if url is not None and isinstance(left, int) and left > 0:
                        self.apply_entry(tag, k1, k2, left, url)
                        loaded += 1
            if not cursor or loaded >= budget:
                return loaded

    def apply_entry(self, tag: str, k1: int, k2: int, left_ms: int, url: str) -> None:
        """Write one entry into the local table, aged so that it expires with the store's."""
        with self.lock:
            plan = self.plan.by_tag.get(tag)
            sid = plan.sid_of.get(url) if plan is not None else None
            if sid is None:
                return                   # a table or server this configuration lacks
            age_ms = plan.ttl_ms - min(left_ms, plan.ttl_ms)
            table = plan.table
            table.put_words(k1, k2, table.group_of(k1, k2), sid,
                            now_us(self.clock()) - age_ms * 1000)
