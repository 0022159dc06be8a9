"""Deadlines for many connections, on one timer per worker: a timing wheel.

Why: a libev timer per wait costs its creation, start and stop each time, and
sweeping every waiting connection every tick costs time in proportion to the idle
connections.  Here an armed object sits in the slot of a tick no later than its
deadline, and each tick looks only at the slots that have come due: an object whose
deadline has meanwhile moved later is put into a later slot then.  So re-arming to a
later deadline, which is what a keep-alive connection does at every request, only
stores the new deadline; only an earlier one moves the object.  Proxy timeouts are
seconds long: a tenth of a second of lateness is harmless.

An armed object has ``deadline``, ``tick`` and ``timed_out()``; ``deadline`` 0 means
disarmed.
"""
from __future__ import annotations

import time

import gevent

TICK = 0.1
_monotonic = time.monotonic


class Wheel:
    """Deadlines by tick; one repeating timer calls ``timed_out()`` on those due."""

    def __init__(self):
        self.slots = {}           # tick number -> set of objects due in it
        self.last = 0             # the last tick number checked
        self.timer = None
        self.loop = None

    def arm(self, item, deadline: float) -> None:
        item.deadline = deadline
        previous = item.tick
        tick = int(deadline / TICK) + 1
        if previous and previous <= tick:
            return                    # its slot comes first; it moves on from there
        slots = self.slots
        if previous:
            old = slots.get(previous)
            if old is not None:
                old.discard(item)
        slot = slots.get(tick)
        if slot is None:
            slot = slots[tick] = set()
            if self.timer is None or self.loop is not gevent.get_hub().loop:
                self._start()
        slot.add(item)
        item.tick = tick

    def disarm(self, item) -> None:
        item.deadline = 0.0
        tick = item.tick
        if tick:
            slot = self.slots.get(tick)
            if slot is not None:
                slot.discard(item)
            item.tick = 0

    def _start(self) -> None:
        """First deadline of this process (a forked worker has its own loop)."""
        self.loop = gevent.get_hub().loop
        self.last = int(_monotonic() / TICK)
        self.timer = self.loop.timer(TICK, TICK, ref=False)
        self.timer.start(self._tick)

    def _tick(self) -> None:
        now = _monotonic()
        current = int(now / TICK)
        slots = self.slots
        for tick in range(self.last + 1, current + 1):
            due = slots.pop(tick, None)
            if not due:
                continue
            for item in due:
                item.tick = 0
                if item.deadline and item.deadline <= now:
                    item.deadline = 0.0
                    item.timed_out()
                elif item.deadline:
                    self.arm(item, item.deadline)     # rounding: due a tick later
        self.last = current


WHEEL = Wheel()
