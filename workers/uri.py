"""URI normalisation for location matching ($uri), as nginx does it."""


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
