"""The nginx corpus (tests/nginx_configs): every file loads with ``mplb -t``; each is then
run on mplb and, where nginx is installed, on nginx, with the same backends, and the
requests and WebSocket upgrades the backend receives through each are compared.

What may differ is only what the README's "Coming from nginx" section documents:

- mplb forwards the client's Host, X-Forwarded-For, X-Forwarded-Proto and X-Real-IP
  unless proxy_set_header sets them (nginx sends its upstream's name as Host and none
  of the others);
- mplb keeps upstream connections alive: a plain request carries ``Connection: close``
  upstream only when proxy_set_header Connection says close (nginx sends close unless
  told otherwise);
- which server of a hash or ip_hash upstream a key lands on (both stick to one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from mplb.config import load
from mplb.workers.router import Router
from tests import nginx_harness as corpus
from tests.harness import (Backend, Mplb, RawWebSocket, free_port, mplb_command,
                           parse_responses, raw_exchange)

pytestmark = pytest.mark.timeout(240)

FILES = corpus.corpus_files()
CLIENT = "127.0.0.1"


def test_corpus_has_ten_configurations_or_more():
    assert len(FILES) >= 10


@pytest.mark.parametrize("name", FILES)
def test_mplb_t_accepts(name):
    path = os.path.join(corpus.CORPUS, name)
    result = subprocess.run(mplb_command() + ["-t", "-conf", path], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# --- probes -----------------------------------------------------------------------------

@dataclass
class Http:
    path: str
    host: str = "localhost"
    headers: tuple = ()
    method: str = "GET"
    body: bytes = b""


@dataclass
class Ws:
    path: str
    host: str = "localhost"
    headers: tuple = ()


@dataclass
class Sticky:
    """Requests from one client: the same backend for all (``per_path``: per path)."""

    paths: tuple
    host: str = "localhost"
    per_path: bool = False
    ws_path: str = None            # an upgrade that must land where the requests did


@dataclass
class Run:
    port: int
    backend_names: dict = field(default_factory=dict)


XFF = (("X-Forwarded-For", "203.0.113.7"),)
PROBES = {
    "01_websocket_map.conf": [Http("/"), Http("/page?x=1&y", headers=(("X-Custom", "v"),)),
                              Ws("/ws")],
    "02_socketio.conf": [
        Http("/socket.io/?EIO=4&transport=polling", "example.com"),
        Ws("/socket.io/?EIO=4&transport=websocket", "example.com"),
        Http("/index.html", "example.com"),
        Sticky(tuple(f"/socket.io/?EIO=4&transport=polling&t={i}" for i in range(6)),
               "example.com", ws_path="/socket.io/?EIO=4&transport=websocket")],
    "03_chat_least_conn.conf": [
        Ws("/ws/room1", "chat.example.com", XFF),
        Http("/api/messages?since=5", "chat.example.com", XFF),
        Http("/api/messages", "chat.example.com", method="POST", body=b'{"text":"hi"}')],
    "04_home_assistant.conf": [
        Http("/", "homeassistant.example.net"),
        Http("/api/states", "homeassistant.example.net"),
        Ws("/api/websocket", "homeassistant.example.net")],
    "05_grafana_live.conf": [
        Http("/grafana/d/abc?orgId=1"), Http("/grafana/public/a%20b.js"),
        Ws("/grafana/api/live/ws")],
    "06_reverse_proxy_keepalive.conf": [
        Http("/", "app.example.com"), Http("/x?y=z", "www.app.example.com", XFF),
        Http("/upload", "app.example.com", method="PUT", body=b"x" * 5000)],
    "07_ip_hash_sticky.conf": [
        Http("/"), Ws("/lobby"),
        Sticky(tuple(f"/room/{i}" for i in range(8)), ws_path="/lobby")],
    "08_hash_request_uri.conf": [
        Http("/item/1?v=2"),
        Sticky(tuple(f"/item/{i}" for i in range(30)), per_path=True)],
    "09_regex_server_names.conf": [
        Http("/", "acme.apps.example.com"), Http("/users", "admin.apps.example.com"),
        Http("/", "unknown.example.org"), Ws("/events", "beta-2.apps.example.com")],
    "10_proxy_pass_uri.conf": [
        Http("/api/users?id=7", "api.example.com"), Http("/api/a%20b/c", "api.example.com"),
        Http("/api//x/./y", "api.example.com"), Http("/healthz", "api.example.com"),
        Http("/other?q", "api.example.com"), Ws("/live/feed?room=1", "api.example.com")],
    "11_return_variables.conf": [
        Http("/any/path?x=1", "old.example.com"),
        Http("/whoami?a=1", "new.example.com"), Http("/maintenance", "new.example.com"),
        Http("/maintenance", "new.example.com", (("X-Maintenance", "on"),)),
        Http("/go/x", "new.example.com"), Http("/app/page", "new.example.com")],
    "12_full_nginx_conf.conf": [
        Ws("/stream/ticks", "realtime.example.com"), Http("/", "realtime.example.com")],
    "13_game_hash_remote_addr.conf": [
        Ws("/play", "eu.game.example.org", (("User-Agent", "Mozilla/5.0 (iPhone)"),)),
        Http("/play/state", "game.example.org", (("User-Agent", "curl/8.0"),)),
        Http("/play/state", "game.example.org", (("User-Agent", "Android 14"),)),
        Sticky(tuple(f"/play/{i}" for i in range(6)), "game.example.org")],
}


def test_every_corpus_file_is_exercised():
    assert set(PROBES) == set(FILES)


def http(port, probe: Http):
    """(status, lower-case headers, body) of one request, Connection: close."""
    head = [f"{probe.method} {probe.path} HTTP/1.1", f"Host: {probe.host}",
            "Connection: close"]
    head += [f"{name}: {value}" for name, value in probe.headers]
    if probe.body or probe.method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(probe.body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + probe.body
    data, _ = raw_exchange(port, raw, timeout=10)
    (response,) = parse_responses(data, head_only=(0,) if probe.method == "HEAD" else ())
    headers = {name.lower(): value for name, value in response.headers}
    return response.status, headers, response.body


def upgrade(port, probe: Ws):
    """What the backend received for an upgrade, after an echo through the tunnel."""
    with RawWebSocket(port, probe.path, host_header=probe.host, headers=probe.headers) as ws:
        assert ws.status == 101, ws.head
        welcome = json.loads(ws.recv_data())
        ws.send_text("echo me")
        assert ws.recv_data() == b"echo me"
        ws.send_text("cmd:request")
        received = json.loads(ws.recv_data())
    # the key is random per connection: what matters is that it arrived unchanged
    assert received["headers"].pop("sec-websocket-key") == ws.key
    return dict(received, backend=welcome["backend"], upgrade=True)


def received_by_backend(port, probe):
    if isinstance(probe, Ws):
        return upgrade(port, probe)
    status, headers, body = http(port, probe)
    if headers.get("x-backend") is None:
        return {"answer": status, "location": headers.get("location"), "body": body}
    data = json.loads(body)
    assert status == 200 and data["method"] == probe.method, data
    return dict(data, upgrade=False)


# --- what may differ, and only that -------------------------------------------------------

def set_headers(config, probe) -> set:
    """Names of the headers proxy_set_header sets where ``probe`` is routed."""
    router = Router(config)
    listen = config.servers[0].listens[0].key
    path = probe.path.split("?")[0]
    _, location = router.route(listen, probe.host.lower(), path)
    return {template.name.lower() for template in location.settings.proxy_set_header}


def mplb_default(name, probe):
    """What mplb sends for a header proxy_set_header does not set (README)."""
    sent = dict((key.lower(), value) for key, value in probe.headers)
    if name == "host":
        return probe.host
    if name == "x-forwarded-for":
        return f"{sent['x-forwarded-for']}, {CLIENT}" if "x-forwarded-for" in sent else CLIENT
    return {"x-forwarded-proto": "http", "x-real-ip": CLIENT}[name]


def tokens(value):
    return {token.strip().lower() for token in (value or "").split(",")}


def compare(probe, sets, got, want):
    """mplb's request (``got``) against nginx's (``want``), by the rules above."""
    if "answer" in want:
        assert got["answer"] == want["answer"]
        assert got["location"] == want["location"]
        if got["answer"] < 300 or got["answer"] >= 400:
            assert got["body"] == want["body"]
        return
    assert (got["method"], got["target"]) == (want["method"], want["target"])
    names = (set(got["headers"]) | set(want["headers"])) - {"content-length"}
    for name in sorted(names):
        mine, theirs = got["headers"].get(name), want["headers"].get(name)
        if name == "connection":
            if got["upgrade"]:
                assert tokens(mine) == tokens(theirs) == {"upgrade"}
            else:
                closes = "connection" in sets and "close" in tokens(theirs)
                assert mine == ("close" if closes else None), (mine, theirs)
        elif name in ("host", "x-forwarded-for", "x-forwarded-proto", "x-real-ip") \
                and name not in sets:
            assert mine == mplb_default(name, probe), name
        else:
            assert mine == theirs, (name, mine, theirs)


def check_sticky(port, probe: Sticky):
    """Requests of one client stick: to one backend, or one per path."""
    seen = {}
    for path in probe.paths:
        status, _, body = http(port, Http(path, probe.host))
        assert status == 200
        seen[path] = json.loads(body)["backend"]
    if probe.per_path:
        for path in probe.paths:
            status, _, body = http(port, Http(path, probe.host))
            assert json.loads(body)["backend"] == seen[path], path
        assert len(set(seen.values())) > 1, "a hash that sends every key to one server"
    else:
        assert len(set(seen.values())) == 1, seen
        if probe.ws_path:
            assert upgrade(port, Ws(probe.ws_path, probe.host))["backend"] in seen.values()


# --- the run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backends():
    started = []
    try:
        for index in range(3):
            started.append(Backend(f"b{index}"))
        yield started
    finally:
        for backend in started:
            backend.stop()


def start(text, backends, make):
    """A proxy (mplb or nginx) on the corpus text: its listen port and the process."""
    listens, placeholders = corpus.ports_of(text)
    mapping = {port: backend.port for port, backend in zip(placeholders, backends)}
    mapping.update({port: free_port() for port in listens})
    process = make(corpus.substitute(text, mapping), [mapping[port] for port in listens])
    return mapping[listens[0]], process, corpus.substitute(text, mapping)


def start_mplb(text, ports):
    return Mplb(text, workers=2, verbose=False, wait_ports=ports)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_proxies_like_nginx(name, backends, tmp_path):
    text = corpus.read(name)
    port, lb, mplb_text = start(text, backends, start_mplb)
    proxies = [lb]
    try:
        config_path = tmp_path / "mplb.conf"
        config_path.write_text(mplb_text)
        config = load(str(config_path))
        nginx_port = None
        if corpus.NGINX:
            nginx_port, nginx, _ = start(text, backends, corpus.Nginx)
            proxies.append(nginx)
        for probe in PROBES[name]:
            if isinstance(probe, Sticky):
                check_sticky(port, probe)
                if nginx_port:
                    check_sticky(nginx_port, probe)
                continue
            got = received_by_backend(port, probe)
            if nginx_port:
                compare(probe, set_headers(config, probe), got,
                        received_by_backend(nginx_port, probe))
            elif "answer" not in got:
                for header in ("host", "x-forwarded-for", "x-real-ip"):
                    if header not in set_headers(config, probe):
                        assert got["headers"][header] == mplb_default(header, probe)
    except BaseException:
        for proxy in proxies:
            print(proxy.output()[-3000:], file=sys.stderr)
        raise
    finally:
        for proxy in proxies:
            proxy.stop()
