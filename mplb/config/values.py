"""Argument parsers shared by the directive handlers.

Each takes the statement it is parsing so every error carries the file and line where the
operator must look; the wording follows nginx so its users recognise the messages.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Optional

from mplb.config.model import AccessRule
from mplb.config.units import parse_size, parse_time
from mplb.errors import ConfigError
from mplb.vocabulary import HEADER_VARIABLE_PREFIX, VARIABLES
# ``$name``, ``${name}``, or ``$1``: a digit is a whole (capture) variable, as in nginx.
_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]*)\}|([0-9]|[A-Za-z_][A-Za-z0-9_]*|))")


@dataclass
class Stmt:
    """One directive from crossplane's tree, with where it was written."""

    name: str
    args: list
    file: str
    line: int
    block: Optional[list] = None        # child Stmts when written with { }

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.file, self.line)

    def invalid(self, value: str, why: str = "") -> ConfigError:
        suffix = f", {why}" if why else ""
        return self.error(f'invalid value "{value}" in "{self.name}" directive{suffix}')

    def unsupported(self, what: str) -> ConfigError:
        return self.error(f"{what} is not supported yet")


def to_int(stmt: Stmt, value: str, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """Parse a decimal integer within bounds."""
    if not re.fullmatch(r"\d+", value):
        raise stmt.invalid(value)
    number = int(value)
    if number < minimum:
        raise stmt.invalid(value, f"it must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise stmt.invalid(value, f"it must be at most {maximum}")
    return number


def to_time(stmt: Stmt, value: str, positive: bool = False) -> float:
    """Parse a time with units; ``positive`` refuses zero where zero would hang or spin."""
    try:
        seconds = parse_time(value)
    except ValueError:
        raise stmt.invalid(value) from None
    if positive and seconds <= 0:
        raise stmt.invalid(value, "it must be greater than 0")
    return seconds


def to_size(stmt: Stmt, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise stmt.invalid(value) from None


def to_flag(stmt: Stmt, value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("on", "off"):
        raise stmt.invalid(value, 'it must be "on" or "off"')
    return lowered == "on"


def split_options(stmt: Stmt, args, allowed, what: str) -> dict:
    """Split ``key=value`` options, refusing keys not in ``allowed`` (a list of names)."""
    options = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            expected = ", ".join(allowed) if allowed else "none"
            raise stmt.error(f'unknown option "{key if sep else arg}" for {what} '
                             f"(expected one of {expected})")
        if key in options:
            raise stmt.error(f'duplicate option "{key}" in "{stmt.name}" directive')
        options[key] = value
    return options


def check_variable(stmt: Stmt, name: str, known=frozenset()) -> str:
    """Return the lower-cased variable name, or raise nginx's 'unknown variable' error.

    ``known``: names the configuration itself defines (map variables, regex captures).
    """
    lowered = name.lower()
    if lowered in VARIABLES or lowered in known:
        return lowered
    if lowered.startswith(HEADER_VARIABLE_PREFIX) and len(lowered) > len(HEADER_VARIABLE_PREFIX):
        return lowered
    if not name:
        raise stmt.error(f'invalid variable name in "{stmt.name}" directive')
    raise stmt.error(f'unknown "{name}" variable')


def compile_template(stmt: Stmt, value: str, known=frozenset()) -> tuple:
    """Split a value into ``(is_variable, text)`` parts so workers never re-parse it."""
    parts = []
    pos = 0
    for match in _VAR.finditer(value):
        if match.start() > pos:
            parts.append((False, value[pos:match.start()]))
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if match.group(0).startswith("${") and not match.group(0).endswith("}"):
            raise stmt.error(f'the closing bracket in "{name}" variable is missing')
        parts.append((True, check_variable(stmt, name, known)))
        pos = match.end()
    if pos < len(value):
        parts.append((False, value[pos:]))
    merged = []
    for part in parts:   # adjacent literals become one, so static values are one part
        if merged and not part[0] and not merged[-1][0]:
            merged[-1] = (False, merged[-1][1] + part[1])
        else:
            merged.append(part)
    return tuple(merged)


_ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\t": "\t", "\\r": "\r"}
_ESCAPE = re.compile(r"\\[\\ntr]")


def unescape(value: str) -> str:
    """nginx's escapes in a token (crossplane already undid ``\\"`` and ``\\'``)."""
    return _ESCAPE.sub(lambda match: _ESCAPES[match.group(0)], value) if "\\" in value \
        else value


# PCRE spellings of a named group that Python writes (?P<name>...); lookbehinds
# ``(?<=`` and ``(?<!`` are left alone.
_PCRE_NAMED = re.compile(r"(?<!\\)\(\?(?:<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)')")
_PCRE_BACKREF = re.compile(r"\\k(?:<([A-Za-z_]\w*)>|'([A-Za-z_]\w*)'|\{([A-Za-z_]\w*)\})")


def to_regex(stmt: Stmt, pattern: str, flags: int = 0) -> re.Pattern:
    """Compile an nginx (PCRE) regular expression, or fail with the file and line."""
    converted = _PCRE_NAMED.sub(lambda m: f"(?P<{m.group(1) or m.group(2)}>", pattern)
    converted = _PCRE_BACKREF.sub(lambda m: f"(?P={m.group(1) or m.group(2) or m.group(3)})",
                                  converted)
    try:
        return re.compile(converted, flags)
    except re.error as exc:
        raise stmt.error(f'invalid regular expression "{pattern}": {exc}') from None


def to_single_variable(stmt: Stmt, value: str, known=frozenset()) -> str:
    """Parse ``$var`` or ``${var}`` (one variable, nothing else) into ``$name``."""
    parts = compile_template(stmt, value, known) if value else ()
    if len(parts) != 1 or not parts[0][0]:
        raise stmt.invalid(value, "it must be one variable such as $uri")
    return "$" + parts[0][1]


def to_access_rule(stmt: Stmt, value: str) -> AccessRule:
    allow = stmt.name == "allow"
    if value == "all":
        return AccessRule(allow=allow, network=None)
    if value.startswith("unix:"):
        raise stmt.unsupported('"unix:" in "allow" and "deny"')
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise stmt.error(f'invalid parameter "{value}"') from None
    return AccessRule(allow=allow, network=network)


def split_hostport(stmt: Stmt, text: str, default_port: Optional[int], what: str):
    """Split 'host:port', '[v6]:port' or 'host' into (host, port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise stmt.error(f'invalid {what} "{text}"')
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        host, port_text = text, None    # bare IPv6 address
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise stmt.error(f'no port in {what} "{text}"')
        port = default_port
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise stmt.error(f'invalid port in {what} "{text}"')
    if not host:
        raise stmt.error(f'no host in {what} "{text}"')
    return host, port


def resolve_host(host: str, port: int) -> Optional[str]:
    """Return one IP address for ``host`` (IPv4 preferred, as most backends listen there)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return infos[0][4][0] if infos else None
