"""Tree -> typed, immutable Config.

crossplane reads the text (including ``include`` files); this module checks every
statement against the registry, runs its handler, applies nginx inheritance once so workers
only read effective settings, resolves references (``proxy_pass`` to upstreams) and checks
what spans blocks (duplicate listens, ssl certificates).
"""
from __future__ import annotations

import dataclasses
import os
import re
import ssl
from types import MappingProxyType

import crossplane

from mplb import privileges
from mplb.config import nginx, registry
from mplb.config.handlers import Scope, make_server, server_name_regex
from mplb.config.maps import build_maps, defined_names
from mplb.config.model import (
    Config, ErrorLog, Listen, Location, Persistence, ProxySettings, Upstream, VirtualServer,
    ConfigWarning, WorkerUser,
)
from mplb.config.registry import EVENTS, LOCATION, MAIN, SERVER, UPSTREAM
from mplb.config.values import Stmt, to_regex
from mplb.errors import ConfigError

MODIFIERS = ("=", "^~", "~*", "~")   # '~*' before '~' for the glued form '~*\.php$'
MIME_TYPES_IGNORED = "mime.types is ignored"     # marks a missing include mime.types


def parse_tree(path: str) -> list:
    """Run crossplane and return the main file's statements with includes inlined."""
    payload = crossplane.parse(path, check_ctx=False, check_args=False, comments=False,
                               single=False, onerror=_crossplane_message)
    # include mime.types is never read: its absence or content is not an error here.
    errors = [error for error in payload["errors"]
              if error.get("callback") != MIME_TYPES_IGNORED
              and not nginx.is_mime_types(error["file"])]
    if errors:
        first = errors[0]
        raise ConfigError(first.get("callback") or first["error"], first["file"],
                          first.get("line"))
    configs = payload["config"]
    return _to_stmts(configs, configs[0]["parsed"], configs[0]["file"], (0,))


def _crossplane_message(exc: Exception) -> str:
    """nginx-like text for crossplane's exceptions (which append ' in FILE:LINE')."""
    if isinstance(exc, OSError) and exc.filename:
        if nginx.is_mime_types(exc.filename):
            return MIME_TYPES_IGNORED          # a warning at the include, not an error
        return f'open() "{exc.filename}" failed ({exc.errno}: {exc.strerror})'
    if isinstance(exc, IndexError):
        return 'invalid number of arguments in "include" directive'
    return getattr(exc, "strerror", None) or str(exc)


def _to_stmts(configs, parsed, file, stack) -> list:
    stmts = []
    for raw in parsed:
        if raw["directive"] == "include" and raw["args"] and nginx.is_mime_types(raw["args"][0]):
            # MIME types mean nothing here: one warning at the include, its content unread.
            stmts.append(Stmt("include", list(raw["args"]), file, raw["line"]))
            continue
        if raw["directive"] == "include" and "includes" in raw:
            for index in raw["includes"]:
                if index in stack:
                    raise ConfigError(f'include cycle through "{configs[index]["file"]}"',
                                      file, raw["line"])
                config = configs[index]
                stmts.extend(_to_stmts(configs, config["parsed"], config["file"],
                                       stack + (index,)))
            continue
        block = raw.get("block")
        if block is not None:
            block = _to_stmts(configs, block, file, stack)
        stmts.append(Stmt(raw["directive"], list(raw["args"]), file, raw["line"], block))
    return stmts


def check_stmt(stmt: Stmt, context: str, seen: set, scope: Scope):
    """Apply the registry's generic rules; return the entry that governs this statement,
    or None for an nginx directive that is ignored (with a warning on ``scope``)."""
    if stmt.name == "include":           # only "include mime.types" is left as a statement
        scope.warn(stmt, f'"include {stmt.args[0]}" is ignored: MIME types apply to files '
                         "nginx serves; mplb serves no files")
        return None
    entry = registry.lookup(stmt.name, context)
    if entry is None:
        return check_nginx_directive(stmt, context, scope)
    if not entry.supported:
        raise stmt.error(f'"{stmt.name}" directive is not supported yet')
    if entry.block and stmt.block is None:
        raise stmt.error(f'directive "{stmt.name}" has no opening "{{"')
    if not entry.block and stmt.block is not None:
        raise stmt.error(f'directive "{stmt.name}" is not terminated by ";"')
    if not entry.count_ok(len(stmt.args)):
        raise stmt.error(f'invalid number of arguments in "{stmt.name}" directive')
    if not entry.repeatable:
        if stmt.name in seen:
            raise stmt.error(f'"{stmt.name}" directive is duplicate')
        seen.add(stmt.name)
    return entry


