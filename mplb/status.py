"""Statistics from the shared segment: one snapshot, three renderings.

``collect`` reads the segment into plain data (the JSON shape the README documents);
``render`` answers the ``mplb_status`` location with JSON (the default), Prometheus text
(``?format=prometheus``) or the HTML dashboard (``?format=html``, or a client whose
``Accept`` asks for ``text/html`` without ``?format=json``).  ``?since=T`` (wall-clock
seconds) adds each server's samples after T (the dashboard's charts) to the JSON.

The same ``collect`` serves ``mplb-stats`` (mplb/stats_cli.py), which maps the segment
read-only: nothing here writes to the segment.
"""
from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qs

from mplb.compiled import build_name
from mplb.shm.layout import STORE_DEGRADED, STORE_NONE, STORE_OK

log = logging.getLogger("mplb.status")

SERVER_FIELDS = ("active", "tunnels", "requests", "failures", "bytes_in", "bytes_out")
FORMATS = ("json", "prometheus", "html")

CONTENT_TYPES = {
    "json": b"application/json",
    "prometheus": b"text/plain; version=0.0.4; charset=utf-8",
    "html": b"text/html; charset=utf-8",
}


# -- snapshot ---------------------------------------------------------------------------

def collect(shared, config, now_wall: float = None, since: float = None) -> dict:
    """A snapshot of the running instance as plain data (the documented shape, plus extras).

    ``config`` may be None (a tool without the configuration): servers are then listed
    by URL from the segment's directory under the upstream name ``null``.  With
    ``since``, every server carries its ``history`` after that wall-clock time.
    """
    now_wall = time.time() if now_wall is None else now_wall
    now = time.monotonic()
    generation = shared.generation
    data = {
        "pid": shared.master_pid,
        "uptime_s": round(max(0.0, now_wall - shared.start_time), 3),
        "start_time": round(shared.start_time, 3),
        "generation": generation,
        "reloads": shared.reloads,
        "workers": [
            {"pid": w["pid"], "generation": w["generation"], "connections": w["connections"],
             "requests": w["requests"], "slot": w["slot"],
             "uptime_s": round(max(0.0, now_wall - w["started"]), 3) if w["started"] else None,
             "retiring": w["generation"] != generation}
            for w in shared.workers()
        ],
        "upstreams": {},
        "shared_memory": shared.usage(),
        "store": store_entry(shared, config),
    }
    tables = persistence_tables(shared, now)
    if config is None:
        data["servers"] = [server_entry(shared, url, None, now, since)
                           for url in shared.server_urls()]
        data["persistence_tables"] = tables
        add_remote_active(data["servers"], shared, data["store"])
        return data
    for name, upstream in config.upstreams.items():
        entries, capacity = table_usage(tables, upstream)
        data["upstreams"][name] = {
            "method": upstream.method,
            "persistence": upstream.persistence.kind,
            "persistence_entries": entries,
            "persistence_capacity": capacity,
            "implicit": bool(getattr(upstream, "implicit", False)),
            "servers": [server_entry(shared, server.url, server, now, since)
                        for server in upstream.servers],
        }
        add_remote_active(data["upstreams"][name]["servers"], shared, data["store"])
    return data


STORE_STATES = {STORE_OK: "ok", STORE_DEGRADED: "degraded"}


def store_entry(shared, config):
    """``{"url", "state", "instances", "dropped"}`` of the shared store, or None.

    The master's store thread writes the state and the instance count into the
    segment's header; the URL comes from the configuration, password left out.
    """
    if config is not None and config.shared_store is None:
        return None
    state = shared.store_state
    if config is None and state == STORE_NONE:
        return None
    dropped = shared.store_dropped + sum(w["store_dropped"] for w in shared.workers())
    return {"url": config.shared_store.redacted if config is not None else None,
            "state": STORE_STATES.get(state, "degraded"),
            "instances": shared.store_instances, "dropped": dropped}


def add_remote_active(servers, shared, store) -> None:
    """With a store: each server's ``remote_active``, what the other instances hold."""
    if store is None:
        return
    for entry in servers:
        try:
            entry["remote_active"] = shared.remote_active(shared.server_id(entry["url"]))
        except KeyError:
            entry["remote_active"] = 0


_TABLES_CACHE = {}          # id(shared) -> (monotonic time, tables); see persistence_tables
TABLES_MAX_AGE = 1.0


def persistence_tables(shared, now: float) -> dict:
    """``shared.tables()``, reused for up to a second.

    Counting live entries scans every entry of every table (about 20 ms for a 65536-entry
    table), and a worker answering a dashboard that refreshes every two seconds should not
    stall its other connections for that each time.
    """
    key = id(shared)
    cached = _TABLES_CACHE.get(key)
    if cached is not None and 0 <= now - cached[0] < TABLES_MAX_AGE and cached[2] is shared:
        return cached[1]
    tables = shared.tables(now)
    _TABLES_CACHE.clear()
    _TABLES_CACHE[key] = (now, tables, shared)
    return tables


