"""Typed, immutable configuration objects.

The builder (``mplb.config.build``) turns crossplane's tree into these objects once,
at load time; workers only read them.  Everything a request needs that can be computed
at configuration time (compiled regexes, header templates, resolved addresses) lives
here so the hot path does no parsing.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Optional

from mplb.vocabulary import (DEFAULT_COOKIE_NAME, DEFAULT_HASH_KEY, DEFAULT_METHOD,
                             DEFAULT_TABLE_SIZE)


@dataclass(frozen=True)
class Listen:
    """One ``listen`` directive: where a virtual server accepts connections."""

    host: str                 # '0.0.0.0', '127.0.0.1', '::' ...
    port: int
    default_server: bool = False
    ssl: bool = False
    backlog: int = 511
    file: str = ""
    line: int = 0

    @property
    def key(self) -> tuple:
        """The socket identity: every server block with this key shares one socket."""
        return (self.host, self.port)

    @property
    def family_is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.family_is_ipv6 else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class UpstreamServer:
    """One ``server`` line of an upstream block."""

    url: str                  # normalised identity, 'http://host:port'
    host: str                 # as written (name or address)
    port: int
    address: str              # resolved IP address used to connect
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    max_conns: int = 0        # 0 = unlimited
    backup: bool = False
    down: bool = False

    @cached_property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Template:
    """A value with variables, split at load time into ``(is_variable, text)`` parts so
    workers never parse it; ``((True, "uri"),)`` is ``$uri``."""

    parts: tuple

    @property
    def source(self) -> str:
        """The value as an operator would write it."""
        return "".join(f"${text}" if is_variable else text for is_variable, text in self.parts)


def match_wildcards(name: str, leading, trailing):
    """nginx's wildcard names: the value of the longest ``*.suffix`` mask matching
    ``name``, else of the longest ``prefix.*`` one, else None.  ``leading`` holds
    ``(".suffix", value)``, ``trailing`` ``("prefix.", value)``, both longest first."""
    for suffix, value in leading:
        if name.endswith(suffix) and len(name) > len(suffix):
            return value
    for prefix, value in trailing:
        if name.startswith(prefix) and len(name) > len(prefix):
            return value
    return None


def first_match(regexes, text: str) -> tuple:
    """``(value, match)`` of the first ``(regex, value)`` whose regex finds ``text``
    (nginx tries regexes in file order), else ``(None, None)``."""
    for regex, value in regexes:
        match = regex.search(text)
        if match is not None:
            return value, match
    return None, None


@dataclass(frozen=True)
class VariableMap:
    """``map $source $name { ... }``: a variable whose value depends on another's.

    Chosen in nginx's order: an exact string (compared ignoring case), with
    ``hostnames`` the longest ``*.suffix`` then the longest ``prefix.*`` mask, then the
    first matching regex in file order, else ``default``.  Values are Templates; a
    regex entry's value may use that regex's captures (``$1``, ``$name``).
    """

    name: str
    source: Template
    default: Template
    exact: Mapping[str, Template]           # lower-cased source value -> value
    leading: tuple = ()                     # ((".example.com", value), ...) longest first
    trailing: tuple = ()                    # (("mail.", value), ...) longest first
    regexes: tuple = ()                     # ((compiled regex, value), ...) in file order
    file: str = ""
    line: int = 0

    def select(self, source: str):
        """``(value template, regex match or None)`` for a source value."""
        key = source.lower()
        value = self.exact.get(key)
        if value is None and (self.leading or self.trailing):
            value = match_wildcards(key, self.leading, self.trailing)
        if value is not None:
            return value, None
        value, match = first_match(self.regexes, source)
        return (value, match) if match is not None else (self.default, None)

    @property
    def references(self) -> frozenset:
        """Names of the variables its source and values read (cycle checks)."""
        templates = [self.source, self.default, *self.exact.values()]
        templates += [value for _, value in self.leading + self.trailing + self.regexes]
        return frozenset(text for template in templates
                         for is_variable, text in template.parts if is_variable)


@dataclass(frozen=True)
class Persistence:
    kind: str = "none"                  # a name of vocabulary.PERSISTENCE_MODES
    ttl: float = 0.0                    # seconds; the mode's default filled by the handler
    table_size: int = DEFAULT_TABLE_SIZE
    cookie_name: str = DEFAULT_COOKIE_NAME
    secret: str = ""                    # empty: a random per-master secret
    learn: Optional[str] = None         # cookie mode: learn this backend cookie
    key: Template = Template(((True, DEFAULT_HASH_KEY.lstrip("$")),))  # consistent_hash


@dataclass(frozen=True)
class HealthCheck:
    interval: float = 5.0
    uri: str = "/"
    fails: int = 1
    passes: int = 1
    timeout: float = 1.0


@dataclass(frozen=True)
class Upstream:
    name: str
    method: str = DEFAULT_METHOD            # a name of vocabulary.METHODS
    persistence: Persistence = field(default_factory=Persistence)
    servers: tuple = ()                     # tuple[UpstreamServer, ...]
    keepalive: int = 32
    health_check: Optional[HealthCheck] = None
    implicit: bool = False                  # made from 'proxy_pass http://host:port'
    cluster_key: bytes = b""                # shared_store's key; empty: this instance alone
    file: str = ""
    line: int = 0

    @property
    def shared(self) -> bool:
        """Whether several instances share this upstream's tables, counts and health."""
        return bool(self.cluster_key)


