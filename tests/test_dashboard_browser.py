"""The status dashboard in headless Chromium (system /usr/bin/chromium via Playwright).

Opens http://127.0.0.1:PORT/status like an operator's browser (Accept: text/html), checks
that every server has a row with its state, that the page refreshes itself from
``?format=json`` (a request counter changes after more traffic) and that it loads nothing
from anywhere else; under load, that each server's charts draw points (a screenshot is
saved under the test's tmp dir), and that the page stays live across a reload of mplb.
Skipped when /usr/bin/chromium is absent.
"""
from __future__ import annotations

import signal
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.harness import (RawWebSocket, Stack, browser_marks, free_port, get,
                           launch_chromium)

pytestmark = browser_marks()

CONF = """
upstream web {{
    method weighted_round_robin;
    server {b1} weight=2;
    server {b2};
    server http://127.0.0.1:{dead} down;
    server http://127.0.0.1:{spare} backup;
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass web; }}
    location = /status {{ mplb_status; allow 127.0.0.1; deny all; }}
}}
"""


@pytest.fixture
def lb():
    stack = Stack(CONF, backends=("d1", "d2"), dead=free_port(), spare=free_port())
    stack.mplb.dead, stack.mplb.spare = stack.values["dead"], stack.values["spare"]
    yield stack.mplb
    stack.stop()


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def row(page, server):
    return page.locator(f'tr.server-row[data-upstream="web"][data-server="{server}"]')


def test_dashboard_shows_servers_and_refreshes(lb, page):
    b1, b2 = lb.backends
    for _ in range(3):
        assert get(lb.port, "/")[0] == 200
    errors, urls = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda request: urls.append(request.url))
    base = f"http://127.0.0.1:{lb.port}"

    response = page.goto(f"{base}/status")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert page.title().startswith("mplb status")
    assert page.locator("#pid").inner_text() == str(lb.pid)

    expected = {f"127.0.0.1:{b1.port}": "up", f"127.0.0.1:{b2.port}": "up",
                f"127.0.0.1:{lb.dead}": "down", f"127.0.0.1:{lb.spare}": "backup"}
    assert page.locator("tr.server-row").count() == len(expected)
    for server, state in expected.items():
        r = row(page, server)
        assert r.count() == 1, server
        assert r.locator("td.server").inner_text().startswith(server)
        badge = r.locator("td.state .badge")
        assert badge.inner_text() == state
        assert f"state-{state}" in badge.get_attribute("class")
    # state colours are applied (not the same colour for up and down)
    up_bg = row(page, f"127.0.0.1:{b1.port}").locator(".badge").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    down_bg = row(page, f"127.0.0.1:{lb.dead}").locator(".badge").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    assert up_bg != down_bg
    for pid in [lb.pid]:
        assert page.locator("#pid").inner_text() == str(pid)
    worker_pids = {int(p) for p in page.locator("tr.worker-row").evaluate_all(
        "rows => rows.map(r => r.dataset.pid)")}
    assert worker_pids == set(lb.worker_pids())

    def requests_shown():
        cells = page.locator('tr.server-row[data-upstream="web"] td.requests')
        return sum(int(t) for t in cells.all_inner_texts())

    before = requests_shown()
    assert before >= 3
    for _ in range(8):
        assert get(lb.port, "/")[0] == 200
    # the page refreshes itself: wait (bounded) until the table shows the new traffic
    page.wait_for_function(
        """n => Array.from(document.querySelectorAll('tr.server-row td.requests'))
                   .reduce((s, c) => s + parseInt(c.textContent, 10), 0) >= n""",
        arg=before + 8, timeout=15000)
    assert requests_shown() >= before + 8
    assert page.evaluate("window.mplbRefreshes") >= 1
    # rows survive the redraw, with states, and bytes in human units
    for server, state in expected.items():
        assert row(page, server).locator(".badge").inner_text() == state
    bytes_in = row(page, f"127.0.0.1:{b1.port}").locator("td.bytes_in")
    assert bytes_in.inner_text().endswith(("B", "KiB", "MiB"))
    assert int(bytes_in.get_attribute("title")) > 0

    fetched = [u for u in urls if "format=json" in u]
    assert fetched and all(urlsplit(u).path == "/status" for u in fetched)
    assert all(urlsplit(u).netloc == f"127.0.0.1:{lb.port}" for u in urls), urls
    assert not errors, errors