def server_entry(shared, url, server, now, since=None) -> dict:
    """One server's row: identity, configured flags, state, summed counters, the count
    and sum of its histograms, and with ``since`` its recent samples."""
    try:
        state = shared.server_state(url, server, now)
    except KeyError:            # read-only mapping, server never registered
        state = "down" if server is not None and server.down else "unknown"
    counters = shared.server_counters(url)
    if server is not None:
        entry = {"server": server.hostport, "url": url, "state": state,
                 "weight": server.weight, "backup": server.backup, "down": server.down,
                 "max_conns": server.max_conns, "max_fails": server.max_fails,
                 "fail_timeout": server.fail_timeout}
    else:
        entry = {"server": hostport_of(url), "url": url, "state": state, "weight": None}
    entry.update({field: int(counters[field]) for field in SERVER_FIELDS})
    for name, key in HISTOGRAM_KEYS:
        bounds, counts, total = shared.histogram(url, name)
        entry[key] = {"le": list(bounds), "buckets": counts, "count": sum(counts),
                      "sum": round(total, 6)}
    if since is not None:
        entry["history"] = shared.history(url, since)
    return entry


# JSON key of each histogram (mplb.shm.layout.HISTOGRAMS) and its Prometheus family.
HISTOGRAM_KEYS = (("response", "response_seconds"), ("tunnel", "tunnel_seconds"))
HISTOGRAM_METRICS = (
    ("response_seconds", "mplb_upstream_response_seconds",
     "Time from connecting to the server to its response head."),
    ("tunnel_seconds", "mplb_tunnel_duration_seconds",
     "How long WebSocket (upgrade) tunnels to the server lasted, counted when they end."),
)


def hostport_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def table_usage(tables: dict, upstream) -> tuple:
    """(entries, capacity) of the persistence table(s) the upstream uses now.

    Table names start with ``"<upstream>:"`` (mplb/persistence.py); after a reload that
    changed the table size an older table of the same upstream may still exist, so the
    one named for the current settings wins when it is there.
    """
    from mplb.persistence import table_spec
    spec = table_spec(upstream)
    wanted = spec[0] if spec is not None else None
    if wanted in tables:
        info = tables[wanted]
        return info["entries"], info["capacity"]
    mine = [info for name, info in tables.items() if name.startswith(upstream.name + ":")]
    if not mine:
        return 0, 0
    return sum(i["entries"] for i in mine), sum(i["capacity"] for i in mine)


# -- Prometheus text exposition format 0.0.4 --------------------------------------------

def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _number(value) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(int(value))


SERVER_METRICS = (
    ("active", "mplb_server_active_connections", "gauge",
     "Active connections to the server, WebSocket tunnels included."),
    ("tunnels", "mplb_server_tunnels", "gauge", "Open WebSocket tunnels to the server."),
    ("requests", "mplb_server_requests_total", "counter",
     "Requests and upgrades sent to the server."),
    ("failures", "mplb_server_failures_total", "counter", "Failed attempts to use the server."),
    ("bytes_in", "mplb_server_received_bytes_total", "counter",
     "Bytes received from the server."),
    ("bytes_out", "mplb_server_sent_bytes_total", "counter", "Bytes sent to the server."),
    ("weight", "mplb_server_weight", "gauge", "Configured weight of the server."),
    ("remote_active", "mplb_server_remote_active_connections", "gauge",
     "Active connections the other instances sharing the store hold on the server."),
)
STATES = ("up", "down", "failed", "backup")


