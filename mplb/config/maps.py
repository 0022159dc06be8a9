"""``map $source $name { ... }`` blocks, and the variables a configuration defines.

nginx's rules: source strings are compared ignoring case; with ``hostnames``, masks
``*.example.com``, ``.example.com`` and ``mail.*``; ``~`` and ``~*`` start a regex
(case-sensitive, case-insensitive), tried in file order; ``default`` is the value when
nothing matches (empty when unset); ``\\default`` is the literal source "default".
``include`` inside a map is read by the parser like any include.  ``volatile`` is
accepted and changes nothing: a map is evaluated at most once per request and nothing
in mplb changes a variable within a request, so caching is invisible.

Every variable a configuration defines (map names, named captures of ``server_name``
regexes) is known before any directive is read, so a map may be used above its
definition, as in nginx.  A map whose value reads itself, directly or through other
maps, is refused at load.
"""
from __future__ import annotations

import re
from types import MappingProxyType

from mplb.config.model import Template, VariableMap
from mplb.config.values import Stmt, compile_template, to_regex
from mplb.vocabulary import HEADER_VARIABLE_PREFIX, VARIABLES

_NAME = re.compile(r"\$([A-Za-z0-9_]+)")
CAPTURE_DIGITS = frozenset("0123456789")
MAP_FLAGS = ("hostnames", "volatile")


def map_name(stmt: Stmt) -> str:
    """The variable a ``map`` statement defines (lower case, without ``$``)."""
    match = _NAME.fullmatch(stmt.args[1])
    if match is None:
        raise stmt.error(f'invalid variable name "{stmt.args[1]}"')
    name = match.group(1).lower()
    if name in VARIABLES or name.startswith(HEADER_VARIABLE_PREFIX) or name.isdigit():
        raise stmt.error(f'the duplicate "{name}" variable')
    return name


def defined_names(map_stmts, captures: frozenset) -> frozenset:
    """Names of every map variable, checked for duplicates against each other and the
    server_name captures."""
    names = set()
    for stmt in map_stmts:
        if len(stmt.args) != 2:
            continue                    # the registry's argument check reports it
        name = map_name(stmt)
        if name in names or name in captures:
            raise stmt.error(f'the duplicate "{name}" variable')
        names.add(name)
    return frozenset(names)


def build_maps(map_stmts, variables: frozenset) -> dict:
    """name -> VariableMap for every ``map`` block, with cycles refused."""
    maps = {}
    for stmt in map_stmts:
        vmap = build_map(stmt, variables)
        maps[vmap.name] = vmap
    check_cycles(maps)
    return maps


def build_map(stmt: Stmt, variables: frozenset) -> VariableMap:
    entries = [entry for entry in stmt.block if entry.name not in MAP_FLAGS]
    hostnames = any(entry.name == "hostnames" for entry in stmt.block)
    for entry in stmt.block:
        if entry.block is not None:
            raise entry.error('unexpected "{" in "map" block')
        if entry.name in MAP_FLAGS and entry.args:
            raise entry.error(f'invalid number of the map parameters of "{entry.name}"')
    default = Template(())
    exact, leading, trailing, regexes = {}, [], [], []
    seen_default = False
    for entry in entries:
        if len(entry.args) != 1:
            raise entry.error("invalid number of the map parameters")
        key = entry.name
        if key == "default":
            if seen_default:
                raise entry.error('duplicate default map parameter')
            seen_default = True
            default = Template(compile_template(entry, entry.args[0], variables))
            continue
        if key.startswith("\\"):
            key = key[1:]
        if key.startswith("~"):
            regexes.append(_regex_entry(entry, key, variables))
            continue
        value = Template(compile_template(entry, entry.args[0], variables))
        if hostnames and _add_mask(key.lower(), value, exact, leading, trailing):
            continue
        if key.lower() in exact:
            raise entry.error(f'duplicate source value "{key}" in "map"')
        exact[key.lower()] = value
    return VariableMap(
        name=map_name(stmt), source=Template(compile_template(stmt, stmt.args[0], variables)),
        default=default, exact=MappingProxyType(exact),
        leading=tuple(sorted(leading, key=lambda item: -len(item[0]))),
        trailing=tuple(sorted(trailing, key=lambda item: -len(item[0]))),
        regexes=tuple(regexes), file=stmt.file, line=stmt.line)


def _regex_entry(entry: Stmt, key: str, variables: frozenset) -> tuple:
    """``~regex`` / ``~*regex``: its value may read the regex's own captures."""
    caseless = key.startswith("~*")
    regex = to_regex(entry, key[2:] if caseless else key[1:], re.IGNORECASE if caseless else 0)
    known = variables | CAPTURE_DIGITS | frozenset(name.lower() for name in regex.groupindex)
    return regex, Template(compile_template(entry, entry.args[0], known))


def _add_mask(key: str, value, exact, leading, trailing) -> bool:
    """A ``hostnames`` mask into its table; False when ``key`` is a plain string."""
    if key.startswith("*."):
        leading.append((key[1:], value))
    elif key.startswith("."):
        exact.setdefault(key[1:], value)
        leading.append((key, value))
    elif key.endswith(".*"):
        trailing.append((key[:-1], value))
    else:
        return False
    return True


def check_cycles(maps: dict) -> None:
    """Refuse a map that reads itself, directly or through other maps."""
    state = {}                            # name -> "open" while on the path, "done"

    def visit(name, path):
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name):] + [name]
            vmap = maps[cycle[0]]
            raise Stmt("map", [], vmap.file, vmap.line).error(
                "cycle in map variables: " + " -> ".join(f"${n}" for n in cycle))
        state[name] = "open"
        for used in sorted(maps[name].references & maps.keys()):
            visit(used, path + [name])
        state[name] = "done"

    for name in maps:
        visit(name, [])
