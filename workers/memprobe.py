"""MPLB_MEMPROBE_DIR=DIR: a worker reports, on SIGUSR2, where its Python heap goes.

Why: what an idle tunnel costs is only visible from inside the worker that holds it
(scripts/bench_tunnel_memory.py compares two reports, before and after opening N
tunnels).  Off unless the variable is set: tracemalloc slows every allocation and
adds to every one.  Each report replaces ``DIR/worker-PID.json``: the objects only the
cycle collector could free (per type: cyclic garbage waiting for a collection), then,
after that collection, the traced total, the bytes and blocks per allocating source
line, and the count of each type the collector tracks.  The file is opened at boot, before the worker gives root up.
"""
from __future__ import annotations

import os

ENV = "MPLB_MEMPROBE_DIR"
_PROBE = {"file": None}


def start_memory_probe() -> None:
    """Trace allocations from now on and answer SIGUSR2 with a report (when asked to)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    import signal
    import tracemalloc

    import gevent

    tracemalloc.start(1)
    _PROBE["file"] = open(os.path.join(directory, f"worker-{os.getpid()}.json"), "w")
    gevent.signal_handler(signal.SIGUSR2, write_report)


def write_report() -> None:
    """Replace the report file with the heap as it is now (after a full collection)."""
    import gc
    import json
    import tracemalloc
    from collections import Counter

    gc.set_debug(gc.DEBUG_SAVEALL)      # what only the cycle collector would free
    gc.collect()
    garbage = Counter(type(obj).__qualname__ for obj in gc.garbage)
    gc.garbage.clear()
    gc.set_debug(0)
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    lines = {f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}": [stat.size, stat.count]
             for stat in snapshot.statistics("lineno")}
    del snapshot                    # its traces are tuples: count without them
    types = Counter(type(obj).__qualname__ for obj in gc.get_objects())
    report = {"traced": tracemalloc.get_traced_memory()[0], "lines": lines,
              "types": dict(types), "garbage": dict(garbage)}
    handle = _PROBE["file"]
    handle.seek(0)
    handle.truncate()
    json.dump(report, handle)
    handle.write("\n")
    handle.flush()
