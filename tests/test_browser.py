"""Browser test of the WebSocket demo page (examples/websocket_client/index.html).

Headless Chromium (the system /usr/bin/chromium, driven by Playwright) opens the page
through a real mplb (GET /client is served by the example backend), connects, sends a
message and sees the echo naming a backend; reconnecting keeps the backend (ip_hash
with the guide's basic configuration; the MPLB_SESSION cookie with a cookie
configuration, the browser sending the cookie on the WebSocket handshake).

Skipped when /usr/bin/chromium, Playwright or mplb is missing.
"""
from __future__ import annotations

import re

import pytest

from tests.harness import browser_marks, launch_chromium
from tests.test_examples import (ETC, Procs, free_ports, local_conf, need_mplb,
                                 start_backends, start_mplb)

pytestmark = browser_marks()

COOKIE_CONF = """
upstream backend {
    method round_robin;
    persistence cookie;
    server http://127.0.0.1:8001;
    server http://127.0.0.1:8002;
    server http://127.0.0.1:8003;
}
server {
    listen 8080;
    location / {
        proxy_pass backend;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    }
}
"""


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()


def open_page(browser, url: str):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15000)
    page.goto(url)
    page.wait_for_selector("body[data-status=open]")
    page.wait_for_function("document.getElementById('backend').textContent !== '-'")
    return context, page


def send_and_check_echo(page, text: str) -> str:
    backend = page.text_content("#backend")
    page.fill("#message", text)
    page.click("#send")
    item = page.locator("#messages li.echo", has_text=text)
    item.first.wait_for()
    assert item.first.text_content() == f"{backend}: {text}"
    return backend


def reconnect(page, n: int) -> int:
    """Click Reconnect and wait for the n-th connection's welcome; return the count."""
    page.click("#reconnect")
    page.wait_for_function(f"document.getElementById('count').textContent === '{n}'")
    page.wait_for_function("document.getElementById('backend').textContent !== '-'")
    return n


def test_page_through_mplb_basic_conf(browser, procs, tmp_path):
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports)
    conf = local_conf(ETC / "websocket-basic.conf", bports, lb, tmp_path / "basic.conf")
    start_mplb(procs, mplb, conf, lb, workers=2)

    context, page = open_page(browser, f"http://127.0.0.1:{lb}/client")
    try:
        assert page.input_value("#path") == "/ws"
        assert page.text_content("#url") == f"ws://127.0.0.1:{lb}/ws"
        backend = send_and_check_echo(page, "hello through mplb")
        assert re.fullmatch(r"backend[123]", backend)
        # ip_hash: the same browser (127.0.0.1) comes back to the same backend
        for n in range(2, 5):
            reconnect(page, n)
            assert page.text_content("#backend") == backend
        send_and_check_echo(page, "still here")

        # another path, typed into the box
        page.click("#disconnect")
        page.wait_for_selector("body[data-status=closed]")
        page.fill("#path", "/game/ws")
        page.click("#connect")
        page.wait_for_selector("body[data-status=open]")
        assert page.text_content("#url") == f"ws://127.0.0.1:{lb}/game/ws"
        send_and_check_echo(page, "on another path")
    finally:
        context.close()


def test_page_cookie_persistence(browser, procs, tmp_path):
    """round_robin alone would move a reconnecting browser; the cookie keeps it."""
    mplb = need_mplb()
    *bports, lb = free_ports(4)
    start_backends(procs, bports)
    src = tmp_path / "cookie.src.conf"
    src.write_text(COOKIE_CONF)
    conf = local_conf(src, bports, lb, tmp_path / "cookie.conf")
    start_mplb(procs, mplb, conf, lb, workers=1)

    seen = set()
    for _ in range(2):   # two independent browsers (separate cookie jars)
        context, page = open_page(browser, f"http://127.0.0.1:{lb}/client?path=/")
        try:
            backend = send_and_check_echo(page, "cookie check")
            for n in range(2, 6):
                reconnect(page, n)
                assert page.text_content("#backend") == backend
            cookies = {c["name"]: c for c in context.cookies()}
            assert "MPLB_SESSION" in cookies and cookies["MPLB_SESSION"]["httpOnly"]
            seen.add(backend)
        finally:
            context.close()
    assert seen, "no backend seen"
