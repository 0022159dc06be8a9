"""Directive handlers: turn one validated statement into values on its block's scope.

The registry has already checked context and argument count; a handler checks values and
writes either ``scope.settings`` (the inheritable ProxySettings fields, nginx inheritance
applies) or ``scope.values`` (block-specific results the builder assembles).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from mplb.config import nginx
from mplb.config.model import (ConfigWarning, HeaderTemplate, HealthCheck, Listen, Persistence,
                               Template, UpstreamServer)
from mplb.config.values import (
    Stmt, compile_template, resolve_host, split_hostport, split_options, to_access_rule,
    to_flag, to_int, to_regex, to_single_variable, to_size, to_time, unescape,
)
from mplb.vocabulary import (METHOD_ALIASES, METHODS, NGINX_BALANCING, PERSISTENCE_MODES,
                             method_name)

NEXT_UPSTREAM = ("error", "timeout", "http_502", "http_503", "http_504", "off")
LOG_LEVELS = ("debug", "info", "warn", "error")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass
class Scope:
    """What one block (main, upstream, server, location) has collected so far."""

    kind: str
    base_dir: str
    settings: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)    # one list for the whole load
    variables: frozenset = frozenset()              # names the configuration defines

    def child(self, kind: str) -> "Scope":
        """A nested block's scope: same directory, warnings and variables."""
        return Scope(kind, self.base_dir, warnings=self.warnings, variables=self.variables)

    def warn(self, stmt: Stmt, message: str) -> None:
        self.warnings.append(ConfigWarning(message, stmt.file, stmt.line))

    def claim(self, stmt: Stmt, slot: str, why: str) -> None:
        """Refuse a second statement that sets what an earlier one (another name) set."""
        earlier = self.values.get(slot)
        if earlier is not None:
            raise stmt.error(f'"{stmt.name}" conflicts with "{earlier.name}" at '
                             f"{earlier.file}:{earlier.line} ({why})")
        self.values[slot] = stmt


# --- main -------------------------------------------------------------------------------

def set_worker_processes(stmt: Stmt, scope: Scope) -> None:
    value = stmt.args[0]
    scope.values["worker_processes"] = (
        os.cpu_count() or 1 if value == "auto" else to_int(stmt, value, minimum=1))


def set_worker_connections(stmt, scope):
    scope.values["worker_connections"] = to_int(stmt, stmt.args[0], minimum=1)


def set_worker_shutdown_timeout(stmt, scope):
    scope.values["worker_shutdown_timeout"] = to_time(stmt, stmt.args[0])


def set_user(stmt, scope):
    scope.values["user"] = stmt          # resolved by the builder, where root is known


def set_pid(stmt, scope):
    scope.values["pid"] = stmt.args[0]


def set_error_log(stmt, scope):
    path = None if stmt.args[0] == "stderr" else stmt.args[0]
    level = stmt.args[1] if len(stmt.args) > 1 else "info"
    if level not in LOG_LEVELS:
        raise stmt.invalid(level, "it must be one of " + ", ".join(LOG_LEVELS))
    scope.values["error_log"] = (path, level)


def set_access_log(stmt, scope):
    scope.values["access_log"] = None if stmt.args[0] == "off" else stmt.args[0]


# --- upstream ---------------------------------------------------------------------------

ONE_METHOD = "an upstream has one balancing method"
ONE_PERSISTENCE = "an upstream has one persistence"
ONE_NGINX = "nginx allows one of " + ", ".join(NGINX_BALANCING)


def set_method(stmt, scope):
    name = method_name(stmt.args[0])
    if name is None:
        expected = ", ".join(METHODS + tuple(METHOD_ALIASES))
        raise stmt.error(f'unknown method "{stmt.args[0]}" (expected one of {expected})')
    scope.claim(stmt, "method_stmt", ONE_METHOD)
    scope.values["method"] = name


def set_nginx_method(stmt, scope):
    """``least_conn;``: nginx's spelling of ``method least_connections``."""
    scope.claim(stmt, "nginx_balancing", ONE_NGINX)
    scope.claim(stmt, "method_stmt", ONE_METHOD)
    scope.values["method"] = NGINX_BALANCING[stmt.name]


