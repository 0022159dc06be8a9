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
from mplb.config import registry
from mplb.config.handlers import Scope, make_server
from mplb.config.model import (
    Config, ErrorLog, Listen, Location, Persistence, ProxySettings, Upstream, VirtualServer,
    WorkerUser,
)
from mplb.config.registry import EVENTS, LOCATION, MAIN, SERVER, UPSTREAM
from mplb.config.values import Stmt
from mplb.errors import ConfigError

MODIFIERS = ("=", "^~", "~*", "~")   # '~*' before '~' for the glued form '~*\.php$'


def parse_tree(path: str) -> list:
    """Run crossplane and return the main file's statements with includes inlined."""
    payload = crossplane.parse(path, check_ctx=False, check_args=False, comments=False,
                               single=False, onerror=_crossplane_message)
    if payload["errors"]:
        first = payload["errors"][0]
        raise ConfigError(first.get("callback") or first["error"], first["file"],
                          first.get("line"))
    configs = payload["config"]
    return _to_stmts(configs, configs[0]["parsed"], configs[0]["file"], (0,))


def _crossplane_message(exc: Exception) -> str:
    """nginx-like text for crossplane's exceptions (which append ' in FILE:LINE')."""
    if isinstance(exc, OSError) and exc.filename:
        return f'open() "{exc.filename}" failed ({exc.errno}: {exc.strerror})'
    if isinstance(exc, IndexError):
        return 'invalid number of arguments in "include" directive'
    return getattr(exc, "strerror", None) or str(exc)


def _to_stmts(configs, parsed, file, stack) -> list:
    stmts = []
    for raw in parsed:
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


def check_stmt(stmt: Stmt, context: str, seen: set) -> registry.Directive:
    """Apply the registry's generic rules; return the entry that governs this statement."""
    if not registry.is_known(stmt.name):
        raise stmt.error(f'unknown directive "{stmt.name}"')
    entry = registry.lookup(stmt.name, context)
    if entry is None:
        raise stmt.error(f'"{stmt.name}" directive is not allowed here')
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


def apply_block(stmts, context: str, scope: Scope, seen=None) -> list:
    """Check and handle the leaf directives of one block; return its child blocks."""
    seen = set() if seen is None else seen
    blocks = []
    for stmt in stmts:
        entry = check_stmt(stmt, context, seen)
        if entry.block:
            blocks.append(stmt)
        else:
            entry.handler(stmt, scope)
    return blocks


def flatten_main(stmts, seen: set, inside_http: bool = False) -> list:
    """Unwrap ``http { }`` and ``events { }`` into (statement, context) pairs at main level."""
    flat = []
    for stmt in stmts:
        if stmt.name in ("http", "events"):
            if inside_http:
                raise stmt.error(f'"{stmt.name}" directive is not allowed here')
            check_stmt(stmt, MAIN, seen)
            if stmt.name == "http":
                flat.extend(flatten_main(stmt.block, seen, inside_http=True))
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
    blocks = []
    for stmt, context in flatten_main(tree, seen):
        entry = check_stmt(stmt, context, seen)
        if entry.block:
            blocks.append(stmt)
        else:
            entry.handler(stmt, main)
    upstream_stmts = [stmt for stmt in blocks if stmt.name == "upstream"]
    server_stmts = [stmt for stmt in blocks if stmt.name == "server"]
    upstreams = build_upstreams(upstream_stmts, base_dir)
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
    user, warnings = build_user(values.get("user"), path)
    return Config(
        path=path,
        worker_processes=values.get("worker_processes", os.cpu_count() or 1),
        worker_connections=values.get("worker_connections", 10000),
        worker_shutdown_timeout=values.get("worker_shutdown_timeout"),
        pid=values.get("pid"),
        error_log=ErrorLog(path=log_path, level=log_level),
        access_log=values.get("access_log"),
        user=user,
        warnings=warnings,
        shared_store=store,
        upstreams=MappingProxyType(upstreams),
        servers=servers,
    )


def build_upstreams(stmts, base_dir: str) -> dict:
    upstreams = {}
    for stmt in stmts:
        name = stmt.args[0]
        if name in upstreams:
            raise stmt.error(f'duplicate upstream "{name}"')
        scope = Scope(UPSTREAM, base_dir)
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
    scope = Scope(SERVER, main.base_dir)
    location_stmts = apply_block(stmt.block, SERVER, scope)
    settings = effective(main.settings, scope.settings)
    listens = scope.values.get("listens") or [Listen("0.0.0.0", 80, file=stmt.file,
                                                     line=stmt.line)]
    cert, key, context = load_certificates(stmt, scope, listens)
    locations = []
    seen_patterns = {}
    for location_stmt in location_stmts:
        location = build_location(location_stmt, settings, main.base_dir, upstreams, implicit)
        if location.modifier not in ("~", "~*"):
            kind = "=" if location.modifier == "=" else "prefix"
            if (kind, location.pattern) in seen_patterns:
                raise location_stmt.error(f'duplicate location "{location.pattern}"')
            seen_patterns[(kind, location.pattern)] = location
        locations.append(location)
    return VirtualServer(
        listens=tuple(listens),
        server_names=tuple(scope.values.get("server_names", ())),
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
        return None, (f'{stmt.file}:{stmt.line}: the "user" directive makes sense only if '
                      f"the master process runs as root; ignored",)
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


def build_location(stmt: Stmt, server_settings: dict, base_dir: str, upstreams: dict,
                   implicit: dict) -> Location:
    modifier, pattern = parse_location_args(stmt)
    regex = None
    if modifier in ("~", "~*"):
        try:
            regex = re.compile(pattern, re.IGNORECASE if modifier == "~*" else 0)
        except re.error as exc:
            raise stmt.error(f'invalid regular expression "{pattern}": {exc}') from None
    scope = Scope(LOCATION, base_dir)
    nested = apply_block(stmt.block, LOCATION, scope)
    if nested:
        raise nested[0].unsupported('a "location" inside a location')
    values = scope.values
    actions = [name for name in ("proxy_pass", "return", "status") if name in values]
    if len(actions) > 1:
        raise stmt.error('only one of "proxy_pass", "return" and "mplb_status" may be used '
                         "in a location")
    upstream = None
    if "proxy_pass" in values:
        upstream = resolve_proxy_pass(values["proxy_pass"], upstreams, implicit)
    code, text = values.get("return", (None, ""))
    return Location(
        modifier=modifier, pattern=pattern,
        settings=freeze_settings(effective(server_settings, scope.settings)),
        regex=regex, upstream=upstream, return_code=code, return_text=text,
        status=values.get("status", False), file=stmt.file, line=stmt.line,
    )


def resolve_proxy_pass(target, upstreams: dict, implicit: dict) -> str:
    """Name the upstream a location proxies to, making an implicit one for host:port."""
    kind, host, port, stmt = target
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
