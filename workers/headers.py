"""Rendering the request head sent upstream and the response head sent to the client.

A ``HeadPlan`` is built once per location: which client headers to drop, which
headers mplb adds (defaults overridden by ``proxy_set_header``), with every header
whose value has no variable pre-rendered to bytes.  Per request the plan costs one
pass over the client's headers and one ``join``.
"""
from __future__ import annotations

from mplb.workers.uri import escape_path
from mplb.workers.variables import BUILT_IN, compile_template

# Hop-by-hop headers never forwarded in either direction (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate",
})

# Request headers mplb handles itself instead of forwarding.
REQUEST_MANAGED = HOP_BY_HOP | {b"content-length", b"expect", b"host"}

# Forwarded by default; ``proxy_set_header`` with the same name replaces the value.
DEFAULT_SET_HEADERS = (
    ("X-Forwarded-For", ((True, "proxy_add_x_forwarded_for"),)),
    ("X-Forwarded-Proto", ((True, "scheme"),)),
    ("X-Real-IP", ((True, "remote_addr"),)),
)


# Variables with one value for every request of a client connection: header lines
# made only of these are rendered once per connection (X-Forwarded-For too, while
# the client sends none of its own).
CONNECTION_VARIABLES = frozenset({"remote_addr", "remote_port", "server_addr", "server_port",
                                  "scheme", "proxy_add_x_forwarded_for"})


_COMMON_CONNECTION = {b"keep-alive": frozenset({b"keep-alive"}), b"close": frozenset({b"close"}),
                      b"upgrade": frozenset({b"upgrade"})}


def _tokens(value: str) -> list:
    """Lower-case tokens of a Connection value written in the configuration."""
    return [token.strip().lower() for token in value.split(",")]


def connection_tokens(value: bytes) -> frozenset:
    """Lower-case tokens of a Connection header value."""
    common = _COMMON_CONNECTION.get(value.lower())
    if common is not None:
        return common
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


_FORBIDDEN = {0: None, 10: None, 13: None}      # NUL, LF, CR: would split the header


def header_bytes(value: str) -> bytes:
    """A header value as bytes; a variable can never inject a header line.

    ``$uri`` is percent-decoded, so a client could smuggle ``%0d%0a`` into a header
    that a template fills: CR, LF and NUL are dropped.
    """
    if "\r" in value or "\n" in value or "\0" in value:
        value = value.translate(_FORBIDDEN)
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:      # a decoded $uri with characters beyond latin-1
        return value.encode("utf-8")


class HeadPlan:
    """What one location does to request heads; immutable once built.

    ``variables`` is the worker's VariableTable (workers.variables); ``location`` gives
    the URI of ``proxy_pass http://upstream/URI``, which replaces the matched prefix.
    """

    def __init__(self, settings, location=None, variables=BUILT_IN):
        getter = variables.getter
        entries = {name.lower(): (name, parts) for name, parts in DEFAULT_SET_HEADERS}
        self.host_value_of = None          # None: forward the client's Host as sent
        self.connection_close = False      # proxy_set_header Connection close
        self.connection_of = None          # proxy_set_header Connection $variable
        self.proxy_uri = location.proxy_uri if location is not None else None
        self.prefix_length = len(location.pattern) if location is not None else 0
        for template in settings.proxy_set_header:
            key = template.name.lower()
            if key == "host":
                self.host_value_of = compile_template(template.parts, getter)
                continue
            if key == "connection":
                # mplb owns the upstream connection: only "close" matters, and for an
                # upgrade "upgrade" is sent whatever the value (workers.headers docs).
                if template.static:
                    self.connection_close = "close" in _tokens(template.literal)
                else:
                    self.connection_of = compile_template(template.parts, getter)
                continue
            if key == "upgrade":
                continue   # forwarded for upgrades only, from the client's own header
            entries[key] = (template.name, template.parts)
        self.http10 = settings.proxy_http_version == "1.0"
        self.skip = frozenset(REQUEST_MANAGED | {key.encode("latin-1") for key in entries})
        self.static = []                   # pre-rendered b"Name: value\r\n"
        self.dynamic = []                  # (name bytes, parts)
        self.per_connection = True         # every dynamic line is connection-level
        for key, (name, parts) in entries.items():
            if all(not is_var for is_var, _ in parts):
                value = "".join(text for _, text in parts)
                if value:
                    self.static.append(f"{name}: {value}\r\n".encode("latin-1"))
            else:
                self.dynamic.append((name.encode("latin-1"), compile_template(parts, getter)))
                if any(is_var and text not in CONNECTION_VARIABLES for is_var, text in parts):
                    self.per_connection = False
        self.static_block = b"".join(self.static)
        self.keepalive = not (self.http10 or self.connection_close)
        # Connection: close always (keepalive off), or when a variable says so.
        self.may_close = not self.keepalive or self.connection_of is not None

    def render(self, request, server, body_framing: bytes) -> bytes:
        """The complete upstream request head, ready for one send."""
        version = b"HTTP/1.0" if self.http10 else b"HTTP/1.1"
        target = request.url if self.proxy_uri is None else self.target(request)
        out = [request.method.encode("latin-1"), b" ", target, b" ", version, b"\r\n"]
        if self.host_value_of is not None:
            out += [b"Host: ", header_bytes(self.host_value_of(request)), b"\r\n"]
        else:
            host = request.host_value
            out += [b"Host: ", host if host is not None else server.hostport.encode(),
                    b"\r\n"]
        skip = self.skip
        if request.connection_named:
            # Headers that the client's Connection header names are hop-by-hop too.
            skip = skip | request.connection_named
        for name, value in request.headers:
            if name.lower() not in skip:
                out += [name, b": ", value, b"\r\n"]
        out.append(self.static_block)
        if self.per_connection and request.forwarded_for is None:
            blocks = request.conn.head_blocks
            block = blocks.get(self)
            if block is None:
                block = blocks[self] = self._dynamic_block(request)
            out.append(block)
        else:
            out.append(self._dynamic_block(request))
        if request.is_upgrade:
            out += [b"Upgrade: ", (request.header("upgrade") or "").encode("latin-1"),
                    b"\r\nConnection: upgrade\r\n"]
        elif self.may_close:
            if self.connection_of is None:
                out.append(b"Connection: close\r\n")
            elif "close" in _tokens(self.connection_of(request)):
                # e.g. map $http_upgrade $connection_upgrade {default upgrade; '' close;}
                request.upstream_close = True
                out.append(b"Connection: close\r\n")
        out += [body_framing, b"\r\n"]
        return b"".join(out)

    def target(self, request) -> bytes:
        """The request target with the location's prefix replaced by proxy_pass's URI.

        nginx's rule: the matched part of the normalised URI ($uri) is replaced; the rest
        is escaped again if the client's URI had escapes; the arguments follow unchanged.
        """
        rest = request.uri[self.prefix_length:]
        if "%" in request._path:             # set by .uri: the path as the client sent it
            rest = escape_path(rest)
        uri = self.proxy_uri + rest
        args = request.args
        return (uri + "?" + args if args else uri).encode("latin-1", "replace")

    def _dynamic_block(self, request) -> bytes:
        out = []
        for name, value_of in self.dynamic:
            value = value_of(request)
            if value:
                out += [name, b": ", header_bytes(value), b"\r\n"]
        return b"".join(out)