def set_ip_hash(stmt, scope):
    """``ip_hash;``: nginx's spelling of ``persistence ip_hash`` (default ttl and size)."""
    scope.claim(stmt, "nginx_balancing", ONE_NGINX)
    scope.claim(stmt, "persistence_stmt", ONE_PERSISTENCE)
    mode = PERSISTENCE_MODES[NGINX_BALANCING[stmt.name]]
    scope.values["persistence"] = Persistence(kind=mode.name, ttl=mode.ttl)


def set_hash(stmt, scope):
    """``hash KEY [consistent];``: ``persistence consistent_hash key=KEY`` either way."""
    if len(stmt.args) > 1 and stmt.args[1] != "consistent":
        raise stmt.error(f'invalid parameter "{stmt.args[1]}"')
    if not stmt.args[0]:
        raise stmt.invalid(stmt.args[0], "the key must not be empty")
    scope.claim(stmt, "nginx_balancing", ONE_NGINX)
    scope.claim(stmt, "persistence_stmt", ONE_PERSISTENCE)
    key = Template(compile_template(stmt, stmt.args[0], scope.variables))
    scope.values["persistence"] = Persistence(kind=NGINX_BALANCING[stmt.name], key=key)


def set_persistence(stmt, scope):
    scope.claim(stmt, "persistence_stmt", ONE_PERSISTENCE)
    kind = stmt.args[0]
    mode = PERSISTENCE_MODES.get(kind)
    if mode is None:
        raise stmt.error(f'unknown persistence "{kind}" '
                         f'(expected one of {", ".join(PERSISTENCE_MODES)})')
    options = split_options(stmt, stmt.args[1:], mode.options, f'"persistence {kind}"')
    fields = {"kind": kind, "ttl": mode.ttl}
    if "ttl" in options:
        fields["ttl"] = to_time(stmt, options["ttl"], positive=True)
    if "table_size" in options:
        fields["table_size"] = to_int(stmt, options["table_size"], minimum=1)
    if "name" in options:
        if not _TOKEN.fullmatch(options["name"]):
            raise stmt.invalid(options["name"], "a cookie name is a token")
        fields["cookie_name"] = options["name"]
    if "secret" in options:
        if not options["secret"]:
            raise stmt.invalid("secret=", "the secret must not be empty")
        fields["secret"] = options["secret"]
    if "learn" in options:
        if not _TOKEN.fullmatch(options["learn"]):
            raise stmt.invalid(options["learn"], "a cookie name is a token")
        fields["learn"] = options["learn"]
    if "key" in options:
        key = to_single_variable(stmt, options["key"], scope.variables)
        fields["key"] = Template(compile_template(stmt, key, scope.variables))
    scope.values["persistence"] = Persistence(**fields)


def parse_server_url(stmt: Stmt, url: str):
    """Return (host, port) from 'http://host:port', 'ws://host:port' or nginx's 'host:port'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    scheme = scheme.lower()
    if scheme in ("https", "wss"):
        raise stmt.unsupported(f'"{scheme}://" upstream server')
    if scheme not in ("http", "ws"):
        raise stmt.error(f'invalid URL prefix in "{url}"')
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest:
        raise stmt.error(f'invalid URL "{url}": an upstream server has no path')
    return split_hostport(stmt, rest, 80, "upstream")


def make_server(stmt: Stmt, url: str, host: str, port: int, params) -> UpstreamServer:
    """Resolve the host now so a typo fails at load, never at the first request."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    address = resolve_host(host, port)
    if address is None:
        raise stmt.error(f'host not found in upstream "{shown}"')
    return UpstreamServer(url=f"http://{shown}", host=host, port=port, address=address,
                          **params)


def add_upstream_server(stmt, scope):
    host, port = parse_server_url(stmt, stmt.args[0])
    params = {}
    for arg in stmt.args[1:]:
        key, sep, value = arg.partition("=")
        if arg in ("backup", "down"):
            params[arg] = True
        elif sep and key == "weight":
            params["weight"] = to_int(stmt, value, minimum=1)
        elif sep and key == "max_fails":
            params["max_fails"] = to_int(stmt, value)
        elif sep and key == "fail_timeout":
            params["fail_timeout"] = to_time(stmt, value)
        elif sep and key == "max_conns":
            params["max_conns"] = to_int(stmt, value)
        else:
            raise stmt.error(f'invalid parameter "{arg}"')
    server = make_server(stmt, stmt.args[0], host, port, params)
    servers = scope.values.setdefault("servers", [])
    if any(existing.url == server.url for existing in servers):
        raise stmt.error(f'duplicate server "{server.url}" in upstream')
    servers.append(server)