@dataclass(frozen=True)
class HeaderTemplate:
    """A header value compiled at load time: literal text and variable names.

    ``parts`` alternates as a tuple of ``(is_variable, text)``; the worker turns variable
    names into values per request.  A template with no variables is ``static``.
    """

    name: str                 # header name as written
    parts: tuple              # ((False, 'upgrade'),) or ((True, 'http_upgrade'),)

    @property
    def static(self) -> bool:
        return all(not is_var for is_var, _ in self.parts)

    @property
    def literal(self) -> str:
        return "".join(text for _, text in self.parts)


@dataclass(frozen=True)
class AccessRule:
    allow: bool
    network: Optional[ipaddress._BaseNetwork]   # None means 'all'

    def matches(self, ip: ipaddress._BaseAddress) -> bool:
        if self.network is None:
            return True
        return ip.version == self.network.version and ip in self.network


@dataclass(frozen=True)
class ProxySettings:
    """Directives inherited inward main -> server -> location (nginx rules)."""

    proxy_http_version: str = "1.1"
    proxy_set_header: tuple = ()            # tuple[HeaderTemplate, ...]
    proxy_connect_timeout: float = 5.0
    proxy_read_timeout: float = 60.0
    proxy_send_timeout: float = 60.0
    proxy_websocket_keepalive: bool = False
    proxy_websocket_keepalive_interval: float = 30.0
    proxy_next_upstream: frozenset = frozenset({"error", "timeout"})
    proxy_next_upstream_tries: int = 0      # 0 = unlimited (nginx)
    client_max_body_size: int = 1024 * 1024  # 0 = unlimited
    client_header_timeout: float = 60.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    keepalive_requests: int = 1000
    large_client_header_buffers: tuple = (4, 8192)
    access_rules: tuple = ()                # tuple[AccessRule, ...]; empty = allow all


@dataclass(frozen=True)
class Location:
    modifier: str             # '' | '=' | '^~' | '~' | '~*'
    pattern: str
    settings: ProxySettings
    regex: Optional[re.Pattern] = None
    upstream: Optional[str] = None          # name in Config.upstreams
    proxy_uri: Optional[str] = None         # proxy_pass http://up/URI: replaces the prefix
    return_code: Optional[int] = None
    return_text: str = ""
    return_value: Optional[Template] = None  # return text/URL with variables
    status: bool = False                    # mplb_status
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class VirtualServer:
    listens: tuple                          # tuple[Listen, ...]
    server_names: tuple                     # tuple[str, ...], lower case (no regexes)
    locations: tuple                        # tuple[Location, ...] in file order
    settings: ProxySettings
    ssl_certificate: Optional[str] = None
    ssl_certificate_key: Optional[str] = None
    # The loaded certificate and key (a stdlib ssl.SSLContext), read by the master when it
    # loads the configuration, while it may still be root; workers inherit it.
    ssl_context: Optional[object] = field(default=None, compare=False, repr=False)
    name_regexes: tuple = ()                # server_name ~regex: compiled, in file order
    answer: Optional[Location] = None       # a server-level return: every request gets it
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class ConfigWarning:
    """Something accepted but ignored (an nginx-only directive), reported at load."""

    message: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class ErrorLog:
    path: Optional[str] = None              # None = stderr only
    level: str = "info"


@dataclass(frozen=True)
class WorkerUser:
    """``user NAME [GROUP]``: who the workers run as, resolved at load (master is root)."""

    name: str
    group: str
    uid: int
    gid: int
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class SharedStore:
    """``shared_store``: the Redis (or compatible) server several instances share."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False                       # rediss://
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    prefix: str = "mplb"
    timeout: float = 0.005                  # seconds, per call
    key: bytes = field(default=b"", repr=False)   # the cluster key (mplb.config.store)
    file: str = ""
    line: int = 0

    @property
    def redacted(self) -> str:
        """The URL as logs and the status page show it: never the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}:***@" if self.username else (
            ":***@" if self.password is not None else "")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{user}{host}:{self.port}/{self.db}"

    def same_server(self, other) -> bool:
        """Whether ``other`` names the same store the same way (a reload keeps the link)."""
        return other is not None and (self.host, self.port, self.db, self.tls, self.username,
                                      self.password, self.prefix, self.timeout) == (
            other.host, other.port, other.db, other.tls, other.username, other.password,
            other.prefix, other.timeout)


@dataclass(frozen=True)
class Config:
    path: str
    worker_processes: int
    worker_connections: int = 10000
    worker_shutdown_timeout: Optional[float] = None
    pid: Optional[str] = None
    error_log: ErrorLog = field(default_factory=ErrorLog)
    access_log: Optional[str] = None        # None = off
    user: Optional[WorkerUser] = None       # None: workers keep the master's user
    shared_store: Optional[SharedStore] = None
    upstreams: Mapping[str, Upstream] = field(default_factory=dict)
    servers: tuple = ()                     # tuple[VirtualServer, ...]
    maps: Mapping[str, VariableMap] = field(default_factory=dict)
    capture_names: frozenset = frozenset()  # named captures of server_name regexes
    warnings: tuple = ()                    # tuple[ConfigWarning, ...]: logged at start, reload

    @property
    def listens(self) -> tuple:
        """Distinct sockets to bind, in first-seen order (ssl flag from any block)."""
        seen = {}
        for vserver in self.servers:
            for listen in vserver.listens:
                seen.setdefault(listen.key, listen)
        return tuple(seen.values())