def test_dashboard_shows_failure_banner_when_mplb_stops(lb, page):
    """A refresh that fails keeps the last tables and says so."""
    page.goto(f"http://127.0.0.1:{lb.port}/status")
    page.wait_for_function("window.mplbRefreshes >= 1", timeout=15000)
    lb.stop()
    page.wait_for_selector("#error.show", timeout=15000)
    assert "Cannot refresh" in page.locator("#error").inner_text()
    assert page.locator("tr.server-row").count() == 4
    assert "stale" in page.locator("#live").get_attribute("class")


# --- charts under load, across a reload ----------------------------------------------------

CHARTS_CONF = """
upstream web {{
    least_conn;
    server {b1};
    server {b2};
}}
server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass web; }}
    location = /status {{ mplb_status; }}
}}
"""


class Load:
    """HTTP requests in a loop and a few open WebSocket tunnels, until stopped."""

    def __init__(self, port, tunnels=3):
        self.port = port
        self.stop_event = threading.Event()
        self.sockets = [RawWebSocket(port, "/ws") for _ in range(tunnels)]
        self.requests = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.monotonic() + 120            # bounded whatever happens
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                get(self.port, "/", timeout=5)
                self.requests += 1
            except OSError:
                pass                                  # a reload may refuse one

    def stop(self):
        self.stop_event.set()
        self.thread.join(timeout=10)
        for ws in self.sockets:
            ws.close()


def chart_points(page, metric):
    """Points drawn in each server's chart of ``metric``."""
    return page.evaluate(
        """m => Array.from(document.querySelectorAll(
                 'figure.chart[data-metric="' + m + '"] svg.chart-svg'))
               .map(s => parseInt(s.getAttribute('data-points'), 10))""", metric)


def test_charts_draw_under_load_and_survive_a_reload(page, tmp_path):
    stack = Stack(CHARTS_CONF, backends=("c1", "c2"))
    load = None
    try:
        lb = stack.mplb
        load = Load(stack.port)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.goto(f"http://127.0.0.1:{stack.port}/status")
        # the master samples once a second: wait (bounded) for a few points per chart
        page.wait_for_function(
            """() => { const c = Array.from(document.querySelectorAll(
                          'figure.chart[data-metric="rps"] svg.chart-svg'));
                       return c.length == 2 && c.every(s => +s.getAttribute('data-points') >= 6); }""",
            timeout=30000)
        assert len(chart_points(page, "rps")) == 2
        assert all(n >= 1 for n in chart_points(page, "latency"))
        # the open tunnels show up in the tunnel charts (least_conn spreads them)
        page.wait_for_function(
            """() => Object.values(window.mplbCharts).reduce(
                   (sum, s) => sum + (s.tunnels.length ? s.tunnels[s.tunnels.length - 1] : 0),
                   0) == 3""", timeout=15000)
        assert max(max(s["rps"]) for s in page.evaluate("window.mplbCharts").values()) > 0
        shot = tmp_path / "dashboard-under-load.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10000

        before = sum(chart_points(page, "rps"))
        refreshes = page.evaluate("window.mplbRefreshes")
        lb.signal(signal.SIGHUP)
        page.wait_for_function("document.getElementById('generation').textContent === '2'",
                               timeout=30000)
        page.wait_for_function(f"window.mplbRefreshes >= {refreshes + 2}", timeout=30000)
        page.wait_for_function(
            f"""() => Array.from(document.querySelectorAll(
                    'figure.chart[data-metric="rps"] svg.chart-svg'))
                    .reduce((s, c) => s + +c.getAttribute('data-points'), 0) > {before}""",
            timeout=30000)
        assert "stale" not in (page.locator("#live").get_attribute("class") or "")
        # the history held in the master's ring survives reopening the page, too
        page.reload()
        page.wait_for_function(
            f"""() => Array.from(document.querySelectorAll(
                    'figure.chart[data-metric="rps"] svg.chart-svg'))
                    .reduce((s, c) => s + +c.getAttribute('data-points'), 0) > {before}""",
            timeout=15000)
        assert not errors, errors
    finally:
        if load is not None:
            load.stop()
        stack.stop()
