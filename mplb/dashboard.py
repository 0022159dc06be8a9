"""The HTML status dashboard served by the ``mplb_status`` location.

One self-contained page (inline CSS and JS, no external assets): the server renders the
current snapshot so the page is useful without JavaScript, then the script re-fetches the
same URL with ``?format=json`` every two seconds and redraws the tables with DOM text
nodes (never ``innerHTML``), adding per-second rates from the difference between two
snapshots, and draws each server's last five minutes as small SVG charts
(mplb/charts.py).  Everything that comes from the configuration or the segment is escaped:
``html.escape`` here, ``textContent`` in the browser, and the embedded first snapshot has
``<``, ``>`` and ``&`` written as JSON escapes so it cannot end its ``<script>`` element.
"""
from __future__ import annotations

import html
import json

from mplb import charts

REFRESH_MS = 2000

SERVER_COLUMNS = (
    ("server", "Server"), ("state", "State"), ("weight", "Weight"), ("active", "Active"),
    ("tunnels", "Tunnels"), ("requests", "Requests"), ("rate", "Req/s"),
    ("failures", "Failures"), ("bytes_in", "Bytes in"), ("bytes_out", "Bytes out"),
)
WORKER_COLUMNS = (("pid", "PID"), ("generation", "Generation"), ("connections", "Connections"),
                  ("requests", "Requests"), ("uptime", "Uptime"))
NUMERIC = {"weight", "active", "tunnels", "requests", "rate", "failures", "bytes_in",
           "bytes_out", "pid", "generation", "connections", "uptime", "entries", "capacity",
           "fill"}
TABLE_COLUMNS = (("upstream", "Upstream"), ("kind", "Persistence"), ("entries", "Entries"),
                 ("capacity", "Capacity"), ("fill", "Fill"))


def human_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"          # not reached


def human_duration(seconds) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _e(value) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _td(cls, text, value=None) -> str:
    title = f' title="{_e(value)}"' if value is not None else ""
    return f'<td class="{cls}"{title}>{_e(text)}</td>'


def _head(columns) -> str:
    return "<thead><tr>" + "".join(
        f'<th class="{key}{" num" if key in NUMERIC else ""}">{_e(label)}</th>'
        for key, label in columns) + "</tr></thead>"


def _server_row(upstream, server) -> str:
    state = server.get("state") or "unknown"
    flags = []
    if server.get("backup") and state != "backup":
        flags.append("backup")
    if server.get("max_conns"):
        flags.append(f"max_conns={server['max_conns']}")
    cells = [
        f'<td class="server" title="{_e(server.get("url"))}">{_e(server.get("server"))}'
        + (f' <span class="flags">{_e(" ".join(flags))}</span>' if flags else "") + "</td>",
        f'<td class="state"><span class="badge state-{_e(state)}">{_e(state)}</span></td>',
        _td("weight num", server.get("weight")),
        _td("active num", server.get("active")),
        _td("tunnels num", server.get("tunnels")),
        _td("requests num", server.get("requests")),
        _td("rate num", "-"),
        _td("failures num" + (" bad" if server.get("failures") else ""), server.get("failures")),
        _td("bytes_in num", human_bytes(server.get("bytes_in")), server.get("bytes_in")),
        _td("bytes_out num", human_bytes(server.get("bytes_out")), server.get("bytes_out")),
    ]
    return (f'<tr class="server-row" data-upstream="{_e(upstream)}" '
            f'data-server="{_e(server.get("server"))}" data-state="{_e(state)}">'
            + "".join(cells) + "</tr>")


def _upstream_section(name, info) -> str:
    servers = info.get("servers", [])
    up = sum(1 for s in servers if s.get("state") in ("up", "backup"))
    meta = (f'method <b>{_e(info.get("method"))}</b> · persistence '
            f'<b>{_e(info.get("persistence"))}</b> · {up}/{len(servers)} available')
    rows = "".join(_server_row(name, s) for s in servers)
    return (f'<section class="upstream" data-upstream="{_e(name)}"><h2>{_e(name)}</h2>'
            f'<p class="meta">{meta}</p><table class="servers">{_head(SERVER_COLUMNS)}'
            f"<tbody>{rows}</tbody></table></section>")


