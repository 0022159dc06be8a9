"""One client request as the parser saw it, and the variables nginx users expect.

Header values stay bytes as received; strings are made only for what routing,
balancing or a ``proxy_set_header`` template actually asks for.
"""
from __future__ import annotations

import re
import time
from urllib.parse import unquote

from mplb.workers.uri import normalize_path


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")     # '%' not followed by two hex digits


_monotonic = time.monotonic
HOST_CACHE_SIZE = 256
_HOSTS = {}                  # raw Host header -> $host (bounded: cleared when full)


def _normal_host(raw: bytes) -> str:
    """Lower case, no port, no trailing dot; an IPv6 literal keeps its brackets."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[:host.find("]") + 1]
    else:
        host = host.partition(":")[0]
    return host.rstrip(".")


class BadRequest(Exception):
    """The request is malformed in a way the parser cannot see (400 unless told)."""

    def __init__(self, status=400, reason="bad request"):
        super().__init__(reason)
        self.status = status


class Request:
    """Parsed request head plus body progress; built by the parser callbacks."""

    __slots__ = ("conn", "started", "headers", "body_chunks", "method", "url", "version",
                 "keep_alive", "is_upgrade", "body_bytes", "headers_done", "complete",
                 "content_length", "chunked", "expect_continue", "head_size", "host_seen",
                 "connection_named", "host_value", "forwarded_for", "derived",
                 "upstream_close", "_by_name", "_path", "_args", "_uri", "_host")

    def __init__(self, conn):
        self.conn = conn               # the ClientConnection (addresses, scheme)
        self.started = _monotonic()    # $request_time counts from the first byte parsed
        self.headers = []              # [(name bytes, value bytes)] as received
        self.body_chunks = []
        self.method = ""
        self.url = b""
        self.version = "1.1"
        self.keep_alive = True
        self.is_upgrade = False        # mplb's rule: GET, 1.1, upgrade token, Upgrade header
        self.body_bytes = 0
        self.headers_done = False
        self.complete = False
        self.content_length = None
        self.chunked = False
        self.expect_continue = False
        self.head_size = 0
        self.host_seen = False
        self.connection_named = None   # extra hop-by-hop names from Connection
        self.host_value = None         # the Host header as received
        self.forwarded_for = None      # X-Forwarded-For as received (joined if repeated)
        self.derived = None            # map and capture variables so far (workers.variables)
        self.upstream_close = False    # the upstream head said Connection: close
        self._by_name = self._path = self._args = self._uri = self._host = None

    # -- headers ---------------------------------------------------------
    def header_map(self):
        """Lower-case name -> value string, duplicates joined as HTTP allows."""
        if self._by_name is None:
            by_name = {}
            for name, value in self.headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                if key in by_name:
                    by_name[key] += ("; " if key == "cookie" else ", ") + text
                else:
                    by_name[key] = text
            self._by_name = by_name
        return self._by_name

    def header(self, name_lower):
        return self.header_map().get(name_lower)

    @property
    def client_ip(self):
        return self.conn.client_ip

    # -- URI -------------------------------------------------------------
    def _split_url(self):
        raw = self.url.decode("latin-1")
        if raw.startswith(("http://", "https://")):
            rest = raw.split("://", 1)[1]
            slash = rest.find("/")
            raw = rest[slash:] if slash >= 0 else "/"
        path, _, args = raw.partition("?")
        self._path = path
        self._args = args

    @property
    def args(self):
        if self._args is None:
            self._split_url()
        return self._args

    @property
    def uri(self):
        """Decoded, normalised path used for location matching ($uri)."""
        if self._uri is None:
            if self._path is None:
                self._split_url()
            path = self._path
            if not path.startswith("/"):
                raise ValueError("request target is not an absolute path")
            if "%" in path and _BAD_PERCENT.search(path):
                raise ValueError("invalid percent-encoding")
            if "%" in path or "/." in path or "//" in path:
                path = normalize_path(unquote(path, errors="strict")
                                      if "%" in path else path)
            self._uri = path
        return self._uri

    @property
    def host(self):
        """$host: request-line host, else Host header, lower case, without port."""
        if self._host is None:
            raw = self.url
            if raw.startswith((b"http://", b"https://")):
                host = _normal_host(raw.split(b"://", 1)[1].split(b"/", 1)[0])
            elif self.host_value is None:
                host = ""
            else:
                # A connection sends the same Host again and again: remember a few.
                value = self.host_value
                host = _HOSTS.get(value)
                if host is None:
                    if len(_HOSTS) >= HOST_CACHE_SIZE:
                        _HOSTS.clear()
                    host = _HOSTS[value] = _normal_host(value)
            self._host = host
        return self._host

    # -- variables -------------------------------------------------------
    def variable(self, name):
        """The value of ``$name`` as nginx defines it (empty string when unset)."""
        getter = VARIABLES.get(name)
        if getter is not None:
            return getter(self)
        if name.startswith("http_"):
            return self.header(name[5:].replace("_", "-")) or ""
        # map variables and server_name captures (workers.variables)
        variables = getattr(getattr(self.conn, "worker", None), "variables", None)
        return variables.value(self, name) if variables is not None else ""


def _forwarded_for(request):
    previous = request.forwarded_for
    ip = request.conn.client_ip
    return f"{previous.decode('latin-1')}, {ip}" if previous else ip


def _host_variable(request):
    return request.host or request.conn.default_host


VARIABLES = {
    "host": _host_variable,
    "remote_addr": lambda r: r.conn.client_ip,
    "remote_port": lambda r: str(r.conn.client_port),
    "server_addr": lambda r: r.conn.server_ip,
    "server_port": lambda r: str(r.conn.server_port),
    "scheme": lambda r: r.conn.scheme,
    "request_method": lambda r: r.method,
    "request_uri": lambda r: r.url.decode("latin-1"),
    "uri": lambda r: r.uri,
    "args": lambda r: r.args,
    "proxy_add_x_forwarded_for": _forwarded_for,
}
