"""Statistics from the shared segment: one snapshot, three renderings.

``collect`` reads the segment into plain data (the JSON shape of spec section 7);
``render`` answers the ``mplb_status`` location with JSON, Prometheus text
(``?format=prometheus``) or the HTML dashboard (for a client that asks for text/html).
"""
from __future__ import annotations

import json
import os
import time

SERVER_FIELDS = ("active", "tunnels", "requests", "failures", "bytes_in", "bytes_out")


def collect(shared, config) -> dict:
    """A snapshot of the running instance as plain data."""
    header = shared.q
    started = header[6] / 1e6
    data = {
        "pid": header[3],
        "uptime_s": round(time.time() - started, 3),
        "generation": header[4],
        "reloads": header[5],
        "workers": [
            {"pid": w["pid"], "generation": w["generation"], "connections": w["connections"],
             "requests": w["requests"]}
            for w in shared.workers()
        ],
        "upstreams": {},
    }
    tables = shared.tables()
    now = time.monotonic()
    for name, upstream in config.upstreams.items():
        servers = []
        for server in upstream.servers:
            counters = shared.server_counters(server.url)
            entry = {"server": server.hostport, "url": server.url,
                     "state": shared.server_state(server.url, server, now),
                     "weight": server.weight, "backup": server.backup,
                     "max_conns": server.max_conns}
            entry.update({field: counters[field] for field in SERVER_FIELDS})
            servers.append(entry)
        data["upstreams"][name] = {
            "method": upstream.method,
            "persistence": upstream.persistence.kind,
            "persistence_entries": _table_entries(tables, name),
            "servers": servers,
        }
    return data


def _table_entries(tables, upstream_name):
    return sum(count for table, count in tables.items()
               if table.split(":", 1)[-1] == upstream_name or table.startswith(upstream_name + ":")
               or table == upstream_name)


def to_prometheus(data) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines = [
        "# HELP mplb_uptime_seconds Seconds since the master started.",
        "# TYPE mplb_uptime_seconds gauge",
        f"mplb_uptime_seconds {data['uptime_s']}",
        "# HELP mplb_generation Current worker generation.",
        "# TYPE mplb_generation gauge",
        f"mplb_generation {data['generation']}",
        "# HELP mplb_reloads_total Configuration reloads.",
        "# TYPE mplb_reloads_total counter",
        f"mplb_reloads_total {data['reloads']}",
        "# HELP mplb_worker_connections Client connections held by a worker.",
        "# TYPE mplb_worker_connections gauge",
    ]
    for worker in data["workers"]:
        lines.append(f'mplb_worker_connections{{pid="{worker["pid"]}",'
                     f'generation="{worker["generation"]}"}} {worker["connections"]}')
    metrics = {
        "active": ("gauge", "Active connections to the server (tunnels included)."),
        "tunnels": ("gauge", "Open WebSocket tunnels to the server."),
        "requests": ("counter", "Requests and upgrades sent to the server."),
        "failures": ("counter", "Failed attempts to use the server."),
        "bytes_in": ("counter", "Bytes received from the server."),
        "bytes_out": ("counter", "Bytes sent to the server."),
    }
    for field, (kind, help_text) in metrics.items():
        name = f"mplb_server_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for upstream, info in data["upstreams"].items():
            for server in info["servers"]:
                lines.append(f'{name}{{upstream="{_label(upstream)}",'
                             f'server="{_label(server["server"])}"}} {server[field]}')
    lines += ["# HELP mplb_server_up Whether the server is eligible (1) or not (0).",
              "# TYPE mplb_server_up gauge"]
    for upstream, info in data["upstreams"].items():
        for server in info["servers"]:
            up = 1 if server["state"] in ("up", "backup") else 0
            lines.append(f'mplb_server_up{{upstream="{_label(upstream)}",'
                         f'server="{_label(server["server"])}",state="{server["state"]}"}} {up}')
    lines += ["# HELP mplb_persistence_entries Entries in the upstream's persistence table.",
              "# TYPE mplb_persistence_entries gauge"]
    for upstream, info in data["upstreams"].items():
        lines.append(f'mplb_persistence_entries{{upstream="{_label(upstream)}"}} '
                     f'{info["persistence_entries"]}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(shared, config, request):
    """(status, content type, body) for the mplb_status location."""
    if shared is None:
        return 503, b"text/plain", b"503 statistics unavailable\n"
    data = collect(shared, config)
    args = request.args
    if "format=prometheus" in args:
        return 200, b"text/plain; version=0.0.4", to_prometheus(data).encode()
    accept = request.header("accept") or ""
    if "format=html" in args or ("text/html" in accept and "format=json" not in args):
        from mplb.dashboard import render_html
        return 200, b"text/html; charset=utf-8", render_html(data).encode()
    return 200, b"application/json", (json.dumps(data) + "\n").encode()


def master_pid_of(shared) -> int:
    return shared.q[3] if shared is not None else os.getpid()
