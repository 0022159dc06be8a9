"""Unit tests of workers/router.py: nginx location precedence and server_name selection."""
import textwrap

import pytest

from mplb.config import load
from mplb.workers.router import Router

LISTEN = ("127.0.0.1", 18081)
OTHER = ("127.0.0.1", 18082)

CONFIG = r"""
worker_processes 1;
server {
    listen 127.0.0.1:18081;
    server_name first.test;
    location = / { return 200 "exact-root"; }
    location / { return 200 "root"; }
    location = /exact { return 200 "exact"; }
    location /exact { return 200 "prefix-exact"; }
    location /docs/ { return 200 "docs"; }
    location /docs/api/ { return 200 "docs-api"; }
    location ^~ /static/ { return 200 "static"; }
    location ^~ /static/long/ { return 200 "static-long"; }
    location ~ \.(png|gif)$ { return 200 "image"; }
    location ~ ^/docs/.*\.png$ { return 200 "docs-png"; }
    location ~* \.JPG$ { return 200 "jpg"; }
    location ~ ^/case/ABC { return 200 "case-sensitive"; }
    location /static/deep/ { return 200 "plain-under-caret"; }
}
server {
    listen 127.0.0.1:18081;
    server_name www.example.com example.com;
    location / { return 200 "example"; }
}
server {
    listen 127.0.0.1:18081;
    server_name *.example.com;
    location / { return 200 "wild-example"; }
}
server {
    listen 127.0.0.1:18081;
    server_name *.api.example.com;
    location / { return 200 "wild-api"; }
}
server {
    listen 127.0.0.1:18081;
    server_name mail.*;
    location / { return 200 "mail-any"; }
}
server {
    listen 127.0.0.1:18081 default_server;
    server_name default.test;
    location / { return 200 "default"; }
}
server {
    listen 127.0.0.1:18082;
    server_name only.test;
    location /only/ { return 200 "only"; }
}
server {
    listen 127.0.0.1:18082;
    server_name second.test;
    location / { return 200 "second"; }
}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    path = tmp_path_factory.mktemp("router") / "r.conf"
    path.write_text(textwrap.dedent(CONFIG))
    return Router(load(str(path)))


def answer(router, host, uri, key=LISTEN):
    vserver, location = router.route(key, host, uri)
    return None if location is None else location.return_text


@pytest.mark.parametrize("uri,expected", [
    ("/", "exact-root"),
    ("/x", "root"),
    ("/exact", "exact"),                 # = beats an equal prefix
    ("/exact/", "prefix-exact"),
    ("/exactly", "prefix-exact"),
    ("/docs/", "docs"),
    ("/docs/api/x", "docs-api"),         # longest prefix
    ("/docs/a.png", "image"),            # regexes in file order: first match wins
    ("/docs/api/a.png", "image"),
    ("/static/a.png", "static"),         # ^~ stops the regex search
    ("/static/long/a.png", "static-long"),
    ("/static/deep/a.png", "image"),     # longest prefix is a plain one: regexes apply
    ("/static/deep/a.txt", "plain-under-caret"),
    ("/photo.jpg", "jpg"),               # ~* is case-insensitive
    ("/photo.JpG", "jpg"),
    ("/case/ABC", "case-sensitive"),
    ("/case/abc", "root"),               # ~ is case-sensitive
    ("/img.PNG", "root"),
])
def test_location_precedence(router, uri, expected):
    assert answer(router, "first.test", uri) == expected


def test_no_matching_location_is_none(router):
    assert answer(router, "only.test", "/elsewhere", key=OTHER) is None
    assert answer(router, "only.test", "/only/x", key=OTHER) == "only"


def test_repeated_lookups_are_stable(router):
    """The per-table caches give the same answers as the first lookup."""
    for _ in range(3):
        assert answer(router, "first.test", "/docs/a.png") == "image"
        assert answer(router, "first.test", "/static/a.png") == "static"
        assert answer(router, "x.example.com", "/") == "wild-example"


@pytest.mark.parametrize("host,expected", [
    ("first.test", "exact-root"),
    ("www.example.com", "example"),       # exact beats *.example.com
    ("example.com", "example"),
    ("foo.example.com", "wild-example"),
    ("a.b.example.com", "wild-example"),
    ("x.api.example.com", "wild-api"),   # longest leading wildcard
    ("mail.example.org", "mail-any"),    # trailing wildcard
    ("mail.example.com", "wild-example"),  # leading wildcard beats trailing
    ("rex.test", "default"),
    ("default.test", "default"),
    ("unknown.test", "default"),         # default_server, not the first block
    ("", "default"),
])
def test_server_name_selection(router, host, expected):
    assert answer(router, host, "/") == expected


def test_first_block_is_default_without_default_server(router):
    assert answer(router, "nobody.test", "/only/a", key=OTHER) == "only"
    assert answer(router, "second.test", "/x", key=OTHER) == "second"