def to_prometheus(data) -> str:
    """The snapshot as Prometheus text; every sample line is ``name{labels} value``."""
    out = []

    def family(name, kind, help_text, samples):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{_labels(**labels) if labels else ''} {_number(value)}")

    family("mplb_master_pid", "gauge", "Pid of the master process.", [({}, data["pid"])])
    family("mplb_uptime_seconds", "gauge", "Seconds since the master started.",
           [({}, float(data["uptime_s"]))])
    family("mplb_generation", "gauge", "Current worker generation.", [({}, data["generation"])])
    if "build" in data:
        family("mplb_build_info", "gauge", "The build serving this answer (compiled or "
               "pure-python).", [({"build": data["build"]}, 1)])
    family("mplb_reloads_total", "counter", "Configuration reloads.", [({}, data["reloads"])])
    workers = data["workers"]
    family("mplb_workers", "gauge", "Live worker processes.", [({}, len(workers))])
    wl = [dict(pid=w["pid"], generation=w["generation"]) for w in workers]
    family("mplb_worker_connections", "gauge", "Client connections held by a worker.",
           [(labels, w["connections"]) for labels, w in zip(wl, workers)])
    family("mplb_worker_requests_total", "counter", "Requests a worker sent upstream.",
           [(labels, w["requests"]) for labels, w in zip(wl, workers)])

    rows = [(name, server) for name, info in data["upstreams"].items()
            for server in info["servers"]]
    rows += [("", server) for server in data.get("servers", ())]
    for field, metric, kind, help_text in SERVER_METRICS:
        family(metric, kind, help_text,
               [(dict(upstream=up, server=s["server"]), s[field]) for up, s in rows
                if s.get(field) is not None])
    family("mplb_server_up", "gauge", "Whether the server is eligible for new traffic (1) or not (0).",
           [(dict(upstream=up, server=s["server"]), 1 if s["state"] in ("up", "backup") else 0)
            for up, s in rows])
    family("mplb_server_state", "gauge", "The server's state: 1 for the current one.",
           [(dict(upstream=up, server=s["server"], state=state), 1 if s["state"] == state else 0)
            for up, s in rows for state in STATES])
    for key, metric, help_text in HISTOGRAM_METRICS:
        out.extend(histogram_lines(metric, help_text, rows, key))
    family("mplb_persistence_entries", "gauge", "Live entries in the upstream's persistence table.",
           [(dict(upstream=name, persistence=info["persistence"]), info["persistence_entries"])
            for name, info in data["upstreams"].items()])
    family("mplb_persistence_capacity", "gauge", "Capacity of the upstream's persistence table.",
           [(dict(upstream=name, persistence=info["persistence"]),
             info.get("persistence_capacity", 0))
            for name, info in data["upstreams"].items()])
    store = data.get("store")
    if store is not None:
        family("mplb_store_up", "gauge", "Whether the shared store answers (1) or not (0).",
               [({}, 1 if store["state"] == "ok" else 0)])
        family("mplb_store_instances", "gauge",
               "mplb instances sharing the store, this one included.",
               [({}, store["instances"])])
        family("mplb_store_dropped_total", "counter",
               "Table entries not handed to the store (a queue was full).",
               [({}, store["dropped"])])
    return "\n".join(out) + "\n"


def histogram_lines(metric, help_text, rows, key) -> list:
    """One Prometheus histogram family: cumulative ``le`` buckets ending with +Inf, then
    ``_sum`` and ``_count`` (equal to the +Inf bucket), per server."""
    out = [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
    for upstream, server in rows:
        histogram = server.get(key)
        if histogram is None:
            continue
        labels = dict(upstream=upstream, server=server["server"])
        running = 0
        for bound, count in zip(list(histogram["le"]) + ["+Inf"], histogram["buckets"]):
            running += count
            le = bound if bound == "+Inf" else repr(float(bound))
            out.append(f"{metric}_bucket{_labels(**labels, le=le)} {running}")
        out.append(f"{metric}_sum{_labels(**labels)} {_number(float(histogram['sum']))}")
        out.append(f"{metric}_count{_labels(**labels)} {running}")
    return out


# -- the location -----------------------------------------------------------------------

def choose_format(args: str, accept: str) -> str:
    """``?format=`` wins; else text/html in Accept means the dashboard; else JSON."""
    query = parse_qs(args or "", keep_blank_values=True)
    wanted = (query.get("format") or [""])[-1].lower()
    if wanted in FORMATS:
        return wanted
    if wanted in ("text", "prom", "metrics"):
        return "prometheus"
    if not wanted and "text/html" in (accept or "").lower():
        return "html"
    return "json"


def history_since(args: str):
    """``?since=T``: samples after wall-clock T (a bad value means all of them)."""
    query = parse_qs(args or "", keep_blank_values=True)
    if "since" not in query:
        return None
    try:
        since = float(query["since"][-1])
    except ValueError:
        return 0.0
    return since if since == since else 0.0          # NaN: all


def render(shared, config, request):
    """(status, content type, body) for the mplb_status location."""
    if shared is None:
        return 503, b"text/plain", b"503 statistics unavailable\n"
    try:
        fmt = choose_format(request.args, request.header("accept"))
        since = 0.0 if fmt == "html" else history_since(request.args)
        data = collect(shared, config, since=since)
        data["build"] = build_name()            # this worker's: compiled or pure-python
        if fmt == "prometheus":
            body = to_prometheus(data)
        elif fmt == "html":
            from mplb.dashboard import render_html
            body = render_html(data)
        else:
            body = json.dumps(data, separators=(",", ":")) + "\n"
    except Exception:                       # never take the connection down with us
        log.exception("mplb_status failed")
        return 500, b"text/plain", b"500 statistics failed\n"
    return 200, CONTENT_TYPES[fmt], body.encode("utf-8")
