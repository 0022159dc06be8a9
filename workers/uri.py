"""URI normalisation for location matching ($uri), and escaping again, as nginx does."""

import re


def normalize_path(path: str) -> str:
    """Merge slashes and resolve ``.`` and ``..``; a path that climbs above root is bad.

    Raises ValueError for a path that cannot be right (above root, NUL byte); the
    connection layer answers 400.
    """
    if "\x00" in path or not path.startswith("/"):
        raise ValueError("bad path")
    segments = []
    for segment in path.split("/")[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise ValueError("path above root")
            segments.pop()
            continue
        segments.append(segment)
    normalized = "/" + "/".join(segments)
    if path.endswith(("/", "/.", "/..")) and normalized != "/":
        normalized += "/"
    return normalized


# What nginx escapes again in a URI it sends upstream (ngx_escape_uri, NGX_ESCAPE_URI):
# space, '#', '%', '?', control characters and everything beyond ASCII.
_UNSAFE = re.compile(r"[\x00-\x20#%?\x7f-\U0010ffff]")


def _percent(match) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group(0).encode("utf-8"))


def escape_path(path: str) -> str:
    """A decoded path made safe for a request line again, as nginx escapes it."""
    return _UNSAFE.sub(_percent, path)