def check_nginx_directive(stmt: Stmt, context: str, scope: Scope) -> None:
    """A directive the registry does not allow here: an nginx one mplb ignores (warning)
    or refuses (error), else unknown or misplaced."""
    foreign = nginx.lookup(stmt.name, context)
    if foreign is None:
        if registry.is_known(stmt.name) or nginx.is_known(stmt.name):
            raise stmt.error(f'"{stmt.name}" directive is not allowed here')
        raise stmt.error(f'unknown directive "{stmt.name}"')
    ignored, why = foreign.decide(stmt.args)
    if not ignored:
        raise stmt.error(f'"{stmt.name}" directive is not supported: {why}')
    scope.warn(stmt, f'"{stmt.name}" is ignored: {why}')
    return None


def apply_block(stmts, context: str, scope: Scope, seen=None) -> list:
    """Check and handle the leaf directives of one block; return its child blocks."""
    seen = set() if seen is None else seen
    blocks = []
    for stmt in stmts:
        entry = check_stmt(stmt, context, seen, scope)
        if entry is None:
            continue
        if entry.block:
            blocks.append(stmt)
        else:
            entry.handler(stmt, scope)
    return blocks


def flatten_main(stmts, seen: set, scope: Scope, inside_http: bool = False) -> list:
    """Unwrap ``http { }`` and ``events { }`` into (statement, context) pairs at main level."""
    flat = []
    for stmt in stmts:
        if stmt.name in ("http", "events"):
            if inside_http:
                raise stmt.error(f'"{stmt.name}" directive is not allowed here')
            check_stmt(stmt, MAIN, seen, scope)
            if stmt.name == "http":
                flat.extend(flatten_main(stmt.block, seen, scope, inside_http=True))
            else:
                flat.extend((child, EVENTS) for child in stmt.block)
        else:
            flat.append((stmt, MAIN))
    return flat


def effective(outer: dict, inner: dict) -> dict:
    """nginx inheritance: a level's own value wins; arrays (headers, rules) go as a whole."""
    merged = dict(outer)
    merged.update(inner)
    return merged


def freeze_settings(values: dict) -> ProxySettings:
    return ProxySettings(**{key: tuple(value) if isinstance(value, list) else value
                            for key, value in values.items()})


