"""nginx's spellings in the configuration (README "Coming from nginx"): upstream methods,
map, regex server names, proxy_pass with a URI, variables in return, and the nginx-only
directives that are ignored with a warning or refused with an error."""
import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from mplb.config import docs, load, nginx
from mplb.errors import ConfigError
from tests.harness import Backend, Mplb, RawWebSocket, free_port, get, wait_for

B = "server 127.0.0.1:9001;"


def load_text(tmp_path, text, name="nginx.conf"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load(str(path))


def error_of(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def upstream(tmp_path, body):
    return load_text(tmp_path, f"upstream u {{ {body} }}\n").upstreams["u"]


# --- upstream: least_conn, ip_hash, hash ----------------------------------------------

def test_least_conn_is_least_connections(tmp_path):
    up = upstream(tmp_path, f"least_conn; {B}")
    assert up.method == "least_connections" and up.persistence.kind == "none"


def test_ip_hash_is_persistence_ip_hash_with_defaults(tmp_path):
    up = upstream(tmp_path, f"ip_hash; {B}")
    assert up.method == "weighted_round_robin"
    assert (up.persistence.kind, up.persistence.ttl, up.persistence.table_size) == \
        ("ip_hash", 3600.0, 65536)


@pytest.mark.parametrize("line, parts", [
    ("hash $request_uri consistent;", ((True, "request_uri"),)),
    ("hash $request_uri;", ((True, "request_uri"),)),       # the same without consistent
    ("hash $request_uri$args;", ((True, "request_uri"), (True, "args"))),
    ("hash \"$remote_addr:$http_x_user\" consistent;",
     ((True, "remote_addr"), (False, ":"), (True, "http_x_user"))),
])
def test_hash_is_consistent_hash_with_a_template_key(tmp_path, line, parts):
    up = upstream(tmp_path, f"{line} {B}")
    assert up.persistence.kind == "consistent_hash"
    assert up.persistence.key.parts == parts


def test_nginx_method_combines_with_mplb_spelling(tmp_path):
    """mplb's own method/persistence lines combine with the other half of nginx's."""
    up = upstream(tmp_path, f"least_conn; persistence cookie; {B}")
    assert (up.method, up.persistence.kind) == ("least_connections", "cookie")
    up = upstream(tmp_path, f"method round_robin; ip_hash; {B}")
    assert (up.method, up.persistence.kind) == ("round_robin", "ip_hash")


@pytest.mark.parametrize("first, second, why", [
    ("method round_robin;", "least_conn;", "one balancing method"),
    ("least_conn;", "method round_robin;", "one balancing method"),
    ("persistence cookie;", "ip_hash;", "one persistence"),
    ("ip_hash;", "persistence cookie;", "one persistence"),
    ("persistence ip_hash;", "hash $uri;", "one persistence"),
    ("least_conn;", "ip_hash;", "nginx allows one of least_conn, ip_hash, hash"),
    ("hash $uri;", "least_conn;", "nginx allows one of"),
    ("ip_hash;", "hash $uri consistent;", "nginx allows one of"),
])
def test_conflicting_spellings_name_both_lines(tmp_path, first, second, why):
    error = error_of(tmp_path, f"upstream u {{\n    {first}\n    {second}\n    {B}\n}}\n")
    assert error.line == 3 and error.file.endswith("nginx.conf")
    earlier = first.split()[0].rstrip(";")
    assert f'conflicts with "{earlier}" at {error.file}:2' in error.message
    assert why in error.message


@pytest.mark.parametrize("body, message", [
    ("hash $uri random;", 'invalid parameter "random"'),
    ("hash $nosuch;", 'unknown "nosuch" variable'),
    ("least_conn x;", 'invalid number of arguments in "least_conn"'),
    ("ip_hash; ip_hash;", '"ip_hash" directive is duplicate'),
    ("random two;", '"random" directive is not supported'),
])
def test_upstream_spelling_errors(tmp_path, body, message):
    assert message in error_of(tmp_path, f"upstream u {{ {body} {B} }}\n").message


def test_server_without_scheme(tmp_path):
    up = upstream(tmp_path, "server 127.0.0.1:9001 weight=2; server localhost:9002;")
    assert [s.url for s in up.servers] == ["http://127.0.0.1:9001", "http://localhost:9002"]


# --- map --------------------------------------------------------------------------------

MAPS = r"""
http {
    proxy_set_header X-Early $late;          # used above its definition, as nginx allows
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }
    map $host $pool {
        hostnames;
        default        main;
        example.com    exact;
        *.example.com  wild;
        .example.org   dotted;
        mail.*         mail;
        ~^api\d+\.     regex-first;
        ~*^API         regex-caseless;
        \default       literal-default;
    }
    map $uri $late {
        volatile;
        ~^/v(?<version>\d+)/(.*)$ "$version:$2:$pool";
        include maps/extra.map;
    }
    server { listen 127.0.0.1:18080; location / { return 200 "$pool"; } }
}
"""


@pytest.fixture
def maps(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "extra.map").write_text("/exact   from-include;\n")
    return load_text(tmp_path, MAPS).maps


def select(vmap, source):
    template, match = vmap.select(source)
    return template.source, match


def test_map_idiom(maps):
    vmap = maps["connection_upgrade"]
    assert vmap.source.parts == ((True, "http_upgrade"),)
    assert select(vmap, "")[0] == "close"
    assert select(vmap, "websocket")[0] == "upgrade"


@pytest.mark.parametrize("host, expected", [
    ("example.com", "exact"),
    ("EXAMPLE.com", "exact"),                 # strings ignore case
    ("www.example.com", "wild"),
    ("a.b.example.com", "wild"),
    ("example.org", "dotted"),                # .example.org: the name itself too
    ("x.example.org", "dotted"),
    ("mail.test", "mail"),
    ("mail.example.com", "wild"),             # *.suffix before prefix.*
    ("api1.test", "regex-first"),             # regexes in file order
    ("API1.test", "regex-caseless"),          # ~ is case-sensitive, ~* is not
    ("default", "literal-default"),           # \default is the literal string
    ("other.test", "main"),
])
def test_map_matching_order(maps, host, expected):
    assert select(maps["pool"], host)[0] == expected


def test_map_regex_value_reads_its_captures_and_include_and_volatile(maps):
    vmap = maps["late"]
    value, match = select(vmap, "/v2/rest")
    assert value == "$version:$2:$pool" and match.group("version") == "2"
    assert select(vmap, "/exact") == ("from-include", None)
    assert select(vmap, "/nothing") == ("", None)            # no default: empty
    assert vmap.references >= {"pool", "version", "2"}


def test_map_variable_usable_before_its_definition(tmp_path, maps):
    config = load_text(tmp_path, "proxy_set_header X $m;\nmap $uri $m { default x; }\n"
                                 "server { listen 127.0.0.1:18080; }\n")
    assert config.servers[0].settings.proxy_set_header[0].parts == ((True, "m"),)


@pytest.mark.parametrize("text, line, message", [
    ("map $uri host { }\n", 1, 'invalid variable name "host"'),
    ("map $uri $host { }\n", 1, 'the duplicate "host" variable'),
    ("map $uri $http_x { }\n", 1, 'the duplicate "http_x" variable'),
    ("map $uri $a { }\nmap $args $A { }\n", 2, 'the duplicate "a" variable'),
    ("map $uri $a {\n x;\n}\n", 2, "invalid number of the map parameters"),
    ("map $uri $a {\n x 1 2;\n}\n", 2, "invalid number of the map parameters"),
    ("map $uri $a {\n default 1;\n default 2;\n}\n", 3, "duplicate default"),
    ("map $uri $a {\n X 1;\n x 2;\n}\n", 3, 'duplicate source value "x"'),
    ("map $uri $a {\n \"~(\" 1;\n}\n", 2, "invalid regular expression"),
    ("map $uri $a {\n x $nosuch;\n}\n", 2, 'unknown "nosuch" variable'),
    ("map $uri $a {\n x $1;\n}\n", 2, 'unknown "1" variable'),   # captures: regexes only
    ("map $uri $a {\n hostnames on;\n}\n", 2, "invalid number of the map parameters"),
    ("map $b $a { }\nmap $a $b { }\n", 1, "cycle in map variables: $a -> $b -> $a"),
    ("map $uri $a {\n default $a;\n}\n", 1, "cycle in map variables: $a -> $a"),
    ("server {\n map $uri $a { }\n}\n", 2, '"map" directive is not allowed here'),
    ("map $uri { }\n", 1, 'invalid number of arguments in "map" directive'),
    ("map $uri $a;\n", 1, 'directive "map" has no opening "{"'),
])
def test_map_errors(tmp_path, text, line, message):
    error = error_of(tmp_path, text)
    assert (error.line, message in error.message) == (line, True), str(error)


# --- server_name regexes ---------------------------------------------------------------

def test_regex_server_names_compile_pcre_and_define_captures(tmp_path):
    config = load_text(tmp_path, r"""
        server {
            listen 127.0.0.1:18080;
            proxy_set_header X-User $user;      # a capture of the next server block
            server_name plain.test ~^(?<sub>[a-z]+)\.example\.com$;
        }
        server {
            listen 127.0.0.1:18080;
            server_name "~^(?'user'\w+)\.users\.test$" ~^WWW\.;
        }
    """)
    first, second = config.servers
    assert first.server_names == ("plain.test",)
    (regex,) = first.name_regexes
    assert regex.match("abc.example.com").group("sub") == "abc"
    assert not regex.match("ABC.example.com")          # lower-case pattern: as written
    users, caseless = second.name_regexes
    assert users.match("ann.users.test").group("user") == "ann"
    assert caseless.match("www.x")                     # a capital letter: caseless
    assert config.capture_names == {"sub", "user"}


def test_regex_server_name_errors(tmp_path):
    assert "invalid regular expression" in error_of(
        tmp_path, 'server {\n server_name "~^(?<a>x";\n}\n').message
    assert "empty regex" in error_of(tmp_path, 'server {\n server_name ~;\n}\n').message


# --- proxy_pass with a URI, return with variables --------------------------------------

def location(tmp_path, body, pattern="/app/"):
    config = load_text(tmp_path, f"upstream backend {{ {B} }}\n"
                                 f"server {{ listen 127.0.0.1:18080; location {pattern} "
                                 f"{{ {body} }} }}\n")
    return config.servers[0].locations[0]


@pytest.mark.parametrize("target, uri", [
    ("http://backend/v1/", "/v1/"), ("http://backend/", "/"), ("http://backend", None),
    ("backend", None), ("http://127.0.0.1:9001/x", "/x"),
])
def test_proxy_pass_uri_part(tmp_path, target, uri):
    loc = location(tmp_path, f"proxy_pass {target};")
    assert loc.proxy_uri == uri and loc.upstream in ("backend", "127.0.0.1:9001")


def test_proxy_pass_uri_refused_where_nginx_refuses(tmp_path):
    error = error_of(tmp_path, f"upstream backend {{ {B} }}\nserver {{\n"
                               "  location ~ ^/a { proxy_pass http://backend/b/; }\n}\n")
    assert error.line == 3
    assert "cannot have URI part in location given by regular expression" in error.message
    assert "is not supported" in error_of(
        tmp_path, f"upstream backend {{ {B} }}\nserver {{ location / "
                  "{ proxy_pass http://backend/a?b=1; } }\n").message


def test_return_with_variables_and_escapes(tmp_path):
    loc = location(tmp_path, r'return 200 "host=$host uri=${uri}\n";')
    assert loc.return_value.parts == ((False, "host="), (True, "host"), (False, " uri="),
                                      (True, "uri"), (False, "\n"))
    loc = location(tmp_path, "return 301 https://$host$request_uri;")
    assert loc.return_code == 301 and loc.return_value.source == "https://$host$request_uri"
    loc = location(tmp_path, r'return 200 "plain\ttext";')
    assert loc.return_value is None and loc.return_text == "plain\ttext"


# --- nginx-only directives: ignored with one warning, or refused ------------------------

NGINX_HTTP = """
events {
    multi_accept on;
}
http {
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    types_hash_max_size 2048;
    server_tokens off;
    include mime.types;
    default_type application/octet-stream;
    gzip off;
    gzip_types text/plain;
    proxy_cache_path /tmp/cache keys_zone=c:1m;
    types { text/html html; }
    server {
        listen 127.0.0.1:18080 reuseport http2;
        access_log /var/log/nginx/x.log;
        location / {
            proxy_buffering off;
            proxy_buffers 8 16k;
            proxy_buffer_size 16k;
            proxy_redirect off;
            proxy_cache_bypass $http_upgrade;
        }
    }
}
"""


def test_nginx_tuning_is_accepted_with_one_warning_each(tmp_path):
    text = NGINX_HTTP
    config = load_text(tmp_path, text)
    path = str(tmp_path / "nginx.conf")
    lines = text.splitlines()
    expected = []
    for number, line in enumerate(lines, start=1):
        word = line.split()[0] if line.split() else ""
        if word in ("sendfile", "tcp_nopush", "tcp_nodelay", "types_hash_max_size",
                    "server_tokens", "include", "default_type", "gzip", "gzip_types",
                    "proxy_cache_path", "types", "access_log", "proxy_buffering",
                    "proxy_buffers", "proxy_buffer_size", "proxy_redirect",
                    "proxy_cache_bypass", "multi_accept"):
            expected.append(number)
        if word == "listen":
            expected += [number, number]                       # reuseport and http2
    assert sorted(w.line for w in config.warnings) == expected
    assert all(w.file == path and str(w).startswith(f"{path}:{w.line}: ")
               for w in config.warnings)
    messages = "\n".join(w.message for w in config.warnings)
    assert '"include mime.types" is ignored' in messages
    assert 'the "http2" parameter of "listen" is ignored' in messages


def test_existing_mime_types_is_not_read(tmp_path):
    (tmp_path / "mime.types").write_text("this is not { valid mplb\n")
    config = load_text(tmp_path, "include mime.types;\nserver { listen 127.0.0.1:18080; }\n")
    assert [w.line for w in config.warnings] == [1]


@pytest.mark.parametrize("text, line, directive", [
    ("gzip on;\n", 1, "gzip"),
    ("server {\n location / {\n  rewrite ^ /x;\n }\n}\n", 3, "rewrite"),
    ("server {\n if ($http_x) { return 403; }\n}\n", 2, "if"),
    ("server {\n location / {\n  proxy_cache zone;\n }\n}\n", 3, "proxy_cache"),
    ("server {\n auth_basic \"x\";\n}\n", 2, "auth_basic"),
    ("server {\n add_header X-A b;\n}\n", 2, "add_header"),
    ("server {\n proxy_redirect http://a/ /;\n}\n", 2, "proxy_redirect"),
    ("server {\n root /var/www;\n}\n", 2, "root"),
    ("server {\n ssl_protocols TLSv1.2;\n}\n", 2, "ssl_protocols"),
    ("server {\n location / { proxy_pass_request_body off; }\n}\n", 2,
     "proxy_pass_request_body"),
])
def test_behaviour_changing_nginx_directives_are_refused(tmp_path, text, line, directive):
    error = error_of(tmp_path, text)
    assert error.line == line
    assert error.message.startswith(f'"{directive}" directive is not supported: ')


def test_nginx_directive_in_the_wrong_block_is_misplaced(tmp_path):
    error = error_of(tmp_path, f"upstream u {{\n {B}\n sendfile on;\n}}\n")
    assert (error.line, error.message) == (3, '"sendfile" directive is not allowed here')


def test_every_nginx_entry_is_documented():
    text = docs.render_reference()
    for entry in nginx.TABLE:
        assert f"``{entry.name}``" in text, entry.name


def test_t_prints_warnings(tmp_path):
    conf = tmp_path / "n.conf"
    conf.write_text("sendfile on;\nserver { listen 127.0.0.1:18080; }\n")
    result = subprocess.run([sys.executable, "-m", "mplb", "-t", "-conf", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert re.search(rf'mplb: \[warn\] {re.escape(str(conf))}:1: "sendfile" is ignored',
                     result.stderr), result.stderr
    assert "test is successful" in result.stderr


# --- end to end: a running mplb ---------------------------------------------------------

E2E = r"""
http {{
    sendfile on;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    map $host $tier {{ hostnames; default std; *.gold.test gold; }}
    upstream backend {{ least_conn; server {b1_address}; }}
    server {{
        listen 127.0.0.1:{port};
        server_name ~^(?<user>[a-z]+)\.users\.test$ plain.test;
        location /app/ {{
            proxy_pass http://backend/v1/;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header X-User $user;
            proxy_set_header X-Tier $tier;
        }}
        location = /hello {{ return 200 "hello $user from $host$request_uri\n"; }}
        location /moved {{ return 301 https://$host$uri?from=mplb; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name old.test;
        return 302 https://new.test$request_uri;
        location / {{ proxy_pass backend; }}
    }}
}}
"""


def test_running_mplb_speaks_nginx(tmp_path):
    backend = Backend("nx")
    port = free_port()
    lb = None
    try:
        lb = Mplb(E2E.format(port=port, b1_address=f"127.0.0.1:{backend.port}"),
                  workers=2, wait_ports=[port])
        status, _, body = get(port, "/app/a%20b/c?q=1", headers={"Host": "ann.users.test"})
        seen = json.loads(body)
        assert (status, seen["target"]) == (200, "/v1/a%20b/c?q=1")
        assert seen["headers"]["connection"] == "close" and "upgrade" not in seen["headers"]
        assert (seen["headers"]["x-user"], seen["headers"]["x-tier"]) == ("ann", "std")
        seen = json.loads(get(port, "/app/", headers={"Host": "x.gold.test"})[2])
        assert "x-user" not in seen["headers"] and seen["headers"]["x-tier"] == "gold"
        with RawWebSocket(port, "/app/ws", host_header="bob.users.test") as ws:
            assert ws.status == 101
            ws.recv_data()
            ws.send_text("cmd:request")
            upgrade = json.loads(ws.recv_data())
        assert upgrade["target"] == "/v1/ws"
        assert upgrade["headers"]["connection"].lower() == "upgrade"
        assert upgrade["headers"]["x-user"] == "bob"
        assert get(port, "/hello?x=1", headers={"Host": "cy.users.test"})[2] == \
            b"hello cy from cy.users.test/hello?x=1\n"
        status, headers, _ = get(port, "/moved/%0d%0aX-Evil:%20yes", headers={"Host": "plain.test"})
        assert status == 301 and "x-evil" not in headers       # no header injection
        assert headers["location"].startswith("https://plain.test/moved/")
        status, headers, _ = get(port, "/any?y=2", headers={"Host": "old.test"})
        assert (status, headers["location"]) == (302, "https://new.test/any?y=2")
        # one warning per ignored line: at start (not once per worker) and per reload
        wait_for(lambda: lb.output().count('"sendfile" is ignored') == 1, message="warning")
        lb.signal(signal.SIGHUP)
        wait_for(lambda: lb.output().count('"sendfile" is ignored') == 2,
                 message="the reload's warning")
        assert re.search(r'\[warn\] \d+#0: \S+mplb\.conf:3: "sendfile" is ignored', lb.output())
    finally:
        if lb is not None:
            lb.stop()
        backend.stop()