def set_keepalive(stmt, scope):
    scope.values["keepalive"] = to_int(stmt, stmt.args[0])


def set_health_check(stmt, scope):
    options = split_options(stmt, stmt.args, ("interval", "uri", "fails", "passes", "timeout"),
                            '"health_check"')
    fields = {}
    for key in ("interval", "timeout"):
        if key in options:
            fields[key] = to_time(stmt, options[key], positive=True)
    for key in ("fails", "passes"):
        if key in options:
            fields[key] = to_int(stmt, options[key], minimum=1)
    if "uri" in options:
        if not options["uri"].startswith("/"):
            raise stmt.invalid(options["uri"], 'the uri must start with "/"')
        fields["uri"] = options["uri"]
    scope.values["health_check"] = HealthCheck(**fields)


# --- server -----------------------------------------------------------------------------

def add_listen(stmt, scope):
    text = stmt.args[0]
    if text.isdigit():
        host, port = "0.0.0.0", int(text)
        if not 0 < port < 65536:
            raise stmt.error(f'invalid port in "{text}" of the "listen" directive')
    else:
        if text.startswith("unix:"):
            raise stmt.unsupported('"listen unix:"')
        host, port = split_hostport(stmt, text, 80, "listen address")
    if host == "*":
        host = "0.0.0.0"
    address = resolve_host(host, port)
    if address is None:
        raise stmt.error(f'host not found in "{text}" of the "listen" directive')
    params = {}
    for arg in stmt.args[1:]:
        if arg in ("default_server", "default"):
            params["default_server"] = True
        elif arg == "ssl":
            params["ssl"] = True
        elif arg.startswith("backlog="):
            params["backlog"] = to_int(stmt, arg[len("backlog="):], minimum=1)
        else:
            check_nginx_listen_parameter(stmt, scope, arg)
    listen = Listen(host=address, port=port, file=stmt.file, line=stmt.line, **params)
    listens = scope.values.setdefault("listens", [])
    if any(existing.key == listen.key for existing in listens):
        raise stmt.error(f"duplicate listen {listen}")
    listens.append(listen)


def check_nginx_listen_parameter(stmt, scope, arg):
    """A listen parameter of nginx's: a warning when it only tunes, else an error."""
    known = nginx.listen_parameter(arg)
    if known is None:
        raise stmt.error(f'invalid parameter "{arg}"')
    ignored, name = known
    if not ignored:
        raise stmt.error(f'the "{name}" parameter of "listen" is not supported')
    why = ("mplb speaks HTTP/1.1 to clients" if name == "http2"
           else "it tunes how nginx uses the socket")
    scope.warn(stmt, f'the "{name}" parameter of "listen" is ignored: {why}')


def server_name_regex(stmt, name: str):
    """``~regex`` as nginx reads it: PCRE, case-insensitive when it holds a capital."""
    pattern = name[1:]
    if not pattern:
        raise stmt.error(f'empty regex in server name "{name}"')
    caseless = any("A" <= char <= "Z" for char in pattern)
    return to_regex(stmt, pattern, re.IGNORECASE if caseless else 0)


def add_server_name(stmt, scope):
    for name in stmt.args:
        if name.startswith("~"):
            scope.values.setdefault("name_regexes", []).append(server_name_regex(stmt, name))
            continue
        if name.count("*") > 1 or ("*" in name and not (name.startswith("*.")
                                                        or name.endswith(".*"))):
            raise stmt.error(f'invalid server name or wildcard "{name}"')
        scope.values.setdefault("server_names", []).append(name.lower())


def set_ssl_file(stmt, scope):
    path = stmt.args[0]
    if not os.path.isabs(path):
        path = os.path.join(scope.base_dir, path)
    if not os.access(path, os.R_OK) or not os.path.isfile(path):
        raise stmt.error(f'cannot load "{stmt.args[0]}" in "{stmt.name}": '
                         "file not found or not readable")
    scope.values[stmt.name] = (path, stmt)


# --- location ---------------------------------------------------------------------------