def _workers_table(data) -> str:
    rows = []
    for w in data.get("workers", []):
        retiring = w.get("retiring", w.get("generation") != data.get("generation"))
        gen = f'{_e(w.get("generation"))}' + (' <span class="badge retiring">retiring</span>'
                                              if retiring else "")
        rows.append(f'<tr class="worker-row" data-pid="{_e(w.get("pid"))}">'
                    + _td("pid num", w.get("pid"))
                    + f'<td class="generation num">{gen}</td>'
                    + _td("connections num", w.get("connections"))
                    + _td("requests num", w.get("requests"))
                    + _td("uptime num", human_duration(w.get("uptime_s")))
                    + "</tr>")
    return (f'<table id="workers">{_head(WORKER_COLUMNS)}<tbody>{"".join(rows)}'
            "</tbody></table>")


def store_text(store) -> str:
    """The header's store summary: state and instance count (never a password)."""
    if not store:
        return ""
    count = store.get("instances") or 0
    return f"{store.get('state')} · {count} instance{'' if count == 1 else 's'}"


def _store_header(data) -> str:
    store = data.get("store")
    if not store:
        return ""
    return (f"<span class='kv' id='storekv' title='{_e(store.get('url'))}'>store "
            f"<b id='store' class='store-{_e(store.get('state'))}'>{_e(store_text(store))}"
            "</b></span>")


def _fill(entries, capacity) -> str:
    return f"{100.0 * entries / capacity:.1f}%" if capacity else "-"


def _tables_table(data) -> str:
    rows = []
    for name, info in data.get("upstreams", {}).items():
        kind = info.get("persistence")
        entries, capacity = info.get("persistence_entries", 0), info.get("persistence_capacity", 0)
        rows.append(f'<tr class="table-row" data-upstream="{_e(name)}">'
                    + _td("upstream", name) + _td("kind", kind) + _td("entries num", entries)
                    + _td("capacity num", capacity or "-")
                    + _td("fill num", _fill(entries, capacity)) + "</tr>")
    return (f'<table id="persistence">{_head(TABLE_COLUMNS)}<tbody>{"".join(rows)}'
            "</tbody></table>")


