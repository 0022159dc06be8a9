"""Unit tests of workers/variables.py (map variables, server_name captures) and of what
they drive in a request head (workers/headers.py): the WebSocket map idiom, proxy_pass
with a URI, and regex server names in the router."""
import textwrap

import pytest

from mplb.config import load
from mplb.config.model import UpstreamServer
from mplb.workers.headers import HeadPlan
from mplb.workers.request import Request
from mplb.workers.requestheaders import SPECIAL_REQUEST_HEADERS
from mplb.workers.router import Router
from mplb.workers.variables import VariableTable

LISTEN = ("127.0.0.1", 18080)
CONFIG = r"""
map $http_upgrade $connection_upgrade {
    default upgrade;
    ''      close;
}
map $http_x_tier $tier {
    default        "$pool/std";
    gold           "$pool/gold";
    ~^(?<level>\d)-(\w+)$ "level $level of $2 ($1)";
}
map $host $pool {
    hostnames;
    default a;
    *.b.test b;
}
map $http_x_count $counted { default "$counted_source"; }
map $http_x_count $counted_source { default x; }
upstream app { server 127.0.0.1:9; }
server {
    listen 127.0.0.1:18080;
    server_name exact.test ~^(?<user>[a-z]+)\.users\.test$ "~^(?<user>[a-z]+)\.(?<zone>eu|us)\.test$";
    location /ws/ {
        proxy_pass http://app;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header X-Tier $tier;
        proxy_set_header X-User $user;
    }
    location /api/ { proxy_pass http://app/v2/; }
    location = /one { proxy_pass http://app/uno; }
    location /keep/ { proxy_pass http://app; proxy_set_header Connection $http_x_conn; }
}
server {
    listen 127.0.0.1:18080;
    server_name *.users.test;
    location / { return 200 "wild $user"; }
}
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("variables") / "v.conf"
    path.write_text(textwrap.dedent(CONFIG))
    return load(str(path))


class FakeWorker:
    def __init__(self, config):
        self.router = Router(config)
        self.variables = VariableTable(config, self.router)


class FakeConn:
    client_ip = "10.1.2.3"
    client_port = 5555
    server_ip = "127.0.0.1"
    server_port = 18080
    scheme = "http"
    default_host = "127.0.0.1"
    listen_key = LISTEN

    def __init__(self, worker):
        self.worker = worker
        self.head_blocks = {}


@pytest.fixture(scope="module")
def worker(config):
    return FakeWorker(config)


def request_for(worker, headers, url=b"/ws/chat", method="GET", upgrade=False,
                kind=Request):
    request = kind(FakeConn(worker))
    request.method, request.url = method, url
    request.headers = [(n.encode(), v.encode()) for n, v in headers]
    for name, value in request.headers:
        handler = SPECIAL_REQUEST_HEADERS.get(name.lower())
        if handler is not None:
            handler(request, value)
    request.is_upgrade = upgrade             # what on_headers_complete decides
    request.headers_done = True
    return request


def value(worker, name, headers=(), host="x.test"):
    return worker.variables.value(request_for(worker, [("Host", host), *headers]), name)


# --- map variables ----------------------------------------------------------------------

@pytest.mark.parametrize("upgrade, expected", [(None, "close"), ("websocket", "upgrade"),
                                               ("", "close")])
def test_connection_upgrade_map(worker, upgrade, expected):
    headers = [("Upgrade", upgrade)] if upgrade is not None else []
    assert value(worker, "connection_upgrade", headers) == expected


@pytest.mark.parametrize("tier, host, expected", [
    (None, "x.test", "a/std"),                 # a value reading another map
    ("GOLD", "y.b.test", "b/gold"),            # strings ignore case
    ("7-fast", "x.test", "level 7 of fast (7)"),   # a regex value reads its captures
])
def test_map_values_with_variables_and_captures(worker, tier, host, expected):
    headers = [("X-Tier", tier)] if tier is not None else []
    assert value(worker, "tier", headers, host) == expected


class CountingRequest(Request):
    """Counts the header lookups a map's source makes."""

    lookups = 0

    def header(self, name_lower):
        if name_lower == "x-count":
            self.lookups += 1
        return super().header(name_lower)


def test_map_is_evaluated_once_per_request(worker):
    request = request_for(worker, [("Host", "x.test"), ("X-Count", "1")],
                          kind=CountingRequest)
    getter = worker.variables.getter("counted")
    assert getter(request) == "x" and getter(request) == "x"
    assert request.variable("counted") == "x" and request.variable("counted_source") == "x"
    assert request.lookups == 2                  # each map read its source once
    assert request.derived == {"counted": "x", "counted_source": "x"}
    fresh = request_for(worker, [("Host", "x.test")])
    assert fresh.derived is None                 # nothing is computed before it is used