def build_config(path: str) -> Config:
    tree = parse_tree(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    main = Scope(MAIN, base_dir)
    seen = set()
    flat = flatten_main(tree, seen, main)
    # Every variable the file defines is known before any directive reads one.
    captures = capture_names(stmt for stmt, context in flat if stmt.name == "server")
    map_stmts = [stmt for stmt, context in flat if stmt.name == "map" and context == MAIN]
    main.variables = defined_names(map_stmts, captures) | captures
    blocks = []
    for stmt, context in flat:
        entry = check_stmt(stmt, context, seen, main)
        if entry is None:
            continue
        if entry.block:
            blocks.append(stmt)
        else:
            entry.handler(stmt, main)
    maps = build_maps([stmt for stmt in blocks if stmt.name == "map"], main.variables)
    upstream_stmts = [stmt for stmt in blocks if stmt.name == "upstream"]
    server_stmts = [stmt for stmt in blocks if stmt.name == "server"]
    upstreams = build_upstreams(upstream_stmts, main)
    implicit = {}
    servers = tuple(build_server(stmt, main, upstreams, implicit) for stmt in server_stmts)
    check_listens(servers)
    upstreams.update(implicit)
    values = main.values
    store = values.get("shared_store")
    if store is not None:
        upstreams = {name: dataclasses.replace(upstream, cluster_key=store.key)
                     for name, upstream in upstreams.items()}
    log_path, log_level = values.get("error_log", (None, "info"))
    user, user_warnings = build_user(values.get("user"), path)
    return Config(
        path=path,
        worker_processes=values.get("worker_processes", os.cpu_count() or 1),
        worker_connections=values.get("worker_connections", 10000),
        worker_shutdown_timeout=values.get("worker_shutdown_timeout"),
        pid=values.get("pid"),
        error_log=ErrorLog(path=log_path, level=log_level),
        access_log=values.get("access_log"),
        user=user,
        shared_store=store,
        upstreams=MappingProxyType(upstreams),
        servers=servers,
        maps=MappingProxyType(maps),
        capture_names=captures,
        warnings=tuple(main.warnings) + user_warnings,
    )


def capture_names(server_stmts) -> frozenset:
    """Named captures of every ``server_name ~regex``: variables, as in nginx."""
    names = set()
    for server in server_stmts:
        for stmt in server.block or ():
            if stmt.name == "server_name":
                for name in stmt.args:
                    if name.startswith("~"):
                        names.update(key.lower() for key in
                                     server_name_regex(stmt, name).groupindex)
    return frozenset(names)


def build_upstreams(stmts, main: Scope) -> dict:
    upstreams = {}
    for stmt in stmts:
        name = stmt.args[0]
        if name in upstreams:
            raise stmt.error(f'duplicate upstream "{name}"')
        scope = main.child(UPSTREAM)
        apply_block(stmt.block, UPSTREAM, scope)
        values = scope.values
        if not values.get("servers"):
            raise stmt.error(f'no servers are inside upstream "{name}"')
        upstreams[name] = Upstream(
            name=name,
            method=values.get("method", "weighted_round_robin"),
            persistence=values.get("persistence", Persistence()),
            servers=tuple(values["servers"]),
            keepalive=values.get("keepalive", 32),
            health_check=values.get("health_check"),
            file=stmt.file, line=stmt.line,
        )
    return upstreams


def build_server(stmt: Stmt, main: Scope, upstreams: dict, implicit: dict) -> VirtualServer:
    scope = main.child(SERVER)
    location_stmts = apply_block(stmt.block, SERVER, scope)
    settings = effective(main.settings, scope.settings)
    listens = scope.values.get("listens") or [Listen("0.0.0.0", 80, file=stmt.file,
                                                     line=stmt.line)]
    cert, key, context = load_certificates(stmt, scope, listens)
    locations = []
    seen_patterns = {}
    for location_stmt in location_stmts:
        location = build_location(location_stmt, settings, scope, upstreams, implicit)
        if location.modifier not in ("~", "~*"):
            kind = "=" if location.modifier == "=" else "prefix"
            if (kind, location.pattern) in seen_patterns:
                raise location_stmt.error(f'duplicate location "{location.pattern}"')
            seen_patterns[(kind, location.pattern)] = location
        locations.append(location)
    answer = None
    if "return" in scope.values:
        # nginx runs a server-level return before choosing a location.
        code, text, value = scope.values["return"]
        answer = Location(modifier="", pattern="", settings=freeze_settings(settings),
                          return_code=code, return_text=text, return_value=value,
                          file=stmt.file, line=stmt.line)
    return VirtualServer(
        answer=answer,
        listens=tuple(listens),
        server_names=tuple(scope.values.get("server_names", ())),
        name_regexes=tuple(scope.values.get("name_regexes", ())),
        locations=tuple(locations),
        settings=freeze_settings(settings),
        ssl_certificate=cert, ssl_certificate_key=key, ssl_context=context,
        file=stmt.file, line=stmt.line,
    )


def load_certificates(stmt: Stmt, scope: Scope, listens):
    """``(certificate, key, server SSL context)`` of a server block.

    ``listen ... ssl`` without a loadable certificate fails here, at -t, not at boot.
    The key is read now, by the master, while it may still be root: workers inherit the
    loaded context and never open the key file (they may run as a user that cannot).
    """
    cert = scope.values.get("ssl_certificate")
    key = scope.values.get("ssl_certificate_key")
    ssl_listen = next((listen for listen in listens if listen.ssl), None)
    if ssl_listen is None:
        return (cert[0] if cert else None), (key[0] if key else None), None
    if cert is None:
        raise ConfigError('no "ssl_certificate" is defined for the listen ... ssl directive',
                          ssl_listen.file, ssl_listen.line)
    if key is None:
        raise cert[1].error(f'no "ssl_certificate_key" is defined for certificate '
                            f'"{cert[1].args[0]}"')
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert[0], key[0])
    except (ssl.SSLError, OSError) as exc:
        raise cert[1].error(f'cannot load certificate "{cert[1].args[0]}" with key '
                            f'"{key[1].args[0]}": {exc}') from None
    context.set_alpn_protocols(["http/1.1"])
    return cert[0], key[0], context


