"""Several mplb instances sharing state through Redis (the ``shared_store`` directive).

Only the master talks to the store, from two threads of its own (mplb.store.sync);
workers never touch the network for it.  ``codec`` names every key and message and
checks what comes back; ``client`` makes fork-safe connections; ``plan`` maps the
running configuration onto the segment.  The master imports this package only when a
configuration has a ``shared_store``.
"""
