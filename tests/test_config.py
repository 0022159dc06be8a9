"""Configuration loading: file-pair cases (tests/configs) plus focused checks of what the
workers rely on (effective inheritance, implicit upstreams, immutability, docs coverage)."""
import dataclasses
import os
import re
import socket
from pathlib import Path
from types import MappingProxyType

import pytest

from mplb.config import docs, load, registry
from mplb.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "configs"
CASE_FILES = sorted(CASES.glob("*.conf"))
_EXPECT = re.compile(r"#\s*error:\s*(?:(?P<file>[^:\s]+):)?(?P<line>\d+):\s*(?P<message>.+)")


def write(tmp_path, text, name="lb.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load_text(tmp_path, text):
    return load(write(tmp_path, text))


def error_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


# --- file-pair cases ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_FILES, ids=[case.name for case in CASE_FILES])
def test_case_file(case):
    """First line '# ok' or '# error: [FILE:]LINE: message substring'."""
    header = case.read_text().splitlines()[0]
    if header.strip() == "# ok":
        config = load(str(case))
        assert config.path == str(case)
        return
    expected = _EXPECT.match(header)
    assert expected, f"bad header in {case.name}: {header!r}"
    with pytest.raises(ConfigError) as info:
        load(str(case))
    error = info.value
    want_file = CASES / expected["file"] if expected["file"] else case
    assert os.path.samefile(error.file, want_file), str(error)
    assert error.line == int(expected["line"]), str(error)
    assert expected["message"].strip() in error.message, str(error)
    assert str(error).startswith(f"{error.file}:{error.line}: ")


def test_enough_cases():
    errors = [case for case in CASE_FILES if "# error:" in case.read_text().splitlines()[0]]
    assert len(errors) >= 30


# --- the default configuration ---------------------------------------------------------

def test_default_config_for_websocket_demo():
    config = load(str(ROOT / "etc" / "loadbalancer.conf"))
    backend = config.upstreams["backend"]
    assert backend.method == "weighted_round_robin"
    assert backend.persistence.kind == "ip_hash"
    assert backend.persistence.ttl == 3600
    assert [s.url for s in backend.servers] == [
        "http://127.0.0.1:8001", "http://127.0.0.1:8002", "http://127.0.0.1:8003"]
    assert config.worker_processes == (os.cpu_count() or 1)
    (vserver,) = config.servers
    assert [str(listen) for listen in vserver.listens] == ["0.0.0.0:8080"]
    assert vserver.server_names == ("localhost",)
    root, status = vserver.locations
    assert root.upstream == "backend"
    assert root.settings.proxy_read_timeout == 3600
    headers = {h.name: h.parts for h in root.settings.proxy_set_header}
    assert headers == {"Upgrade": ((True, "http_upgrade"),), "Connection": ((False, "upgrade"),),
                       "Host": ((True, "host"),), "X-Real-IP": ((True, "remote_addr"),)}
    assert status.modifier == "=" and status.pattern == "/mplb_status" and status.status
    assert [rule.allow for rule in status.settings.access_rules] == [True, False]
    assert status.settings.access_rules[1].network is None


# --- inheritance -------------------------------------------------------------------------

INHERIT = """
proxy_read_timeout 100s;
proxy_connect_timeout 7s;
proxy_set_header X-Main main;
allow 10.0.0.0/8;
deny all;
upstream u { server http://127.0.0.1:9001; }
server {
    listen 8080;
    proxy_read_timeout 200s;
    proxy_set_header X-Server server;
    location /inherits { proxy_pass u; }
    location /own {
        proxy_read_timeout 300s;
        proxy_set_header X-Loc loc;
        deny 10.1.0.0/16;
        proxy_pass u;
    }
}
server {
    listen 8081;
    location / { proxy_pass u; }
}
"""


def test_scalars_inherit_inward(tmp_path):
    config = load_text(tmp_path, INHERIT)
    first, second = config.servers
    inherits, own = first.locations
    assert first.settings.proxy_read_timeout == 200
    assert inherits.settings.proxy_read_timeout == 200
    assert own.settings.proxy_read_timeout == 300
    assert inherits.settings.proxy_connect_timeout == 7       # from main, two levels up
    assert second.locations[0].settings.proxy_read_timeout == 100
    assert second.locations[0].settings.proxy_send_timeout == 60   # built-in default


def test_arrays_inherit_as_a_whole(tmp_path):
    config = load_text(tmp_path, INHERIT)
    first, second = config.servers
    inherits, own = first.locations
    names = lambda loc: [h.name for h in loc.settings.proxy_set_header]
    assert names(inherits) == ["X-Server"]           # the server's, not merged with main's
    assert names(own) == ["X-Loc"]
    assert names(second.locations[0]) == ["X-Main"]
    # allow/deny: the location's single deny replaces the inherited rules entirely
    assert len(own.settings.access_rules) == 1
    assert str(own.settings.access_rules[0].network) == "10.1.0.0/16"
    assert len(inherits.settings.access_rules) == 2


# --- upstreams and proxy_pass ---------------------------------------------------------

def test_implicit_upstream_and_forward_reference(tmp_path):
    config = load_text(tmp_path, """
server {
    listen 8080;
    location /a { proxy_pass http://127.0.0.1:9005; }
    location /b { proxy_pass ws://127.0.0.1:9005; }
    location /c { proxy_pass http://later; }
}
upstream later { server http://127.0.0.1:9006; }
""")
    a, b, c = config.servers[0].locations
    assert a.upstream == b.upstream == "127.0.0.1:9005"
    implicit = config.upstreams["127.0.0.1:9005"]
    assert implicit.implicit and implicit.method == "weighted_round_robin"
    assert [s.url for s in implicit.servers] == ["http://127.0.0.1:9005"]
    assert implicit.line == 4
    assert c.upstream == "later" and not config.upstreams["later"].implicit
    assert isinstance(config.upstreams, MappingProxyType)


def test_least_conn_alias_and_server_params(tmp_path):
    config = load_text(tmp_path, """
upstream u {
    method least_conn;
    persistence cookie secret=s3 learn=JSESSIONID;
    keepalive 8;
    health_check interval=2s uri=/healthz fails=3 passes=2 timeout=500ms;
    server ws://localhost:9001 weight=5 max_fails=0 fail_timeout=30s max_conns=100;
    server 127.0.0.1 backup;
}
""")
    upstream = config.upstreams["u"]
    assert upstream.method == "least_connections"
    assert upstream.persistence.kind == "cookie" and upstream.persistence.ttl == 86400
    assert upstream.persistence.learn == "JSESSIONID" and upstream.persistence.secret == "s3"
    assert upstream.keepalive == 8
    assert upstream.health_check.interval == 2 and upstream.health_check.timeout == 0.5
    assert upstream.health_check.uri == "/healthz" and upstream.health_check.fails == 3
    first, second = upstream.servers
    assert first.url == "http://localhost:9001" and first.address in ("127.0.0.1", "::1")
    assert (first.weight, first.max_fails, first.fail_timeout, first.max_conns) == (5, 0, 30, 100)
    assert second.url == "http://127.0.0.1:80" and second.backup


def test_persistence_defaults(tmp_path):
    config = load_text(tmp_path, """
upstream a { persistence ip_hash table_size=1024; server http://127.0.0.1:1; }
upstream b { persistence consistent_hash; server http://127.0.0.1:1; }
upstream c { persistence consistent_hash key=${http_X_User}; server http://127.0.0.1:1; }
upstream d { server http://127.0.0.1:1; }
""")
    assert config.upstreams["a"].persistence.ttl == 3600
    assert config.upstreams["a"].persistence.table_size == 1024
    assert config.upstreams["b"].persistence.key.source == "$uri"
    assert config.upstreams["c"].persistence.key.source == "$http_x_user"
    assert config.upstreams["d"].persistence.kind == "none"


def test_duplicate_upstream_server_is_refused(tmp_path):
    error = error_of(tmp_path, "upstream u {\n server http://127.0.0.1:1;\n"
                               " server 127.0.0.1:1;\n}\n")
    assert error.line == 3 and "duplicate server" in error.message


# --- listen, server, location --------------------------------------------------------

def test_listen_forms(tmp_path):
    config = load_text(tmp_path, """
server { listen [::]:8080; listen localhost:8081 backlog=64; listen 127.0.0.1; }
server { }
""")
    first, second = config.servers
    assert [(l.host, l.port) for l in first.listens] == [("::", 8080), ("127.0.0.1", 8081),
                                                        ("127.0.0.1", 80)]
    assert first.listens[1].backlog == 64
    assert [str(l) for l in second.listens] == ["0.0.0.0:80"]
    assert str(first.listens[0]) == "[::]:8080"


def test_same_listen_in_several_blocks_is_virtual_hosting(tmp_path):
    config = load_text(tmp_path, """
server { listen 8080; server_name A.example.com; }
server { listen 8080 default_server; server_name *.example.com example.*; }
""")
    assert len(config.listens) == 1
    assert config.servers[0].server_names == ("a.example.com",)


def test_location_modifiers(tmp_path):
    config = load_text(tmp_path, """
server {
    listen 8080;
    location = /exact { return 204; }
    location ^~ /static/ { return 200 "static"; }
    location ~* \\.PHP$ { return 403; }
    location ~^/api/v[0-9]+ { return 301 https://example.com/; }
    location /plain { return https://example.com/x; }
    location /empty { }
}
""")
    exact, static, php, api, plain, empty = config.servers[0].locations
    assert (exact.modifier, exact.return_code) == ("=", 204)
    assert (static.modifier, static.return_text) == ("^~", "static")
    assert php.modifier == "~*" and php.regex.search("/x/index.php")
    assert api.modifier == "~" and api.pattern == "^/api/v[0-9]+" and api.regex.match("/api/v2")
    assert (api.return_code, api.return_text) == (301, "https://example.com/")
    assert (plain.return_code, plain.return_text) == (302, "https://example.com/x")
    assert empty.upstream is None and empty.return_code is None and not empty.status


def test_header_templates(tmp_path):
    config = load_text(tmp_path, """
proxy_set_header X-Mix "${host}:$server_port/$HTTP_USER_AGENT";
proxy_set_header X-Static "plain value";
proxy_set_header X-Gone "";
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
server { listen 8080; }
""")
    mix, static, gone, xff = config.servers[0].settings.proxy_set_header
    assert mix.parts == ((True, "host"), (False, ":"), (True, "server_port"), (False, "/"),
                         (True, "http_user_agent"))
    assert static.static and static.literal == "plain value"
    assert gone.parts == () and gone.literal == ""
    assert xff.parts == ((True, "proxy_add_x_forwarded_for"),)


def test_main_directives(tmp_path):
    config = load_text(tmp_path, """
worker_processes 3;
worker_shutdown_timeout 1m;
pid /tmp/mplb-test.pid;
error_log /tmp/mplb-error.log debug;
access_log /tmp/mplb-access.log;
proxy_next_upstream off;
proxy_websocket_keepalive on interval=10s;
large_client_header_buffers 8 16k;
client_max_body_size 0;
server { listen 8080; }
""")
    assert config.worker_processes == 3 and config.worker_shutdown_timeout == 60
    assert config.pid == "/tmp/mplb-test.pid"
    assert (config.error_log.path, config.error_log.level) == ("/tmp/mplb-error.log", "debug")
    assert config.access_log == "/tmp/mplb-access.log"
    settings = config.servers[0].settings
    assert settings.proxy_next_upstream == frozenset()
    assert settings.proxy_websocket_keepalive and settings.proxy_websocket_keepalive_interval == 10
    assert settings.large_client_header_buffers == (8, 16384)
    assert settings.client_max_body_size == 0


def test_defaults_without_main_directives(tmp_path):
    config = load_text(tmp_path, "server { listen 8080; }\n")
    assert config.worker_processes == (os.cpu_count() or 1)
    assert config.error_log.path is None and config.access_log is None
    assert config.worker_connections == 10000


def test_results_are_immutable(tmp_path):
    config = load_text(tmp_path, INHERIT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.servers[0].locations[0].settings.proxy_read_timeout = 1
    with pytest.raises(TypeError):
        config.upstreams["x"] = None
    assert isinstance(config.servers, tuple)
    assert isinstance(config.servers[0].locations[0].settings.proxy_set_header, tuple)
    assert isinstance(config.servers[0].locations[0].settings.access_rules, tuple)


def test_error_names_included_file(tmp_path):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "x.conf").write_text("\n\nproxy_read_timeout never;\n")
    error = error_of(tmp_path, "worker_processes 1;\ninclude conf.d/*.conf;\n")
    assert error.file == str(tmp_path / "conf.d" / "x.conf") and error.line == 3


def test_glob_without_match_is_fine(tmp_path):
    config = load_text(tmp_path, "include nothing/*.conf;\nserver { listen 8080; }\n")
    assert len(config.servers) == 1


def test_unsupported_directive_is_refused(tmp_path, monkeypatch):
    """The 'supported' flag: a known directive whose behaviour is missing is refused."""
    (entry,) = registry.by_name("proxy_send_timeout")
    monkeypatch.setitem(registry._BY_NAME, "proxy_send_timeout",
                        [dataclasses.replace(entry, supported=False)])
    error = error_of(tmp_path, "\nproxy_send_timeout 5s;\n")
    assert error.line == 2
    assert error.message == '"proxy_send_timeout" directive is not supported yet'


def test_every_spec_directive_is_supported():
    assert all(entry.supported for entry in registry.DIRECTIVES)


@pytest.mark.parametrize("text, line, message", [
    ("server {\n location / { return 301; }\n}\n", 2, '"return 301" needs a URL'),
    ("server {\n location / { return 200 $nosuch; }\n}\n", 2, 'unknown "nosuch" variable'),
    ("server {\n location / { proxy_pass https://127.0.0.1:1; }\n}\n", 2,
     "is not supported yet"),
    ("server {\n location / { proxy_pass 127.0.0.1:1; }\n}\n", 2, "invalid URL prefix"),
    ("server {\n location @named { }\n}\n", 2, "named location is not supported yet"),
    ("server {\n server_name \"~^(www\";\n}\n", 2, "invalid regular expression"),
    ("server {\n listen 8080 proxy_protocol;\n}\n", 2,
     'the "proxy_protocol" parameter of "listen" is not supported'),
    ("server {\n listen 8080 bogus;\n}\n", 2, 'invalid parameter "bogus"'),
    ("upstream u {\n server http://127.0.0.1:1/path;\n}\n", 2, "has no path"),
    ("upstream u {\n server http://127.0.0.1:1;\n persistence cookie name=a;\n"
     " persistence none;\n}\n", 4, '"persistence" directive is duplicate'),
    ("proxy_http_version 2.0;\n", 1, 'invalid value "2.0" in "proxy_http_version"'),
    ("proxy_set_header X $;\n", 1, "invalid variable name"),
    ("proxy_set_header X $http_;\n", 1, 'unknown "http_" variable'),
    ("proxy_set_header 'Bad Name' x;\n", 1, 'invalid header name "Bad Name"'),
    ("events {\n worker_connections 1;\n}\nworker_connections 2;\n", 4,
     '"worker_connections" directive is duplicate'),
])
def test_inline_errors(tmp_path, text, line, message):
    error = error_of(tmp_path, text)
    assert error.line == line, str(error)
    assert message in error.message, str(error)


# --- documentation -------------------------------------------------------------------

def test_docs_cover_every_directive():
    text = docs.render_reference()
    for entry in registry.DIRECTIVES:
        assert f":Syntax: ``{entry.name}" in text, entry.name
        assert entry.example.splitlines()[0] in text, entry.name
        assert entry.help and entry.syntax and entry.default


# --- the WebSocket guide's configurations -------------------------------------------

GUIDE = {
    "basic": """
upstream backend {
    method weighted_round_robin;  # Choose your preferred balancing method
    persistence ip_hash;          # Session persistence is important for WebSockets

    server http://backend1:8001 weight=1;
    server http://backend2:8001 weight=1;
    server http://backend3:8001 weight=1;
}

server {
    listen 8080;
    server_name localhost;

    location / {
        proxy_pass backend;

        # Required WebSocket headers
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
    }
}
""",
    "chat": """
upstream chat_backend {
    method least_connections;
    persistence ip_hash;

    server http://chat1:8001 weight=1;
    server http://chat2:8001 weight=1;
    server http://chat3:8001 weight=1;
}

server {
    listen 8080;
    server_name chat.example.com;

    location /ws {
        proxy_pass chat_backend;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    }
}
""",
    "game": """
upstream game_backend {
    method weighted_round_robin;
    persistence cookie;

    server http://game1:8001 weight=3;  # High-capacity server
    server http://game2:8001 weight=1;  # Low-capacity server
}

server {
    listen 8080;
    server_name game.example.com;

    location /game/ws {
        proxy_pass game_backend;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
    }
}
""",
}


def localise(text):
    """Replace the guide's host names (backend1:8001 ...) by distinct local ports."""
    counter = iter(range(8001, 8100))
    return re.sub(r"http://[a-z]+\d:8001", lambda _: f"http://127.0.0.1:{next(counter)}", text)


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_websocket_guide_configurations(tmp_path, name):
    config = load_text(tmp_path, localise(GUIDE[name]))
    (upstream,) = config.upstreams.values()
    location = config.servers[0].locations[0]
    assert location.upstream == upstream.name
    assert location.settings.proxy_http_version == "1.1"
    assert [h.name for h in location.settings.proxy_set_header][:2] == ["Upgrade", "Connection"]
    if name == "chat":
        assert upstream.method == "least_connections"
    if name == "game":
        assert upstream.persistence.kind == "cookie"
        assert [s.weight for s in upstream.servers] == [3, 1]


def test_guide_hosts_that_do_not_resolve_fail_cleanly(tmp_path):
    try:
        socket.getaddrinfo("backend1", 8001)
        pytest.skip("backend1 resolves on this machine")
    except socket.gaierror:
        pass
    error = error_of(tmp_path, GUIDE["basic"])
    assert error.line == 6
    assert error.message == 'host not found in upstream "backend1:8001"'