def build_user(stmt, path: str):
    """``(WorkerUser or None, warnings)``: who the workers run as.

    Only a root master can switch users: otherwise ``user`` is ignored with a warning,
    as nginx does.  A root master without the directive uses ``nobody`` and its group.
    """
    if not privileges.running_as_root():
        if stmt is None:
            return None, ()
        return None, (ConfigWarning('the "user" directive makes sense only if the master '
                                    'process runs as root; ignored', stmt.file, stmt.line),)
    name = stmt.args[0] if stmt is not None else privileges.DEFAULT_USER
    group = stmt.args[1] if stmt is not None and len(stmt.args) > 1 else None
    try:
        uid, gid, group = privileges.lookup(name, group)
    except LookupError as exc:
        if stmt is None:
            raise ConfigError(f'{exc}: the workers of a root master run as "{name}" unless '
                              f'the "user" directive names another user', path) from None
        raise stmt.error(str(exc)) from None
    where = (stmt.file, stmt.line) if stmt is not None else (path, 0)
    return WorkerUser(name, group, uid, gid, *where), ()


def parse_location_args(stmt: Stmt):
    """Return (modifier, pattern) from 'location [mod] pattern', glued forms included."""
    if len(stmt.args) == 2:
        modifier, pattern = stmt.args
        if modifier not in MODIFIERS:
            raise stmt.error(f'invalid location modifier "{modifier}"')
    else:
        text = stmt.args[0]
        if text.startswith("@"):
            raise stmt.unsupported("a named location")
        modifier = next((mod for mod in MODIFIERS if text.startswith(mod)), "")
        pattern = text[len(modifier):]
    if not pattern:
        raise stmt.error('invalid number of arguments in "location" directive')
    return modifier, pattern


def build_location(stmt: Stmt, server_settings: dict, server: Scope, upstreams: dict,
                   implicit: dict) -> Location:
    modifier, pattern = parse_location_args(stmt)
    regex = None
    if modifier in ("~", "~*"):
        regex = to_regex(stmt, pattern, re.IGNORECASE if modifier == "~*" else 0)
    scope = server.child(LOCATION)
    nested = apply_block(stmt.block, LOCATION, scope)
    if nested:
        raise nested[0].unsupported('a "location" inside a location')
    values = scope.values
    actions = [name for name in ("proxy_pass", "return", "status") if name in values]
    if len(actions) > 1:
        raise stmt.error('only one of "proxy_pass", "return" and "mplb_status" may be used '
                         "in a location")
    upstream = proxy_uri = None
    if "proxy_pass" in values:
        upstream = resolve_proxy_pass(values["proxy_pass"], upstreams, implicit)
        proxy_uri = values["proxy_pass"][4]
        if proxy_uri is not None and regex is not None:
            raise values["proxy_pass"][3].error(
                '"proxy_pass" cannot have URI part in location given by regular expression')
    code, text, value = values.get("return", (None, "", None))
    return Location(
        modifier=modifier, pattern=pattern,
        settings=freeze_settings(effective(server_settings, scope.settings)),
        regex=regex, upstream=upstream, proxy_uri=proxy_uri, return_code=code,
        return_text=text, return_value=value,
        status=values.get("status", False), file=stmt.file, line=stmt.line,
    )


def resolve_proxy_pass(target, upstreams: dict, implicit: dict) -> str:
    """Name the upstream a location proxies to, making an implicit one for host:port."""
    kind, host, port, stmt, _ = target
    if kind == "upstream":
        if host not in upstreams:
            raise stmt.error(f'unknown upstream "{host}" in "proxy_pass"')
        return host
    name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if name in upstreams:
        return name
    if name not in implicit:
        server = make_server(stmt, stmt.args[0], host, port, {})
        implicit[name] = Upstream(name=name, servers=(server,), implicit=True,
                                  file=stmt.file, line=stmt.line)
    return name


def check_listens(servers) -> None:
    """Cross-block listen rules: one default server per socket, ssl agreed per socket."""
    defaults = {}
    first = {}
    for vserver in servers:
        for listen in vserver.listens:
            if listen.default_server:
                if listen.key in defaults:
                    raise ConfigError(f"a duplicate default server for {listen}",
                                      listen.file, listen.line)
                defaults[listen.key] = listen
            earlier = first.setdefault(listen.key, listen)
            if earlier.ssl != listen.ssl:
                raise ConfigError(
                    f'listen {listen} is "ssl" in one server and plain in another '
                    f"(see {earlier.file}:{earlier.line})", listen.file, listen.line)
