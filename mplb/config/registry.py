"""The directive registry: one declarative entry per directive of the language.

It drives validation (context, argument count, duplicates, supported or not), the builder
(through each entry's handler) and the directive reference (mplb.config.docs), so the three
can never disagree.  A name may have one entry per context family: ``server`` is a block in
main and a backend line in ``upstream``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from mplb.config import handlers as h
from mplb.config.store import set_shared_store
from mplb.vocabulary import DEFAULT_METHOD, METHOD_ALIASES, METHODS, persistence_syntax

MAIN, EVENTS, UPSTREAM, SERVER, LOCATION = "main", "events", "upstream", "server", "location"
INHERITED = (MAIN, SERVER, LOCATION)
UNBOUNDED = None


@dataclass(frozen=True)
class Directive:
    """How one directive is written, where it may appear, what it does and how to use it."""

    name: str
    contexts: tuple
    args: tuple                     # (minimum, maximum or UNBOUNDED)
    syntax: str                     # the part after the name, nginx doc style
    default: str                    # '—' when there is none
    help: str
    example: str
    handler: Optional[Callable] = None   # None for blocks (the builder walks them)
    block: bool = False
    repeatable: bool = False
    inherited: bool = False
    supported: bool = True          # False: known, documented, but refused at load

    def count_ok(self, count: int) -> bool:
        low, high = self.args
        return count >= low and (high is UNBOUNDED or count <= high)


def _d(name, contexts, args, syntax, default, help, example, handler=None, **flags):
    return Directive(name, tuple(contexts), args, syntax, default, help, example, handler,
                     **flags)


def _inherited(name, args, syntax, default, help, example, handler, **flags):
    return _d(name, INHERITED, args, syntax, default, help, example, handler,
              inherited=True, **flags)


DIRECTIVES = (
    # --- blocks ---
    _d("include", (MAIN, EVENTS, UPSTREAM, SERVER, LOCATION), (1, 1), "file | mask;", "—",
       "Includes another file, or the files matching a glob in sorted order; a relative "
       "path is relative to the directory of the main configuration file.",
       "include conf.d/*.conf;", repeatable=True),
    _d("http", (MAIN,), (0, 0), "{ ... }", "—",
       "Optional wrapper: its contents are read as if they were written at main level, so "
       "an nginx configuration reads naturally.", "http {\n    upstream backend { ... }\n}",
       block=True, repeatable=True),
    _d("events", (MAIN,), (0, 0), "{ ... }", "—",
       "Optional wrapper for worker_connections, as in nginx.",
       "events {\n    worker_connections 4096;\n}", block=True),
    _d("upstream", (MAIN,), (1, 1), "name { ... }", "—",
       "Defines a named group of backend servers that proxy_pass can refer to, whether it "
       "is defined before or after the reference.",
       "upstream backend {\n    server http://127.0.0.1:8001;\n}", block=True, repeatable=True),
    _d("server", (MAIN,), (0, 0), "{ ... }", "—",
       "Defines a virtual server; several may share one listen address and are told apart "
       "by server_name.", "server {\n    listen 8080;\n    location / { proxy_pass backend; }\n}",
       block=True, repeatable=True),
    _d("map", (MAIN,), (2, 2), "string $variable { ... }", "—",
       "Defines a variable whose value depends on another: exact strings first (ignoring "
       "case), then with hostnames the longest *.suffix and prefix.* masks, then ~regex "
       "and ~*regex (case-insensitive) in file order, else default (empty if unset).  "
       "Values may hold variables, and a regex's captures ($1, $name) in its own value.  "
       "Usable wherever variables are; evaluated at most once per request, only when "
       "used.  hostnames, include and volatile (no effect) work inside.",
       "map $http_upgrade $connection_upgrade {\n    default upgrade;\n    ''      close;\n}",
       block=True, repeatable=True),
    _d("location", (SERVER, LOCATION), (1, 2), "[ = | ^~ | ~ | ~* ] uri { ... }", "—",
       "Sets configuration by request URI with nginx's matching order: exact, then the "
       "longest prefix (^~ stops there), then regexes in file order, else the longest prefix.",
       "location = /mplb_status { mplb_status; }", block=True, repeatable=True),
    # --- main ---
    _d(
        "worker_processes", (MAIN,), (1, 1), "number | auto;", "auto",
        "Number of worker processes; auto means one per CPU.", "worker_processes 4;",
        h.set_worker_processes),
    _d("worker_connections", (MAIN, EVENTS), (1, 1), "number;", "10000",
       "Client connections one worker holds at most; past it the worker stops accepting "
       "until one closes.", "worker_connections 4096;", h.set_worker_connections),
    _d("worker_shutdown_timeout", (MAIN,), (1, 1), "time;", "—",
       "Bounds how long a retiring worker keeps its open connections and tunnels.",
       "worker_shutdown_timeout 30s;", h.set_worker_shutdown_timeout),
    _d("user", (MAIN,), (1, 2), "user [group];", "nobody",
       "When the master runs as root, every worker switches to this user and group (by "
       "default the user's primary group) with no supplementary groups, for good, once "
       "the master has bound the listen sockets, opened the log files and read the TLS "
       "keys; an unknown name is an error.  When the master is not root it is ignored "
       "with a warning.", "user www-data;", h.set_user),
    _d("pid", (MAIN,), (1, 1), "file;", "—",
       "Writes the master's process id to this file (the -pid flag overrides it).",
       "pid /run/mplb.pid;", h.set_pid),
    _d("error_log", (MAIN,), (1, 2), "file | stderr [debug | info | warn | error];",
       "stderr info", "Logs errors to the file as well as stderr, at this level and above.",
       "error_log /var/log/mplb/error.log warn;", h.set_error_log),
    _d("access_log", (MAIN,), (1, 1), "file | off;", "off",
       "Writes one line per request or tunnel: combined log format plus upstream address "
       "and request time.", "access_log /var/log/mplb/access.log;", h.set_access_log),
    _d("shared_store", (MAIN,), (1, 3),
       "redis://[[user]:password@]host[:port][/db] [prefix=name] [timeout=time];", "—",
       "Shares ip_hash and cookie learn= tables, least_connections counts and active "
       "health results with every mplb instance that names the same Redis (or "
       "compatible) server and prefix (default mplb); rediss:// connects with TLS.  The "
       "master alone talks to the store, each call bounded by timeout (default 5ms); "
       "workers never wait on it, and while it is unreachable every instance serves "
       "with its own state.",
       "shared_store redis://10.0.0.5:6379/0 prefix=shop timeout=20ms;", set_shared_store),
    # --- upstream ---
    _d("method", (UPSTREAM,), (1, 1),
       " | ".join(METHODS + tuple(METHOD_ALIASES)) + ";", DEFAULT_METHOD,
       "Chooses the balancing method; least_conn is an alias of least_connections, which "
       "counts connections (tunnels included) across all workers.  The rotation (and "
       "least_connections' tie-break) is one position shared by all workers, so a few "
       "requests taken by different workers still go round the servers.",
       "method least_connections;", h.set_method),
    _d("least_conn", (UPSTREAM,), (0, 0), ";", "—",
       "nginx's spelling of method least_connections.  At most one of least_conn, ip_hash "
       "and hash per upstream (nginx's rule); least_conn with method, or ip_hash or hash "
       "with persistence, is refused.", "least_conn;", h.set_nginx_method),
    _d("ip_hash", (UPSTREAM,), (0, 0), ";", "—",
       "nginx's spelling of persistence ip_hash (default ttl and table size): a client "
       "address seen before goes to the same server.", "ip_hash;", h.set_ip_hash),
    _d("hash", (UPSTREAM,), (1, 2), "key [consistent];", "—",
       "nginx's spelling of persistence consistent_hash, with or without consistent: the "
       "key (text with variables) picks a server on a hash ring.",
       "hash $request_uri consistent;", h.set_hash),
    _d("persistence", (UPSTREAM,), (1, 5), persistence_syntax() + ";", "none",
       "Sends a client seen before to the same server: by client address, by a signed "
       "cookie (or a learned backend cookie), or by a consistent hash of a variable.",
       "persistence cookie name=SRV ttl=1h;", h.set_persistence),
    _d("server", (UPSTREAM,), (1, 7),
       "url [weight=number] [max_fails=number] [fail_timeout=time] [max_conns=number] "
       "[backup] [down];", "weight=1 max_fails=1 fail_timeout=10s",
       "Adds a backend http://host:port (ws:// is a synonym); the host name is resolved "
       "at load, and max_fails=0 turns failure accounting off.",
       "server http://10.0.0.2:8001 weight=3 max_conns=500;", h.add_upstream_server,
       repeatable=True),
    _d("keepalive", (UPSTREAM,), (1, 1), "connections;", "32",
       "Idle keep-alive connections to this upstream that each worker caches.",
       "keepalive 64;", h.set_keepalive),
    _d("health_check", (UPSTREAM,), (0, 5),
       "[interval=time] [uri=path] [fails=number] [passes=number] [timeout=time];",
       "off (interval=5s uri=/ fails=1 passes=1 timeout=1s when enabled)",
       "Enables active checks, run once for all workers, with the results shared.",
       "health_check interval=2s uri=/healthz fails=2;", h.set_health_check),
    # --- server ---
    _d("listen", (SERVER,), (1, 4), "[address:]port [default_server] [ssl] [backlog=number];",
       "listen 0.0.0.0:80",
       "Sets the address and port the virtual server accepts on; [::]:port listens on IPv6.",
       "listen 127.0.0.1:8443 ssl default_server;", h.add_listen, repeatable=True),
    _d("server_name", (SERVER,), (1, UNBOUNDED), "name ...;", '""',
       "Names of the virtual server: exact names, *.example.com or example.*, chosen as "
       "nginx does.", "server_name example.com *.example.com;", h.add_server_name,
       repeatable=True),
    _d("ssl_certificate", (SERVER,), (1, 1), "file;", "—",
       "PEM certificate (chain) for listen ... ssl; relative to the configuration "
       "directory.", "ssl_certificate certs/lb.crt;", h.set_ssl_file),
    _d("ssl_certificate_key", (SERVER,), (1, 1), "file;", "—",
       "PEM private key of ssl_certificate.", "ssl_certificate_key certs/lb.key;",
       h.set_ssl_file),
    # --- location ---
    _d("proxy_pass", (LOCATION,), (1, 1), "upstream | http://upstream | http://host:port;",
       "—", "Proxies requests (and upgrades such as WebSocket) to an upstream group, or to "
       "one address, which becomes an implicit upstream.", "proxy_pass backend;",
       h.set_proxy_pass),
    _d("return", (SERVER, LOCATION), (1, 2), "code [text | URL] | URL;", "—",
       "Answers directly with this status; for 301, 302, 303, 307 and 308 the second "
       "argument is the Location URL.  The text or URL may hold variables.  In a server "
       "block it answers every request of that server, before any location (nginx's "
       "rule).", "return 301 https://$host$request_uri;", h.set_return),
    _d("mplb_status", (LOCATION,), (0, 0), ";", "—",
       "This location serves the load balancer's statistics.",
       "location = /mplb_status { mplb_status; allow 127.0.0.1; deny all; }", h.set_status),
    # --- inherited: main, server, location ---
    _inherited("proxy_http_version", (1, 1), "1.0 | 1.1;", "1.1",
               "HTTP version used towards the backend; upgrades need 1.1.",
               "proxy_http_version 1.1;", h.set_http_version),
    _inherited("proxy_set_header", (2, 2), "field value;", "—",
               "Sets a request header sent upstream; the value may hold variables and an "
               "empty value removes the header; inherited only if the level sets none.",
               "proxy_set_header Upgrade $http_upgrade;", h.add_header, repeatable=True),
    _inherited("proxy_connect_timeout", (1, 1), "time;", "5s",
               "Longest wait for a connection to a backend.", "proxy_connect_timeout 2s;",
               h.timeout_setter("proxy_connect_timeout")),
    _inherited("proxy_read_timeout", (1, 1), "time;", "60s",
               "Longest wait for the backend's next bytes; for a tunnel, the longest silence "
               "in both directions before it is closed.", "proxy_read_timeout 3600s;",
               h.timeout_setter("proxy_read_timeout")),
    _inherited("proxy_send_timeout", (1, 1), "time;", "60s",
               "Longest stall while writing to the backend.", "proxy_send_timeout 30s;",
               h.timeout_setter("proxy_send_timeout")),
    _inherited("proxy_websocket_keepalive", (1, 2), "on | off [interval=time];",
               "off interval=30s",
               "Sends WebSocket pings on idle tunnels so intermediaries keep them open.",
               "proxy_websocket_keepalive on interval=20s;", h.set_ws_keepalive),
    _inherited("proxy_next_upstream", (1, 6),
               "error | timeout | http_502 | http_503 | http_504 ... | off;", "error timeout",
               "When to retry another server; only before anything was sent to the client.",
               "proxy_next_upstream error timeout http_502;", h.set_next_upstream),
    _inherited("proxy_next_upstream_tries", (1, 1), "number;", "0",
               "Bounds the tries of proxy_next_upstream; 0 means no bound.",
               "proxy_next_upstream_tries 3;", h.set_next_upstream_tries),
    _inherited("client_max_body_size", (1, 1), "size;", "1m",
               "Largest request body accepted (larger gets 413); 0 means unlimited.",
               "client_max_body_size 10m;", h.set_max_body),
    _inherited("client_header_timeout", (1, 1), "time;", "60s",
               "Longest wait for a complete request head.", "client_header_timeout 10s;",
               h.timeout_setter("client_header_timeout")),
    _inherited("client_body_timeout", (1, 1), "time;", "60s",
               "Longest wait between two reads of the request body.",
               "client_body_timeout 10s;", h.timeout_setter("client_body_timeout")),
    _inherited("keepalive_timeout", (1, 1), "time;", "75s",
               "How long an idle client keep-alive connection stays open; 0 disables "
               "keep-alive.", "keepalive_timeout 30s;",
               h.timeout_setter("keepalive_timeout", positive=False)),
    _inherited("keepalive_requests", (1, 1), "number;", "1000",
               "Requests served on one client connection; the last response carries "
               "Connection: close.", "keepalive_requests 100;", h.set_keepalive_requests),
    _inherited("large_client_header_buffers", (2, 2), "number size;", "4 8k",
               "A request line longer than size gets 414; a longer header line, or more "
               "headers than fit in number buffers, gets 431.",
               "large_client_header_buffers 8 16k;", h.set_header_buffers),
    _inherited("allow", (1, 1), "address | CIDR | all;", "—",
               "Allows access from an address or network; rules are checked in order and "
               "the first match wins.", "allow 10.0.0.0/8;", h.add_access_rule,
               repeatable=True),
    _inherited("deny", (1, 1), "address | CIDR | all;", "—",
               "Denies access from an address or network (403); first match wins.",
               "deny all;", h.add_access_rule, repeatable=True),
)

_BY_NAME = {}
for _entry in DIRECTIVES:
    _BY_NAME.setdefault(_entry.name, []).append(_entry)


def is_known(name: str) -> bool:
    return name in _BY_NAME


def lookup(name: str, context: str) -> Optional[Directive]:
    """The entry for ``name`` in ``context``, or None when it is not allowed there."""
    for entry in _BY_NAME.get(name, ()):
        if context in entry.contexts:
            return entry
    return None


def by_name(name: str) -> list:
    return list(_BY_NAME.get(name, ()))
