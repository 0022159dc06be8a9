"""The shared-memory segment every process of one master uses.

``layout`` names every field of the segment once; ``segment`` is SharedState, the typed
views over it; ``space`` the reservable tables and upstream words; ``tables`` the
persistence tables themselves; ``local`` the same layout in private memory; ``liveness``
tells a live master's segment from a dead one's.  Nothing here imports anything of mplb
above ``mplb.errors``.
"""
from mplb.shm.layout import GROUP, segment_path  # noqa: F401
from mplb.shm.liveness import (MASTER_TITLE, remove_stale_segments,  # noqa: F401
                               segment_owner)
from mplb.shm.segment import SharedState  # noqa: F401