def test_unknown_and_header_variables(worker):
    request = request_for(worker, [("Host", "x.test"), ("X-Custom-Thing", "v")])
    assert worker.variables.value(request, "http_x_custom_thing") == "v"
    assert worker.variables.value(request, "nothing_defines_this") == ""


# --- server_name captures ---------------------------------------------------------------

@pytest.mark.parametrize("host, user", [
    ("ann.users.test", ""),        # *.users.test (a wildcard) beats the regex: no capture
    ("bob.eu.test", "bob"),        # the regex that chose the server
    ("exact.test", ""),
    ("nobody.test", ""),           # the default server, chosen by no regex
])
def test_capture_variables(worker, host, user):
    assert value(worker, "user", host=host) == user


def test_regex_server_selection_order(worker):
    router = worker.router
    assert router.route(LISTEN, "ann.users.test", "/")[1].return_text == "wild $user"
    assert router.route(LISTEN, "bob.eu.test", "/ws/")[1].pattern == "/ws/"
    assert router.capture(LISTEN, "bob.us.test", "zone") == "us"


# --- the request head ---------------------------------------------------------------------

SERVER = UpstreamServer(url="http://127.0.0.1:9", host="127.0.0.1", port=9, address="127.0.0.1")


def head(worker, config, pattern, request):
    location = next(loc for loc in config.servers[0].locations if loc.pattern == pattern)
    plan = HeadPlan(location.settings, location, worker.variables)
    text = plan.render(request, SERVER, b"").decode("latin-1")
    lines = text.split("\r\n")
    fields = {}
    for line in lines[1:-2]:
        name, _, field = line.partition(": ")
        fields.setdefault(name.lower(), []).append(field)
    return lines[0], fields


def test_map_idiom_plain_request_goes_with_connection_close(worker, config):
    request = request_for(worker, [("Host", "bob.eu.test"), ("X-Tier", "gold")])
    first, fields = head(worker, config, "/ws/", request)
    assert first == "GET /ws/chat HTTP/1.1"
    assert fields["connection"] == ["close"] and "upgrade" not in fields
    assert fields["x-tier"] == ["a/gold"] and fields["x-user"] == ["bob"]
    assert request.upstream_close                  # the upstream connection is not reused


def test_map_idiom_upgrade(worker, config):
    request = request_for(worker, [("Host", "x.test"), ("Upgrade", "websocket"),
                                   ("Connection", "Upgrade")], upgrade=True)
    _, fields = head(worker, config, "/ws/", request)
    assert fields["connection"] == ["upgrade"] and fields["upgrade"] == ["websocket"]
    assert not request.upstream_close


def test_upgrade_headers_on_a_plain_post_are_hop_by_hop(worker, config):
    """A POST carrying Upgrade is not an upgrade: no Upgrade upstream (mplb's rule), and
    the map's "upgrade" value sends no Connection header (nothing to upgrade)."""
    request = request_for(worker, [("Host", "x.test"), ("Upgrade", "websocket"),
                                   ("Connection", "Upgrade")], method="POST")
    _, fields = head(worker, config, "/ws/", request)
    assert "upgrade" not in fields and "connection" not in fields
    assert not request.upstream_close


@pytest.mark.parametrize("sent, expected, closes", [
    (None, None, False), ("close", "close", True), ("keep-alive", None, False),
    ("Keep-Alive, Close", "close", True),
])
def test_connection_from_a_variable(worker, config, sent, expected, closes):
    headers = [("Host", "x.test")] + ([("X-Conn", sent)] if sent else [])
    request = request_for(worker, headers, url=b"/keep/x")
    _, fields = head(worker, config, "/keep/", request)
    assert fields.get("connection") == ([expected] if expected else None)
    assert request.upstream_close is closes


@pytest.mark.parametrize("pattern, url, target", [
    ("/api/", b"/api/users?id=1", "/v2/users?id=1"),       # prefix replaced, args kept
    ("/api/", b"/api/", "/v2/"),
    ("/api/", b"/api//a/./b/../c", "/v2/a/c"),              # the normalised URI ($uri)
    ("/api/", b"/api/a%20b/%3F", "/v2/a%20b/%3F"),         # escaped again when it was
    ("/api/", b"/api/caf%C3%A9", "/v2/caf%C3%A9"),
    ("/one", b"/one?x", "/uno?x"),                          # exact location
    ("/ws/", b"/ws/a%20b?q", "/ws/a%20b?q"),                # no URI part: unchanged
])
def test_proxy_pass_uri_replaces_the_location_prefix(worker, config, pattern, url, target):
    request = request_for(worker, [("Host", "x.test")], url=url)
    request.uri                                             # routing computed it
    first, _ = head(worker, config, pattern, request)
    assert first == f"GET {target} HTTP/1.1"