def set_proxy_pass(stmt, scope):
    """Record an upstream reference; the builder resolves it once every upstream is known."""
    url = stmt.args[0]
    scheme, sep, rest = url.partition("://")
    if not sep:
        if ":" in url or "/" in url:
            raise stmt.error(f'invalid URL prefix in "{url}"')
        scope.values["proxy_pass"] = ("upstream", url, None, stmt, None)
        return
    if scheme.lower() in ("https", "wss"):
        raise stmt.unsupported(f'"{scheme}://" in "proxy_pass"')
    if scheme.lower() not in ("http", "ws"):
        raise stmt.error(f'invalid URL prefix in "{url}"')
    if "$" in url:
        raise stmt.unsupported('variables in "proxy_pass"')
    hostport, slash, path = rest.partition("/")
    uri = slash + path if slash else None
    if uri is not None and ("?" in uri or "#" in uri):
        raise stmt.unsupported(f'a query in the URI of "proxy_pass" ("{url}")')
    if ":" not in hostport or hostport.endswith("]"):
        scope.values["proxy_pass"] = ("upstream", hostport, None, stmt, uri)
        return
    host, port = split_hostport(stmt, hostport, None, "upstream")
    scope.values["proxy_pass"] = ("address", host, port, stmt, uri)


def set_return(stmt, scope):
    first = stmt.args[0]
    if len(stmt.args) == 1 and first.startswith(("http://", "https://")):
        code, text = 302, first
    else:
        if len(stmt.args) == 1 and not first.isdigit():
            raise stmt.error(f'invalid return code "{first}"')
        code = to_int(stmt, first, minimum=100, maximum=599)
        text = unescape(stmt.args[1]) if len(stmt.args) > 1 else ""
    if code in REDIRECT_CODES and text == "":
        raise stmt.error(f'"return {code}" needs a URL')
    value = Template(compile_template(stmt, text, scope.variables)) if "$" in text else None
    scope.values["return"] = (code, text, value)


def set_status(stmt, scope):
    scope.values["status"] = True


# --- inheritable (main, server, location) -----------------------------------------------

def set_http_version(stmt, scope):
    if stmt.args[0] not in ("1.0", "1.1"):
        raise stmt.invalid(stmt.args[0], 'it must be "1.0" or "1.1"')
    scope.settings["proxy_http_version"] = stmt.args[0]


def add_header(stmt, scope):
    name, value = stmt.args
    if not _TOKEN.fullmatch(name):
        raise stmt.error(f'invalid header name "{name}"')
    template = HeaderTemplate(name=name, parts=compile_template(stmt, value, scope.variables))
    scope.settings.setdefault("proxy_set_header", []).append(template)


def timeout_setter(field_name: str, positive: bool = True):
    """Build the handler of a directive that sets one time field."""
    def set_timeout(stmt, scope):
        scope.settings[field_name] = to_time(stmt, stmt.args[0], positive=positive)
    set_timeout.__doc__ = f"Set ProxySettings.{field_name}."
    return set_timeout


def set_ws_keepalive(stmt, scope):
    scope.settings["proxy_websocket_keepalive"] = to_flag(stmt, stmt.args[0])
    options = split_options(stmt, stmt.args[1:], ("interval",), '"proxy_websocket_keepalive"')
    if "interval" in options:
        scope.settings["proxy_websocket_keepalive_interval"] = to_time(
            stmt, options["interval"], positive=True)


def set_next_upstream(stmt, scope):
    for arg in stmt.args:
        if arg not in NEXT_UPSTREAM:
            raise stmt.invalid(arg, "it must be one of " + ", ".join(NEXT_UPSTREAM))
    if "off" in stmt.args and len(stmt.args) > 1:
        raise stmt.invalid("off", "it cannot be combined with other values")
    scope.settings["proxy_next_upstream"] = frozenset(a for a in stmt.args if a != "off")


def set_next_upstream_tries(stmt, scope):
    scope.settings["proxy_next_upstream_tries"] = to_int(stmt, stmt.args[0])


def set_max_body(stmt, scope):
    scope.settings["client_max_body_size"] = to_size(stmt, stmt.args[0])


def set_keepalive_requests(stmt, scope):
    scope.settings["keepalive_requests"] = to_int(stmt, stmt.args[0], minimum=1)


def set_header_buffers(stmt, scope):
    number = to_int(stmt, stmt.args[0], minimum=1)
    size = to_size(stmt, stmt.args[1])
    if size < 16:
        raise stmt.invalid(stmt.args[1], "it must be at least 16 bytes")
    scope.settings["large_client_header_buffers"] = (number, size)


def add_access_rule(stmt, scope):
    scope.settings.setdefault("access_rules", []).append(to_access_rule(stmt, stmt.args[0]))
