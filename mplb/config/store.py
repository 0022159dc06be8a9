"""``shared_store redis://HOST:PORT[/DB] [prefix=NAME] [timeout=T];``: parsed once, at load.

The URL is checked here so that a malformed one fails ``mplb -t`` with its file and line;
the host is *not* resolved (a store that cannot be reached is a degraded store at run
time, never a reason to refuse a configuration).  The password stays in the model for
the master's connection and for the cluster key, and is never shown: ``redacted``
is what logs and the status page print.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
from urllib.parse import unquote, urlsplit

from mplb.config.model import SharedStore
from mplb.config.values import Stmt, split_options, to_time

SCHEMES = ("redis", "rediss")
DEFAULT_PORT = 6379
DEFAULT_PREFIX = "mplb"
DEFAULT_TIMEOUT = 0.005
MAX_URL = 512
MAX_DB = 1_000_000
MAX_TIMEOUT = 60.0
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.?")


def valid_host(host: str) -> bool:
    """A DNS name or an IP address (IPv6 without its brackets, as urlsplit gives it)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and bool(_HOST.fullmatch(host))


def cluster_key(prefix: str, password: str) -> bytes:
    """The key every instance of one cluster digests shared-table keys with.

    Built from what all instances of a cluster must share anyway (the store's prefix
    and its password), never from how each one spells the host, so two instances
    that reach one Redis by different names still agree.
    """
    material = f"{prefix}\0{password}".encode("utf-8", "surrogateescape")
    return hashlib.blake2b(material, digest_size=16, person=b"mplb-cluster").digest()


def without_password(url: str) -> str:
    """``url`` with whatever precedes an ``@`` in its authority written as ``***``."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


def parse_store_url(stmt: Stmt, url: str) -> dict:
    """The parts of a ``redis://`` or ``rediss://`` URL; raises ConfigError naming why
    (the message never repeats a password)."""
    shown = without_password(url)
    if len(url) > MAX_URL:
        raise stmt.invalid(shown[:40] + "...", f"the URL is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise stmt.invalid(shown, f"malformed URL ({exc})") from None
    if port == 0:
        raise stmt.invalid(shown, "the port must be 1 to 65535")
    url = shown
    if parts.scheme.lower() not in SCHEMES:
        raise stmt.invalid(url, 'the URL must start with "redis://" or "rediss://"')
    host = parts.hostname or ""
    if not valid_host(host):
        raise stmt.invalid(url, "the URL has no valid host")
    if parts.query or parts.fragment:
        raise stmt.invalid(url, "the URL takes no query or fragment")
    path = parts.path.strip("/")
    if path and not (path.isdigit() and int(path) <= MAX_DB):
        raise stmt.invalid(url, "the database must be a number, as in redis://host:6379/0")
    return {"tls": parts.scheme.lower() == "rediss", "host": host,
            "port": port or DEFAULT_PORT, "db": int(path) if path else 0,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}


def set_shared_store(stmt: Stmt, scope) -> None:
    """Handler of ``shared_store``: the URL, then ``prefix=`` and ``timeout=``."""
    fields = parse_store_url(stmt, stmt.args[0])
    options = split_options(stmt, stmt.args[1:], ("prefix", "timeout"), '"shared_store"')
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not _PREFIX.fullmatch(prefix):
        raise stmt.invalid(prefix, "a prefix is 1 to 64 letters, digits, '_', '.' or '-'")
    timeout = DEFAULT_TIMEOUT
    if "timeout" in options:
        timeout = to_time(stmt, options["timeout"], positive=True)
        if timeout > MAX_TIMEOUT:
            raise stmt.invalid(options["timeout"], f"it must be at most {int(MAX_TIMEOUT)}s")
    scope.values["shared_store"] = SharedStore(
        prefix=prefix, timeout=timeout, key=cluster_key(prefix, fields["password"] or ""),
        file=stmt.file, line=stmt.line, **fields)
