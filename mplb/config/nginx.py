"""nginx directives mplb does not implement: ignored with a warning, or refused.

An operator pastes a working nginx configuration.  A directive that only tunes how nginx
itself works (buffers, sendfile, hash table sizes, MIME types) means nothing here: it is
accepted, and one warning names its file and line.  A directive whose effect a client or
backend would notice (caching, rewriting, authentication, compression, added headers) is
refused with an error naming file, line and directive, because silently dropping it
would change behaviour.  Some are both, by value: ``gzip off`` changes nothing and is
ignored, ``gzip on`` is refused.  A directive named nowhere here nor in the registry is
an unknown directive (also an error).

The README's directive reference lists both tables (mplb.config.docs).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

MAIN, EVENTS, UPSTREAM, SERVER, LOCATION = "main", "events", "upstream", "server", "location"
HTTP = (MAIN, SERVER, LOCATION)


@dataclass(frozen=True)
class Foreign:
    """An nginx directive and what mplb does with it."""

    name: str
    contexts: tuple
    why: str                          # why it is ignored, or why it is refused
    ignored: bool = True              # accepted with a warning (else refused)
    only: Optional[tuple] = None      # ignored only with one of these (first) values
    refused_why: str = ""             # why it is refused with any other value

    def decide(self, args) -> tuple:
        """``(ignored, reason)`` for a statement with these arguments."""
        if self.only is None:
            return self.ignored, self.why
        value = args[0].lower() if args else ""
        if value in self.only:
            return True, self.why
        return False, self.refused_why


def _ignored(names, contexts, why):
    return [Foreign(name, contexts, why) for name in names.split()]


def _refused(names, contexts, why):
    return [Foreign(name, contexts, why, ignored=False) for name in names.split()]


def _off_only(name, contexts, why, refused_why, values=("off",)):
    return [Foreign(name, contexts, why, only=values, refused_why=refused_why)]


TABLE = (
    _ignored("sendfile sendfile_max_chunk tcp_nopush tcp_nodelay aio aio_write directio "
             "directio_alignment output_buffers postpone_output read_ahead send_lowat "
             "reset_timedout_connection lingering_close lingering_time lingering_timeout "
             "send_timeout keepalive_disable msie_padding msie_refresh", HTTP,
             "it tunes how nginx writes to sockets and files; mplb streams with its own "
             "settings")
    + _ignored("client_body_buffer_size client_header_buffer_size client_body_temp_path "
               "client_body_in_single_buffer connection_pool_size request_pool_size "
               "proxy_buffering proxy_buffers proxy_buffer_size proxy_busy_buffers_size "
               "proxy_temp_path proxy_temp_file_write_size proxy_max_temp_file_size "
               "proxy_request_buffering proxy_socket_keepalive", HTTP,
               "it sizes nginx's buffers; mplb streams bodies without buffering them whole")
    + _ignored("types_hash_max_size types_hash_bucket_size server_names_hash_max_size "
               "server_names_hash_bucket_size variables_hash_max_size "
               "variables_hash_bucket_size map_hash_max_size map_hash_bucket_size "
               "proxy_headers_hash_max_size proxy_headers_hash_bucket_size", HTTP,
               "it sizes nginx's hash tables")
    + _ignored("types default_type charset_types", HTTP,
               "MIME types apply to files nginx serves; mplb serves no files")
    + _ignored("open_file_cache open_file_cache_valid open_file_cache_min_uses "
               "open_file_cache_errors open_log_file_cache log_not_found log_subrequest "
               "server_tokens", HTTP,
               "it tunes nginx's file handling or its own responses")
    + _ignored("log_format", HTTP, "mplb writes one access log format (combined, plus "
               "upstream address and request time)")
    + _ignored("access_log error_log", (SERVER, LOCATION),
               "mplb keeps one access log and one error log, set at main level")
    + _ignored("resolver resolver_timeout", HTTP + (UPSTREAM,),
               "mplb resolves upstream host names with the system resolver at load and "
               "at reload")
    + _ignored("ssl_session_cache ssl_session_timeout ssl_session_tickets ssl_buffer_size "
               "ssl_prefer_server_ciphers ssl_stapling ssl_stapling_verify ssl_ecdh_curve "
               "ssl_dhparam", HTTP,
               "it tunes TLS internals; mplb uses Python's secure TLS defaults")
    + _ignored("http2 http2_max_concurrent_streams http2_chunk_size http2_body_preread_size "
               "http2_idle_timeout http2_recv_timeout", HTTP,
               "mplb speaks HTTP/1.1 to clients (TLS offers http/1.1 only), which every "
               "client falls back to")
    + _ignored("proxy_cache_bypass proxy_no_cache proxy_cache_valid proxy_cache_key "
               "proxy_cache_use_stale proxy_cache_lock proxy_cache_methods "
               "proxy_cache_min_uses proxy_cache_revalidate proxy_cache_background_update "
               "proxy_cache_path", HTTP,
               "it only tunes a cache, and no cache is enabled (proxy_cache is refused)")
    + _ignored("gzip_vary gzip_proxied gzip_comp_level gzip_buffers gzip_http_version "
               "gzip_types gzip_min_length gzip_disable", HTTP,
               "it only tunes compression, and compression is off (gzip on is refused)")
    + _ignored("limit_req_zone limit_conn_zone", (MAIN,),
               "it only defines a zone for limit_req or limit_conn, which are refused")
    + _ignored("auth_basic_user_file", HTTP,
               "it only names the file of auth_basic, which is refused")
    + _ignored("multi_accept accept_mutex accept_mutex_delay use worker_aio_requests",
               (EVENTS,), "it tunes nginx's event loop; mplb workers run gevent")
    + _ignored("worker_rlimit_nofile worker_cpu_affinity worker_priority worker_rlimit_core "
               "pcre_jit timer_resolution working_directory lock_file thread_pool env "
               "daemon master_process", (MAIN,),
               "it tunes nginx's processes; mplb runs in the foreground with its own "
               "master and workers")
    + _ignored("zone keepalive_timeout keepalive_requests keepalive_time", (UPSTREAM,),
               "it tunes nginx's upstream state; mplb always shares it between workers "
               "and keeps its own upstream keep-alive pool")
    + _off_only("gzip", HTTP, "compression is off, as in mplb",
                "mplb does not compress responses (remove it, or use gzip off)")
    + _off_only("gunzip", HTTP, "decompression is off, as in mplb",
                "mplb does not decompress responses")
    + _off_only("gzip_static", HTTP, "precompressed files are off, as in mplb",
                "mplb serves no files")
    + _off_only("proxy_cache", HTTP, "no cache, as in mplb", "mplb does not cache responses")
    + _off_only("proxy_redirect", HTTP, "mplb does not rewrite Location headers either",
                "mplb does not rewrite Location headers (only off or default is accepted)",
                ("off", "default"))
    + _off_only("proxy_intercept_errors", HTTP, "backend errors pass through, as in mplb",
                "mplb passes backend error responses through unchanged")
    + _off_only("proxy_ignore_client_abort", HTTP, "mplb also drops the upstream request "
                "when the client goes", "mplb drops the upstream request when the client "
                "goes")
    + _off_only("auth_basic", HTTP, "no authentication, as in mplb",
                "mplb has no authentication (restrict access with allow and deny)")
    + _off_only("charset", HTTP, "no charset conversion, as in mplb",
                "mplb does not add or convert charsets")
    + _off_only("ssl_early_data", HTTP, "no early data, as in mplb", "mplb refuses TLS "
                "early data")
    + _off_only("chunked_transfer_encoding", HTTP, "chunked responses stay on, as in mplb",
                "mplb always uses chunked encoding where a response needs it", ("on",))
    + _off_only("proxy_pass_request_headers", HTTP, "request headers go upstream, as in "
                "mplb", "mplb always passes the request headers upstream", ("on",))
    + _off_only("proxy_pass_request_body", HTTP, "request bodies go upstream, as in mplb",
                "mplb always passes the request body upstream", ("on",))
    + _refused("rewrite if set break rewrite_log", HTTP,
               "mplb does not rewrite requests or evaluate conditions (map and "
               "proxy_pass with a URI cover the usual cases)")
    + _refused("root alias index try_files autoindex error_page internal ssi sub_filter "
               "expires etag", HTTP, "mplb serves no files and does not change responses")
    + _refused("add_header add_trailer more_set_headers proxy_hide_header proxy_pass_header "
               "proxy_ignore_headers proxy_set_body proxy_method proxy_cookie_domain "
               "proxy_cookie_path proxy_cookie_flags proxy_store proxy_bind "
               "proxy_next_upstream_timeout", HTTP,
               "it changes what is sent or how, which mplb does not implement")
    + _refused("limit_req limit_conn limit_rate limit_except satisfy auth_request "
               "real_ip_header set_real_ip_from real_ip_recursive", HTTP,
               "it limits or authenticates clients, which mplb does not implement "
               "(restrict access with allow and deny)")
    + _refused("fastcgi_pass uwsgi_pass scgi_pass grpc_pass memcached_pass mirror "
               "stub_status", HTTP,
               "mplb proxies HTTP and WebSocket only (statistics: mplb_status)")
    + _refused("ssl_protocols ssl_ciphers ssl_client_certificate ssl_verify_client "
               "ssl_verify_depth ssl_trusted_certificate ssl_password_file ssl_crl",
               HTTP, "mplb uses Python's TLS defaults (TLS 1.2 and later) and does not "
               "verify clients")
    + _refused("ssl", HTTP, "write listen ... ssl instead")
    + _refused("source_charset", HTTP, "mplb does not convert charsets")
    + _refused("geo split_clients", (MAIN,),
               "mplb does not implement it (map covers variables from variables)")
    + _refused("random sticky least_time ntlm queue", (UPSTREAM,),
               "mplb does not implement this balancing method")
    + _refused("load_module", (MAIN,), "mplb has no dynamic modules")
)

_BY_NAME = {}
for _entry in TABLE:
    _BY_NAME.setdefault(_entry.name, []).append(_entry)

# listen parameters: ignored (tuning) or refused (changes the protocol on the wire).
LISTEN_IGNORED = ("reuseport", "deferred", "bind", "http2", "fastopen", "so_keepalive",
                  "ipv6only", "rcvbuf", "sndbuf", "accept_filter", "setfib")
LISTEN_REFUSED = ("proxy_protocol", "quic")

MIME_TYPES = "mime.types"


def lookup(name: str, context: str) -> Optional[Foreign]:
    """The entry for an nginx directive in this context, or None."""
    for entry in _BY_NAME.get(name, ()):
        if context in entry.contexts:
            return entry
    return None


def is_known(name: str) -> bool:
    return name in _BY_NAME


def is_mime_types(path: str) -> bool:
    """``include mime.types`` (or .../mime.types): MIME types only, ignored."""
    return os.path.basename(path) == MIME_TYPES


def listen_parameter(arg: str):
    """None for a parameter nginx does not know; else ``(ignored, name)``."""
    name = arg.partition("=")[0]
    if name in LISTEN_IGNORED:
        return True, name
    if name in LISTEN_REFUSED:
        return False, name
    return None