def _json_for_script(data) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close or confuse the element."""
    return (json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


CSS = """
:root{--bg:#f6f7f9;--fg:#1d2330;--muted:#667085;--line:#e3e6eb;--card:#fff;
--up:#1a7f37;--upbg:#dafbe1;--down:#b42318;--downbg:#fee4e2;--failed:#b54708;
--failedbg:#fef0c7;--backup:#175cd3;--backupbg:#d1e9ff;--unknown:#475467;--unknownbg:#eaecf0}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--fg:#e6e9ee;--muted:#98a2b3;
--line:#2a3038;--card:#181c22;--upbg:#0f3d1f;--up:#6fdd8b;--downbg:#4a1412;--down:#ff9c92;
--failedbg:#4a2a06;--failed:#fdb022;--backupbg:#102a56;--backup:#84caff;
--unknownbg:#2a3038;--unknown:#c0c6d0}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--fg)}
header{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:baseline;padding:14px 20px;
background:var(--card);border-bottom:1px solid var(--line);position:sticky;top:0}
header h1{font-size:18px;margin:0}
.kv{color:var(--muted)}.kv b{color:var(--fg);font-variant-numeric:tabular-nums}
#live{margin-left:auto;color:var(--muted)}
#live .dot{display:inline-block;width:8px;height:8px;border-radius:50%;background:var(--up);
margin-right:6px}
#live.stale .dot{background:var(--down)}#live.paused .dot{background:var(--muted)}
button{font:inherit;border:1px solid var(--line);background:var(--card);color:var(--fg);
border-radius:6px;padding:2px 10px;cursor:pointer;margin-left:8px}
main{padding:16px 20px;max-width:1400px}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:10px 14px;margin-bottom:16px;overflow-x:auto}
h2{font-size:16px;margin:2px 0}.meta{color:var(--muted);margin:2px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase}
.num{text-align:right;font-variant-numeric:tabular-nums}
tr:last-child td{border-bottom:none}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.state-up{color:var(--up);background:var(--upbg)}
.state-down{color:var(--down);background:var(--downbg)}
.state-failed{color:var(--failed);background:var(--failedbg)}
.state-backup{color:var(--backup);background:var(--backupbg)}
.state-unknown,.retiring{color:var(--unknown);background:var(--unknownbg)}
.bad{color:var(--down);font-weight:600}.flags{color:var(--muted);font-size:12px}
.store-degraded{color:var(--down)}
#error{display:none;background:var(--downbg);color:var(--down);padding:8px 20px}
#error.show{display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
"""

SCRIPT = r"""
(function(){
"use strict";
var REFRESH = %(refresh)d;
var prev = null, prevAt = 0, paused = false, timer = null;
function $(id){ return document.getElementById(id); }
function el(tag, cls, text){
  var n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined && text !== null) n.textContent = String(text);
  return n;
}
function dash(v){ return (v === null || v === undefined) ? "-" : String(v); }
%(charts)s
function bytes(n){
  if (n === null || n === undefined) return "-";
  var units = ["B","KiB","MiB","GiB","TiB"], i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? (n + " B") : (n.toFixed(1) + " " + units[i]);
}
function duration(s){
  if (s === null || s === undefined) return "-";
  s = Math.floor(s);
  var d = Math.floor(s/86400), h = Math.floor(s%%86400/3600), m = Math.floor(s%%3600/60);
  s = s %% 60;
  if (d) return d+"d "+h+"h "+m+"m";
  if (h) return h+"h "+m+"m "+s+"s";
  if (m) return m+"m "+s+"s";
  return s+"s";
}
function td(cls, text, title){
  var c = el("td", cls, text);
  if (title !== undefined && title !== null) c.title = String(title);
  return c;
}
function head(cols){
  var t = el("thead"), r = el("tr");
  cols.forEach(function(c){ r.appendChild(el("th", c[0] + (NUMERIC.indexOf(c[0]) >= 0 ? " num" : ""), c[1])); });
  t.appendChild(r); return t;
}
var NUMERIC = %(numeric)s;
var SERVER_COLS = %(server_cols)s, WORKER_COLS = %(worker_cols)s, TABLE_COLS = %(table_cols)s;
function prevServer(up, url){
  if (!prev || !prev.upstreams || !prev.upstreams[up]) return null;
  var list = prev.upstreams[up].servers || [];
  for (var i = 0; i < list.length; i++) if (list[i].url === url) return list[i];
  return null;
}
function serverRow(up, s, dt){
  var state = s.state || "unknown";
  var r = el("tr", "server-row");
  r.dataset.upstream = up; r.dataset.server = s.server; r.dataset.state = state;
  var name = td("server", s.server, s.url);
  var flags = [];
  if (s.backup && state !== "backup") flags.push("backup");
  if (s.max_conns) flags.push("max_conns=" + s.max_conns);
  if (flags.length) { name.appendChild(document.createTextNode(" ")); name.appendChild(el("span", "flags", flags.join(" "))); }
  r.appendChild(name);
  var st = el("td", "state"); st.appendChild(el("span", "badge state-" + state.replace(/[^a-z]/g, ""), state));
  r.appendChild(st);
  r.appendChild(td("weight num", dash(s.weight)));
  r.appendChild(td("active num", dash(s.active)));
  r.appendChild(td("tunnels num", dash(s.tunnels)));
  r.appendChild(td("requests num", dash(s.requests)));
  var p = prevServer(up, s.url), rate = "-";
  if (p && dt > 0 && s.requests >= p.requests) rate = ((s.requests - p.requests) / dt).toFixed(1);
  r.appendChild(td("rate num", rate));
  r.appendChild(td("failures num" + (s.failures ? " bad" : ""), dash(s.failures)));
  r.appendChild(td("bytes_in num", bytes(s.bytes_in), s.bytes_in));
  r.appendChild(td("bytes_out num", bytes(s.bytes_out), s.bytes_out));
  return r;
}
function render(data, dt){
  $("pid").textContent = dash(data.pid);
  $("uptime").textContent = duration(data.uptime_s);
  $("generation").textContent = dash(data.generation);
  $("reloads").textContent = dash(data.reloads);
  $("nworkers").textContent = (data.workers || []).length;
  var st = $("store");
  if (st && data.store) {
    var n = data.store.instances || 0;
    st.textContent = data.store.state + " \u00b7 " + n + " instance" + (n === 1 ? "" : "s");
    st.className = "store-" + String(data.store.state).replace(/[^a-z]/g, "");
  }
  var box = $("upstreams"), frag = document.createDocumentFragment();
  Object.keys(data.upstreams || {}).forEach(function(name){
    var info = data.upstreams[name], servers = info.servers || [];
    var sec = el("section", "upstream"); sec.dataset.upstream = name;
    sec.appendChild(el("h2", null, name));
    var up = servers.filter(function(s){ return s.state === "up" || s.state === "backup"; }).length;
    var meta = el("p", "meta");
    meta.appendChild(document.createTextNode("method "));
    meta.appendChild(el("b", null, info.method));
    meta.appendChild(document.createTextNode(" \u00b7 persistence "));
    meta.appendChild(el("b", null, info.persistence));
    meta.appendChild(document.createTextNode(" \u00b7 " + up + "/" + servers.length + " available"));
    sec.appendChild(meta);
    var t = el("table", "servers"); t.appendChild(head(SERVER_COLS));
    var b = el("tbody");
    servers.forEach(function(s){ b.appendChild(serverRow(name, s, dt)); });
    t.appendChild(b); sec.appendChild(t);
    sec.appendChild(chartsFor(name, servers));
    frag.appendChild(sec);
  });
  box.replaceChildren(frag);
  var wb = el("tbody");
  (data.workers || []).forEach(function(w){
    var r = el("tr", "worker-row"); r.dataset.pid = w.pid;
    r.appendChild(td("pid num", w.pid));
    var g = td("generation num", w.generation);
    if (w.generation !== data.generation) { g.appendChild(document.createTextNode(" ")); g.appendChild(el("span", "badge retiring", "retiring")); }
    r.appendChild(g);
    r.appendChild(td("connections num", dash(w.connections)));
    r.appendChild(td("requests num", dash(w.requests)));
    r.appendChild(td("uptime num", duration(w.uptime_s)));
    wb.appendChild(r);
  });
  var wt = $("workers"); wt.replaceChildren(head(WORKER_COLS), wb);
  var pb = el("tbody");
  Object.keys(data.upstreams || {}).forEach(function(name){
    var info = data.upstreams[name], n = info.persistence_entries || 0, cap = info.persistence_capacity || 0;
    var r = el("tr", "table-row"); r.dataset.upstream = name;
    r.appendChild(td("upstream", name)); r.appendChild(td("kind", info.persistence));
    r.appendChild(td("entries num", n)); r.appendChild(td("capacity num", cap || "-"));
    r.appendChild(td("fill num", cap ? (100 * n / cap).toFixed(1) + "%%" : "-"));
    pb.appendChild(r);
  });
  $("persistence").replaceChildren(head(TABLE_COLS), pb);
}
function jsonUrl(){
  var u = new URL(window.location.href);
  u.searchParams.set("format", "json"); u.hash = "";
  u.searchParams.set("since", String(sinceParam()));     // only samples we lack
  return u.toString();
}
function setLive(cls, text){ var l = $("live"); l.className = cls; $("livetext").textContent = text; }
function schedule(){ clearTimeout(timer); if (!paused) timer = setTimeout(refresh, REFRESH); }
function refresh(){
  fetch(jsonUrl(), {cache: "no-store", headers: {"Accept": "application/json"}})
    .then(function(r){ if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
    .then(function(data){
      var now = Date.now(), dt = prevAt ? (now - prevAt) / 1000 : 0;
      absorb(data);
      render(data, dt);
      prev = data; prevAt = now;
      window.mplbRefreshes = (window.mplbRefreshes || 0) + 1;
      $("error").className = "";
      setLive(paused ? "paused" : "", (paused ? "paused \u00b7 " : "live \u00b7 ") + "updated " + new Date(now).toLocaleTimeString());
    })
    .catch(function(err){
      var e = $("error"); e.textContent = "Cannot refresh statistics: " + err.message + " (showing the last snapshot; retrying)";
      e.className = "show"; setLive("stale", "stale");
    })
    .then(schedule);
}
$("pause").addEventListener("click", function(){
  paused = !paused; this.textContent = paused ? "Resume" : "Pause";
  if (paused) { clearTimeout(timer); setLive("paused", "paused"); } else refresh();
});
try { prev = JSON.parse($("initial").textContent); prevAt = Date.now(); } catch (e) { prev = null; }
window.mplbRefreshes = 0;
if (prev) { absorb(prev); render(prev, 0); }         // the charts at once, from the ring
schedule();
})();
"""


def render_html(data) -> str:
    """The whole dashboard page for one snapshot."""
    script = SCRIPT % {
        "refresh": REFRESH_MS,
        "charts": charts.script(),
        "numeric": json.dumps(sorted(NUMERIC)),
        "server_cols": json.dumps([list(c) for c in SERVER_COLUMNS]),
        "worker_cols": json.dumps([list(c) for c in WORKER_COLUMNS]),
        "table_cols": json.dumps([list(c) for c in TABLE_COLUMNS]),
    }
    upstreams = "".join(_upstream_section(name, info)
                        for name, info in data.get("upstreams", {}).items())
    if not upstreams:
        upstreams = '<section><p class="meta">No upstreams configured.</p></section>'
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>mplb status · {_e(data.get('pid'))}</title><style>{CSS}{charts.CSS}</style>"
        "</head><body>"
        "<header><h1>mplb</h1>"
        f"<span class='kv'>master <b id='pid'>{_e(data.get('pid'))}</b></span>"
        f"<span class='kv'>uptime <b id='uptime'>{_e(human_duration(data.get('uptime_s')))}</b></span>"
        f"<span class='kv'>generation <b id='generation'>{_e(data.get('generation'))}</b></span>"
        f"<span class='kv'>reloads <b id='reloads'>{_e(data.get('reloads'))}</b></span>"
        f"<span class='kv'>workers <b id='nworkers'>{len(data.get('workers', []))}</b></span>"
        f"{_store_header(data)}"
        "<span id='live'><span class='dot'></span><span id='livetext'>snapshot</span>"
        "<button id='pause' type='button'>Pause</button></span></header>"
        "<div id='error' role='alert'></div><main>"
        f"<div id='upstreams'>{upstreams}</div>"
        "<div class='grid'>"
        f"<section><h2>Workers</h2>{_workers_table(data)}</section>"
        f"<section><h2>Persistence tables</h2>{_tables_table(data)}</section>"
        "</div></main>"
        f"<script id='initial' type='application/json'>{_json_for_script(data)}</script>"
        f"<script>{script}</script></body></html>"
    )
