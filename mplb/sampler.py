"""The master's once-a-second sample of the statistics, for the dashboard's charts.

The master's loop asks ``wait()`` how long it may sleep and calls ``tick()`` on every
pass; a sample is taken (mplb.shm.timing.take_sample) when one is due.  Only the
master's main loop calls it, so the segment's ring has one writer, which is also the
thread that reclaims servers (whose ring it zeroes).
"""
from __future__ import annotations

import time

SAMPLE_INTERVAL = 1.0        # seconds between two samples


class Sampler:
    """When the next sample is due, and taking it."""

    def __init__(self, interval: float = SAMPLE_INTERVAL):
        self.interval = interval
        self.next_at = 0.0               # monotonic time of the next sample

    def wait(self, longest: float = 1.0) -> float:
        """Seconds the loop may sleep: at most ``longest``, never past the next sample."""
        return min(longest, max(0.0, self.next_at - time.monotonic()))

    def tick(self, shared) -> bool:
        """Take a sample if one is due; True when it did."""
        now = time.monotonic()
        if shared is None or now < self.next_at:
            return False
        shared.take_sample(time.time())
        self.next_at += self.interval
        if self.next_at <= now:          # late (a long pass): a new beat from now
            self.next_at = now + self.interval
        return True
