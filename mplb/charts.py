"""The dashboard's charts: per server, the last five minutes of requests/s, open tunnels
and p50/p99 response time, drawn as small inline SVGs by the page's script.

Where the points come from: the master samples every server once a second into a ring
in the shared segment (mplb/sampler.py, mplb/shm/timing.py).  The page gets the whole
ring embedded in its first snapshot and then asks the JSON for the samples after the
newest one it has (``?since=T``), so reopening or reloading the page, or a reload of
mplb itself (the master and its ring stay), never loses the history; the page keeps at
most the last five minutes.  Elements are made with ``createElementNS`` and text with
``textContent``: nothing from the segment is parsed as markup.
"""
from __future__ import annotations

WINDOW_SECONDS = 300

CSS = """
.server-charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));
gap:4px 16px;margin-top:10px}
.server-charts h3{grid-column:1/-1;font-size:13px;margin:8px 0 0;color:var(--muted)}
figure.chart{margin:0}figure.chart figcaption{font-size:12px;color:var(--muted)}
svg.chart-svg{width:100%;height:64px;display:block}
svg.chart-svg .plot{fill:none;stroke:var(--line)}
svg.chart-svg .line{fill:none;stroke-width:1.5}
.line.rps{stroke:#2e90fa}.line.tunnels{stroke:#12b76a}.line.p50{stroke:#f79009}
.line.p99{stroke:#d92d20}.dot.p50{fill:#f79009}.dot.p99{fill:#d92d20}.dot.rps{fill:#2e90fa}
.dot.tunnels{fill:#12b76a}.legend{font-size:12px;font-variant-numeric:tabular-nums}
"""

SCRIPT = r"""
var WINDOW = %(window)d, MIN_SPAN = 30, SVGNS = "http://www.w3.org/2000/svg";
var FIELDS = ["t", "rps", "tunnels", "p50_ms", "p99_ms"];
var store = {}, latest = 0;
window.mplbCharts = store;
function eachServer(data, fn){
  Object.keys(data.upstreams || {}).forEach(function(up){
    (data.upstreams[up].servers || []).forEach(function(s){ fn(up, s); });
  });
}
function absorb(data){
  eachServer(data, function(up, s){
    var h = s.history;
    if (!h || !h.t) return;
    var st = store[s.url];
    if (!st) { st = store[s.url] = {}; FIELDS.forEach(function(f){ st[f] = []; }); }
    var last = st.t.length ? st.t[st.t.length - 1] : 0;
    for (var i = 0; i < h.t.length; i++) {
      if (h.t[i] <= last) continue;
      FIELDS.forEach(function(f){ st[f].push(h[f][i]); });
      if (h.t[i] > latest) latest = h.t[i];
    }
  });
  Object.keys(store).forEach(function(key){
    var st = store[key];
    while (st.t.length && st.t[0] < latest - WINDOW) FIELDS.forEach(function(f){ st[f].shift(); });
  });
}
function svgEl(tag, attrs){
  var n = document.createElementNS(SVGNS, tag);
  Object.keys(attrs).forEach(function(k){ n.setAttribute(k, attrs[k]); });
  return n;
}
function lastValue(values){
  for (var i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}
function round(v){ return v === null ? "-" : (v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2)); }
function span(){
  // the x axis: the history there is (at least MIN_SPAN seconds), at most WINDOW
  var first = latest;
  Object.keys(store).forEach(function(k){ if (store[k].t.length && store[k].t[0] < first) first = store[k].t[0]; });
  return Math.min(WINDOW, Math.max(MIN_SPAN, latest - first));
}
function drawChart(title, metric, st, lines, unit){
  var W = 300, H = 64, P = 2, width = span(), t0 = latest - width, top = 0, drawn = 0;
  lines.forEach(function(l){ st[l.key].forEach(function(v){ if (v !== null && v > top) top = v; }); });
  top = top > 0 ? top * 1.1 : 1;
  var fig = el("figure", "chart"); fig.dataset.metric = metric;
  fig.appendChild(el("figcaption", null, title));
  var svg = svgEl("svg", {"class": "chart-svg", viewBox: "0 0 " + W + " " + H,
                          preserveAspectRatio: "none", role: "img", "aria-label": title});
  svg.appendChild(svgEl("rect", {"class": "plot", x: 0.5, y: 0.5, width: W - 1, height: H - 1}));
  lines.forEach(function(l){
    var points = [];
    function flush(){
      if (points.length > 1) {
        svg.appendChild(svgEl("polyline", {"class": "line " + l.cls, points: points.join(" ")}));
      } else if (points.length) {               // a lone sample between gaps: a dot
        var xy = points[0].split(",");
        svg.appendChild(svgEl("circle", {"class": "dot " + l.cls, cx: xy[0], cy: xy[1], r: 1.5}));
      }
      drawn += points.length; points = [];
    }
    for (var i = 0; i < st.t.length; i++) {
      var v = st[l.key][i];
      if (v === null || v === undefined) { flush(); continue; }
      var x = P + (st.t[i] - t0) / width * (W - 2 * P), y = H - P - v / top * (H - 2 * P);
      points.push(x.toFixed(1) + "," + y.toFixed(1));
    }
    flush();
  });
  svg.setAttribute("data-points", String(drawn));
  fig.appendChild(svg);
  fig.appendChild(el("div", "legend", lines.map(function(l){
    return (l.label ? l.label + " " : "") + "now " + round(lastValue(st[l.key])) + unit;
  }).join(" \u00b7 ") + " \u00b7 max " + round(top / 1.1) + unit));
  return fig;
}
function serverCharts(s){
  var st = store[s.url];
  if (!st) { st = {}; FIELDS.forEach(function(f){ st[f] = []; }); }
  var box = document.createDocumentFragment();
  var h = el("h3", null, s.server + " \u00b7 up to the last 5 minutes"); box.appendChild(h);
  box.appendChild(drawChart("Requests/s", "rps", st, [{key: "rps", cls: "rps"}], "/s"));
  box.appendChild(drawChart("Open tunnels", "tunnels", st, [{key: "tunnels", cls: "tunnels"}], ""));
  box.appendChild(drawChart("Response time (ms)", "latency", st,
    [{key: "p50_ms", cls: "p50", label: "p50"}, {key: "p99_ms", cls: "p99", label: "p99"}], " ms"));
  return box;
}
function chartsFor(up, servers){
  var grid = el("div", "server-charts"); grid.dataset.upstream = up;
  servers.forEach(function(s){ grid.appendChild(serverCharts(s)); });
  return grid;
}
function sinceParam(){ return latest; }
"""


def script() -> str:
    return SCRIPT % {"window": WINDOW_SECONDS}
