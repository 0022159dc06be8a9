"""Time and size units, defined once for every directive.

Times: ``ms``, ``s``, ``m``, ``h``, ``d``, combinable in descending order (``1h30m``);
a bare number is seconds.  Sizes: ``k``, ``m``, ``g`` (either case); a bare number is bytes.
Both raise ``ValueError``; the registry turns that into an error with file and line.
"""
from __future__ import annotations

import re

TIME_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}

# 'ms' before 'm' so "500ms" is not read as 500 minutes followed by junk.
_TIME_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)?")
_SIZE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE)
_TIME_ORDER = ("d", "h", "m", "s", "ms")


def parse_time(text: str) -> float:
    """Return seconds for '30s', '1h30m', '500ms' or a bare number of seconds."""
    text = str(text).strip()
    if not text:
        raise ValueError("empty time")
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    total = 0.0
    pos = 0
    last_rank = -1
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if not match or match.group(2) is None:
            raise ValueError(f"invalid time {text!r}")
        rank = _TIME_ORDER.index(match.group(2))
        if rank <= last_rank:   # nginx: each unit once, largest first
            raise ValueError(f"invalid time {text!r}")
        last_rank = rank
        total += float(match.group(1)) * TIME_UNITS[match.group(2)]
        pos = match.end()
    return total


def parse_size(text: str) -> int:
    """Return bytes for '512', '8k', '1m', '2g'."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"invalid size {text!r}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def format_time(seconds: float) -> str:
    """Render seconds the way the docs and defaults write them ('60s', '1h', '500ms')."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit in ("d", "h", "m"):
        if seconds >= TIME_UNITS[unit] and seconds % TIME_UNITS[unit] == 0:
            return f"{int(seconds // TIME_UNITS[unit])}{unit}"
    return f"{seconds:g}s"
