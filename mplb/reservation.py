"""What a configuration needs in the shared segment, reserved by the master.

Before it forks a generation, the master reserves that generation's servers (counters
and health), persistence tables and upstream rotation words; workers then only find
them.  The same list of names tells the master what it may reclaim once a generation's
last worker has exited: whatever no running generation names.
"""
from __future__ import annotations

from mplb.errors import MplbError, StartupError
from mplb.persistence import table_spec


class SharedNames:
    """The servers (URLs), tables and upstreams a set of configurations uses."""

    def __init__(self, configs=()):
        self.urls, self.tables, self.upstreams = set(), set(), set()
        for config in configs:
            self.add(config)

    def add(self, config) -> None:
        for upstream in config.upstreams.values():
            self.upstreams.add(upstream.name)
            self.urls.update(server.url for server in upstream.servers)
            spec = table_spec(upstream)
            if spec is not None:
                self.tables.add(spec[0])


def reserve(config, shared) -> None:
    """Reserve everything ``config`` uses, so a full segment fails here, once, and not
    in a worker; raises StartupError naming what did not fit."""
    try:
        for upstream in config.upstreams.values():
            for server in upstream.servers:
                shared.server_id(server.url)
            spec = table_spec(upstream)
            if spec is not None:
                shared.table(*spec, upstream.cluster_key)
            shared.upstream_word(upstream.name)
    except MplbError as exc:
        raise StartupError(str(exc))


def reclaim(shared, configs) -> dict:
    """Free what none of ``configs`` (every generation still running) uses."""
    names = SharedNames(configs)
    return shared.reclaim(names.urls, names.tables, names.upstreams)
