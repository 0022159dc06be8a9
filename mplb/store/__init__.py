"""Several mplb instances sharing state through Redis (the ``shared_store`` directive).

Only the master talks to the store, from two threads of its own (mplb.store.sync);
workers never touch the network for it.  ``codec`` names every key and message and
checks what comes back; ``client`` makes fork-safe connections; ``plan`` maps the
running configuration onto the segment.  The master imports this package only when a
configuration has a ``shared_store``: this module itself imports nothing.
"""
import logging

log = logging.getLogger("mplb.store")


def follow_config(store, config, shared, health, lock):
    """The StoreSync ``config`` wants: ``store`` kept (told of the new configuration),
    replaced, stopped (None) or started; the master calls it at start, on every reload
    and on a rollback."""
    wanted = config.shared_store
    if store is not None and wanted is not None and wanted.same_server(store.store):
        store.update_config(config)
        return store
    if store is not None:
        store.stop()
        log.info("shared store %s left", store.store.redacted)
    if wanted is None:
        return None
    from mplb.store.sync import StoreSync          # redis is imported from here on
    store = StoreSync(config, shared, health, lock)
    store.start()
    return store
