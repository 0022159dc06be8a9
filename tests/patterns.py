"""Test bodies whose corruption shows (shared by tests and tests/backend_server.py)."""


def pattern(size: int) -> bytes:
    """Bytes whose 8-byte words are their own offsets: order and completeness checkable."""
    words = (size + 7) // 8
    return b"".join(b"%08x" % (i % 0xFFFFFFFF) for i in range(words))[:size]
