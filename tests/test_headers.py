"""Unit tests of workers/headers.py: the upstream request head a HeadPlan renders."""
import textwrap

import pytest

from mplb.config import load
from mplb.config.model import UpstreamServer
from mplb.workers.headers import HeadPlan, connection_tokens
from mplb.workers.requestheaders import SPECIAL_REQUEST_HEADERS
from mplb.workers.request import Request


class FakeConn:
    def __init__(self):
        self.head_blocks = {}

    client_ip = "10.1.2.3"
    client_port = 5555
    server_ip = "127.0.0.1"
    server_port = 8080
    scheme = "http"
    default_host = "127.0.0.1"


def make_plan(tmp_path, location_body="", server_body=""):
    conf = tmp_path / "h.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        upstream app {{ server http://127.0.0.1:9; }}
        server {{
            listen 127.0.0.1:18080;
            {server_body}
            location / {{
                proxy_pass app;
                {location_body}
            }}
        }}
    """))
    config = load(str(conf))
    return HeadPlan(config.servers[0].locations[0].settings)


def make_request(headers, method="GET", url=b"/a/b?x=1", upgrade=False):
    request = Request(FakeConn())
    request.method = method
    request.url = url
    request.headers = [(n.encode(), v.encode()) for n, v in headers]
    for name, value in request.headers:      # what the parser callback does per header
        handler = SPECIAL_REQUEST_HEADERS.get(name.lower())
        if handler is not None:
            handler(request, value)
    request.is_upgrade = upgrade
    request.headers_done = True
    return request


UPSTREAM_SERVER = UpstreamServer(url="http://127.0.0.1:9", host="127.0.0.1", port=9,
                                 address="127.0.0.1")


def render(plan, request, framing=b""):
    head = plan.render(request, UPSTREAM_SERVER, framing)
    assert head.endswith(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[:-2]
    pairs = []
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        pairs.append((name.lower(), value))
    return lines[0], pairs


def values(pairs, name):
    return [v for n, v in pairs if n == name]


def test_defaults(tmp_path):
    plan = make_plan(tmp_path)
    first, pairs = render(plan, make_request([("Host", "Example.com:8080"), ("Accept", "*/*")]))
    assert first == "GET /a/b?x=1 HTTP/1.1"
    assert values(pairs, "host") == ["Example.com:8080"]          # as the client sent it
    assert values(pairs, "x-forwarded-for") == ["10.1.2.3"]
    assert values(pairs, "x-forwarded-proto") == ["http"]
    assert values(pairs, "x-real-ip") == ["10.1.2.3"]
    assert values(pairs, "accept") == ["*/*"]
    assert values(pairs, "connection") == []                       # keep-alive upstream


def test_x_forwarded_for_is_appended_once(tmp_path):
    plan = make_plan(tmp_path)
    _, pairs = render(plan, make_request([("Host", "h"), ("X-Forwarded-For", "1.1.1.1"),
                                          ("X-Forwarded-For", "2.2.2.2")]))
    assert values(pairs, "x-forwarded-for") == ["1.1.1.1, 2.2.2.2, 10.1.2.3"]


def test_client_forwarded_headers_are_replaced_not_duplicated(tmp_path):
    plan = make_plan(tmp_path)
    _, pairs = render(plan, make_request([("Host", "h"), ("X-Real-IP", "6.6.6.6"),
                                          ("X-Forwarded-Proto", "https")]))
    assert values(pairs, "x-real-ip") == ["10.1.2.3"]
    assert values(pairs, "x-forwarded-proto") == ["http"]


def test_missing_host_uses_upstream_address(tmp_path):
    plan = make_plan(tmp_path)
    _, pairs = render(plan, make_request([]))
    assert values(pairs, "host") == ["127.0.0.1:9"]


def test_proxy_set_header_override_variables_and_removal(tmp_path):
    plan = make_plan(tmp_path, """
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP "";
        proxy_set_header X-Custom "v=$http_x_foo;port=$remote_port";
        proxy_set_header X-Req "$request_method $request_uri $uri $args $scheme";
        proxy_set_header X-Server "$server_addr:$server_port";
        proxy_set_header X-Static static-value;
        proxy_set_header X-Empty-Var $http_x_absent;
    """)
    request = make_request([("Host", "Foo.Example:8080"), ("X-Foo", "bar"),
                            ("X-Real-IP", "6.6.6.6"), ("X-Static", "client")],
                           url=b"/a/./b/../c?k=v")
    _, pairs = render(plan, request)
    assert values(pairs, "host") == ["foo.example"]
    assert values(pairs, "x-real-ip") == []                        # removed: empty value
    assert values(pairs, "x-custom") == ["v=bar;port=5555"]
    assert values(pairs, "x-req") == ["GET /a/./b/../c?k=v /a/c k=v http"]
    assert values(pairs, "x-server") == ["127.0.0.1:8080"]
    assert values(pairs, "x-static") == ["static-value"]           # replaces the client's
    assert values(pairs, "x-empty-var") == []                      # empty after rendering
    assert values(pairs, "x-forwarded-for") == ["10.1.2.3"]        # defaults still apply


def test_x_forwarded_for_override(tmp_path):
    plan = make_plan(tmp_path, "proxy_set_header X-Forwarded-For $remote_addr;")
    _, pairs = render(plan, make_request([("Host", "h"), ("X-Forwarded-For", "1.1.1.1")]))
    assert values(pairs, "x-forwarded-for") == ["10.1.2.3"]


def test_server_level_headers_inherited_unless_location_sets_its_own(tmp_path):
    plan = make_plan(tmp_path, server_body="proxy_set_header X-From-Server s;")
    _, pairs = render(plan, make_request([("Host", "h")]))
    assert values(pairs, "x-from-server") == ["s"]
    plan = make_plan(tmp_path, "proxy_set_header X-From-Location l;",
                     server_body="proxy_set_header X-From-Server s;")
    _, pairs = render(plan, make_request([("Host", "h")]))
    assert values(pairs, "x-from-location") == ["l"]
    assert values(pairs, "x-from-server") == []                    # nginx: not merged


def test_hop_by_hop_stripped(tmp_path):
    plan = make_plan(tmp_path)
    request = make_request([
        ("Host", "h"), ("Connection", "keep-alive, X-Named, x-other"), ("X-Named", "1"),
        ("X-Other", "2"), ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"), ("Trailer", "X-T"), ("Upgrade", "websocket"),
        ("Transfer-Encoding", "chunked"), ("Content-Length", "5"), ("Expect", "100-continue"),
        ("X-End", "kept")])
    _, pairs = render(plan, request, b"Content-Length: 5\r\n")
    names = [n for n, _ in pairs]
    for name in ("x-named", "x-other", "keep-alive", "proxy-connection", "te", "trailer",
                 "upgrade", "transfer-encoding", "expect", "connection"):
        assert name not in names, name
    assert values(pairs, "content-length") == ["5"]                # the framing given
    assert values(pairs, "x-end") == ["kept"]


def test_upgrade_only_for_upgrades(tmp_path):
    plan = make_plan(tmp_path, """
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    """)
    headers = [("Host", "h"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Version", "13"),
               ("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Extensions", "x")]
    _, pairs = render(plan, make_request(headers, upgrade=True))
    assert values(pairs, "upgrade") == ["websocket"]
    assert values(pairs, "connection") == ["upgrade"]
    for name, value in headers[3:]:
        assert values(pairs, name.lower()) == [value]
    # The same headers on a request that is not an upgrade (e.g. HTTP/1.0): no Upgrade.
    _, pairs = render(plan, make_request(headers, upgrade=False))
    assert values(pairs, "upgrade") == []
    assert values(pairs, "connection") == []


def test_upgrade_added_even_without_configuration(tmp_path):
    plan = make_plan(tmp_path)
    _, pairs = render(plan, make_request([("Host", "h"), ("Upgrade", "websocket"),
                                          ("Connection", "keep-alive, Upgrade")], upgrade=True))
    assert values(pairs, "upgrade") == ["websocket"]
    assert values(pairs, "connection") == ["upgrade"]


@pytest.mark.parametrize("directive,expected_version,close", [
    ("proxy_http_version 1.0;", "HTTP/1.0", True),
    ("proxy_set_header Connection close;", "HTTP/1.1", True),
    ("", "HTTP/1.1", False),
])
def test_upstream_connection_header(tmp_path, directive, expected_version, close):
    plan = make_plan(tmp_path, directive)
    first, pairs = render(plan, make_request([("Host", "h")]))
    assert first.endswith(expected_version)
    assert values(pairs, "connection") == (["close"] if close else [])
    assert plan.keepalive is not close


def test_connection_tokens():
    assert connection_tokens(b" Keep-Alive , X-A,,UPGRADE ") == {b"keep-alive", b"x-a",
                                                                   b"upgrade"}


def test_decoded_uri_cannot_inject_header_lines(tmp_path):
    """$uri is percent-decoded: %0d%0a in it must not split the upstream header."""
    plan = make_plan(tmp_path, "proxy_set_header X-Uri $uri;")
    request = make_request([("Host", "a")], url=b"/x%0d%0aInjected:%20yes")
    _, pairs = render(plan, request)
    assert values(pairs, "x-uri") == ["/xInjected: yes"]
    assert values(pairs, "injected") == []
    assert b"\r\nInjected" not in plan.render(request, UPSTREAM_SERVER, b"")
    with pytest.raises(ValueError):          # a NUL in the path is a 400 before routing
        make_request([("Host", "a")], url=b"/x%00").uri
