"""The shared-memory segment every process of one master uses.

``layout`` names every field of the segment once; ``segment`` is SharedState, the typed
views over it; ``space`` the reservable tables and upstream words; ``tables`` the
persistence tables themselves; ``local`` the same layout in private memory.  Nothing
here imports anything of mplb above ``mplb.errors``.
"""
from mplb.shm.layout import GROUP, segment_path  # noqa: F401
from mplb.shm.segment import SharedState  # noqa: F401
