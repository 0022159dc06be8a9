"""The words of the configuration language that name behaviour, with their defaults.

One table each for balancing methods, persistence modes and variables.  The
configuration checks what an operator wrote against them, the balancer finds its
plug-ins by them, the workers compute the variables they list, and the directive
reference is generated from them, so none of these can disagree with another.
Imports nothing of mplb: every layer may read it.
"""
from __future__ import annotations

from dataclasses import dataclass

# -- balancing methods ------------------------------------------------------------------
METHODS = ("weighted_round_robin", "round_robin", "least_connections")
DEFAULT_METHOD = "weighted_round_robin"
METHOD_ALIASES = {"least_conn": "least_connections"}      # nginx's spelling


def method_name(written: str):
    """The method an operator's word means, or None if it names none."""
    name = METHOD_ALIASES.get(written, written)
    return name if name in METHODS else None


# -- persistence modes ------------------------------------------------------------------
@dataclass(frozen=True)
class PersistenceMode:
    """A persistence mode: the options it takes and its default record lifetime."""

    name: str
    options: tuple
    ttl: float = 0.0              # seconds a record lives without use (0: no records)


PERSISTENCE_MODES = {
    "none": PersistenceMode("none", ()),
    "ip_hash": PersistenceMode("ip_hash", ("ttl", "table_size"), ttl=3600.0),
    "cookie": PersistenceMode("cookie", ("name", "ttl", "secret", "learn"), ttl=86400.0),
    "consistent_hash": PersistenceMode("consistent_hash", ("key",)),
}
# What each option's value is, as the directive reference writes it.
OPTION_VALUES = {"ttl": "time", "table_size": "number", "name": "name", "secret": "string",
                 "learn": "cookie", "key": "$variable"}
DEFAULT_TABLE_SIZE = 65536
DEFAULT_COOKIE_NAME = "MPLB_SESSION"
DEFAULT_HASH_KEY = "$uri"

def persistence_syntax() -> str:
    """``none | ip_hash [ttl=time] ...``: every mode with its options."""
    return " | ".join(mode.name + "".join(f" [{option}={OPTION_VALUES[option]}]"
                                          for option in mode.options)
                      for mode in PERSISTENCE_MODES.values())


# -- variables --------------------------------------------------------------------------
# Variables a worker computes per request; $http_NAME (any request header) is open-ended.
VARIABLES = ("args", "host", "proxy_add_x_forwarded_for", "remote_addr", "remote_port",
             "request_method", "request_uri", "scheme", "server_addr", "server_port", "uri")
HEADER_VARIABLE_PREFIX = "http_"

# -- nginx's spellings inside upstream ----------------------------------------------------
# Each names a method or a persistence mode above; nginx allows one of them per upstream.
NGINX_BALANCING = {"least_conn": "least_connections", "ip_hash": "ip_hash",
                   "hash": "consistent_hash"}
