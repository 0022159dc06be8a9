"""Response-time and tunnel-duration histograms, and the master's ring of samples.

Mixed into SharedState (mplb.shm.segment).  Histograms follow the counters' scheme: each
worker adds to its own (server, worker) cell, one bucket word and the sum word per
observation, and readers add up the workers.  Once a second the master takes a sample
of every server (requests so far, open tunnels, and the p50/p99 response time of the
responses since the previous sample, estimated from the histogram's buckets) into a
ring of RING_SAMPLES slots, so a dashboard can draw the last five minutes even when it
was opened a moment ago, and whichever worker answers it.
"""
from __future__ import annotations

from mplb.errors import MplbError
from mplb.shm.layout import (
    HDR_SAMPLES_TAKEN, HDR_SLOTS_USED, HIST_RESPONSE, HIST_TUNNEL, HIST_WORDS, HISTOGRAMS,
    NFIELDS, REQUESTS, RESPONSE_BUCKETS, RING_SAMPLES, S_P50, S_P99, S_REQUESTS, S_TUNNELS,
    SAMPLE_WORDS, TUNNELS, zeros)

_FIRST_WORD = {"response": HIST_RESPONSE, "tunnel": HIST_TUNNEL}
_BOUNDS = dict(HISTOGRAMS)


def quantile(bounds, counts, fraction: float):
    """The ``fraction`` quantile of bucketed observations (per-bucket counts, the last
    one +Inf), interpolated inside its bucket as Prometheus's histogram_quantile does;
    None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(bounds):              # +Inf: the highest finite bound
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _stored(seconds) -> int:
    """A percentile in a ring word: microseconds plus one, so 0 (zeroed) means none."""
    return 0 if seconds is None else int(seconds * 1e6) + 1


def _milliseconds(word: int):
    return None if word <= 0 else round((word - 1) / 1e3, 3)


class Timings:
    """Histograms and the sample ring (a SharedState mixin)."""

    # -- histograms (single writer per worker slot) -------------------------------------

    def _hist_cell(self, worker_slot: int, sid: int) -> int:
        return self.off_histograms + (sid * self.max_workers + worker_slot) * HIST_WORDS

    def histogram_word(self, worker_slot: int, url: str, name: str) -> int:
        """Index in ``q`` of the first bucket of one histogram of one worker slot; the
        sum word follows the +Inf bucket (the hot path adds to both)."""
        return self._hist_cell(worker_slot, self.server_id(url)) + _FIRST_WORD[name]

    def histogram(self, url: str, name: str) -> tuple:
        """(bounds, per-bucket counts with +Inf last, sum in seconds), summed over workers."""
        bounds = _BOUNDS[name]
        sid = self._sid_or_none(url)
        if sid is None:
            return bounds, [0] * (len(bounds) + 1), 0.0
        words = self._histogram_sums(sid, _FIRST_WORD[name], len(bounds) + 2)
        return bounds, words[:-1], words[-1] / 1e6

    def _histogram_sums(self, sid: int, first: int, count: int) -> list:
        q = self.q
        base = self._hist_cell(0, sid) + first
        stride = HIST_WORDS
        end = base + self.q[HDR_SLOTS_USED] * stride
        return [sum(q[base + i:end + i:stride]) for i in range(count)]

    def _clear_timings(self, sid: int) -> None:
        """Zero a server's histogram cells and its ring (a new or freed entry)."""
        q = self.q
        base = self._hist_cell(0, sid)
        q[base:base + self.max_workers * HIST_WORDS] = zeros(self.max_workers * HIST_WORDS)
        ring = self._ring(sid)
        q[ring:ring + RING_SAMPLES * SAMPLE_WORDS] = zeros(RING_SAMPLES * SAMPLE_WORDS)
        self._last_buckets.pop(sid, None)

    # -- the ring (master writes, anyone reads) -----------------------------------------

    def _ring(self, sid: int) -> int:
        return self.off_samples + RING_SAMPLES + sid * RING_SAMPLES * SAMPLE_WORDS

    def take_sample(self, wall_time: float) -> None:
        """Master, once a second: one sample of every server into the ring."""
        q = self.q
        taken = q[HDR_SAMPLES_TAKEN]
        slot = taken % RING_SAMPLES
        slots = q[HDR_SLOTS_USED]
        buckets = len(RESPONSE_BUCKETS) + 1
        for sid, _ in self._server_entries():
            cell = self.off_counters + sid * self.max_workers * NFIELDS
            end = cell + slots * NFIELDS
            now = self._histogram_sums(sid, HIST_RESPONSE, buckets)
            before = self._last_buckets.get(sid, [0] * buckets)
            delta = [max(0, a - b) for a, b in zip(now, before)]
            self._last_buckets[sid] = now
            p50 = quantile(RESPONSE_BUCKETS, delta, 0.5)
            p99 = quantile(RESPONSE_BUCKETS, delta, 0.99)
            at = self._ring(sid) + slot * SAMPLE_WORDS
            q[at + S_REQUESTS] = sum(q[cell + REQUESTS:end + REQUESTS:NFIELDS])
            q[at + S_TUNNELS] = sum(q[cell + TUNNELS:end + TUNNELS:NFIELDS])
            q[at + S_P50] = _stored(p50)
            q[at + S_P99] = _stored(p99)
        q[self.off_samples + slot] = int(wall_time * 1e6)
        q[HDR_SAMPLES_TAKEN] = taken + 1                    # published last

    def history(self, url: str, since: float = 0.0) -> dict:
        """The ring of one server after wall time ``since``, oldest first: times (s),
        requests per second, open tunnels, p50 and p99 (ms, None without responses)."""
        out = {"t": [], "rps": [], "tunnels": [], "p50_ms": [], "p99_ms": []}
        sid = self._sid_or_none(url)
        taken = self.q[HDR_SAMPLES_TAKEN]
        if sid is None or not taken:
            return out
        q, ring = self.q, self._ring(sid)
        previous = None
        # The oldest slot is the next one overwritten: skip it (it may be mid-write).
        # A poll wants the few newest samples: start one before the first it lacks.
        oldest = max(0, taken - RING_SAMPLES + 1)
        first = taken - 1                    # the earliest sample after ``since`` ...
        while first > oldest and q[self.off_samples + (first - 1) % RING_SAMPLES] > since * 1e6:
            first -= 1
        for number in range(max(oldest, first - 1), taken):    # ... and the one before
            slot = number % RING_SAMPLES
            at = ring + slot * SAMPLE_WORDS
            sample = (q[self.off_samples + slot], q[at + S_REQUESTS], q[at + S_TUNNELS],
                      q[at + S_P50], q[at + S_P99])
            if previous is not None and sample[0] > since * 1e6 and sample[0] > previous[0]:
                elapsed = (sample[0] - previous[0]) / 1e6
                out["t"].append(round(sample[0] / 1e6, 3))
                out["rps"].append(round(max(0, sample[1] - previous[1]) / elapsed, 2))
                out["tunnels"].append(sample[2])
                out["p50_ms"].append(_milliseconds(sample[3]))
                out["p99_ms"].append(_milliseconds(sample[4]))
            previous = sample
        return out

    def _sid_or_none(self, url: str):
        try:
            return self.server_id(url)
        except (KeyError, MplbError):     # not registered (a read-only mapping, or gone)
            return None
