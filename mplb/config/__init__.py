"""Configuration: nginx-style text -> validated, immutable Config.

``load(path)`` is the only entry point the rest of mplb needs; it raises
``mplb.errors.ConfigError`` naming the file and line of the first problem.
"""
from __future__ import annotations

from mplb.config.model import Config
from mplb.config.units import parse_size, parse_time

__all__ = ["load", "parse_time", "parse_size", "Config"]


def load(path: str) -> Config:
    """Parse, validate and build the configuration at ``path``."""
    from mplb.config.build import build_config   # keeps `import mplb.config` light
    return build_config(path)
