"""The running configuration as the store threads see it: which table and server is which.

Built by the master's main thread (after it reserved the configuration in the segment)
and handed whole to the store threads, which never reserve or look up anything in the
segment's directories themselves.
"""
from __future__ import annotations

from mplb.persistence import store_tag, table_spec


class TablePlan:
    """One cluster table: its tag in the store, the local table, and its servers."""

    __slots__ = ("tag", "table", "ttl_ms", "url_of", "sid_of")

    def __init__(self, tag, table, ttl, servers):
        self.tag = tag
        self.table = table
        self.ttl_ms = max(1, int(ttl * 1000))
        self.url_of = dict(servers)                       # sid -> url
        self.sid_of = {url: sid for sid, url in servers}  # url -> sid


class Plan:
    """Cluster tables by the workers' table index and by store tag; servers by URL."""

    def __init__(self, config, shared):
        self.sids = {}                  # url -> sid: every server of the configuration
        self.by_index = {}
        self.by_tag = {}
        for upstream in config.upstreams.values():
            servers = [(shared.server_id(s.url), s.url) for s in upstream.servers]
            self.sids.update((url, sid) for sid, url in servers)
            tag = store_tag(upstream)
            if tag is None:
                continue
            name, capacity, ttl = table_spec(upstream)
            table = shared.table(name, capacity, ttl, upstream.cluster_key)
            plan = TablePlan(tag, table, ttl, servers)
            self.by_index[table.index] = plan
            self.by_tag[tag] = plan

    @property
    def capacity(self) -> int:
        """Entries all cluster tables hold at most (bounds a load from the store)."""
        return sum(plan.table.capacity for plan in self.by_tag.values())
