"""Request latency per guest-protocol op: cumulative histograms the dispatcher fills.

Owns the latency figures of guest requests (``Dispatcher.handle``: from the decoded frame
to its reply bytes, which is where the agent spends its time; the group commit and the
socket write after it are shared by many requests and are not per op).  The buckets are
fixed, so a histogram is a few integers per op and an observation is a bisect and two
additions (about 0.5 µs with the two clock reads, against tens of µs for a single put).

Threads: the event loop observes (every request), the metrics endpoint reads (every
scrape, from prometheus-client's server thread).  One ``threading.Lock`` guards all the
histograms; it is held for a few additions or one copy, so the loop never waits long.
This module knows nothing of Prometheus: :mod:`memd.agent.metrics` turns a
:meth:`LatencyHistograms.snapshot` into its text format.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

#: Upper bounds in seconds.  A single put or get is tens of microseconds, a 256-page
#: batch a few milliseconds, a put that makes the store evict or spill more.
BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)


@dataclass(frozen=True)
class HistogramSnapshot:
    """One op's histogram at one moment: non-cumulative counts per bucket of
    :data:`BUCKETS`, then the count above the last bound."""

    counts: tuple[int, ...]
    total_seconds: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class LatencyHistograms:
    """Histograms keyed by op name (``put``, ``get_batch``, ...).  Thread-safe."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()
        #: op → [counts per bucket..., count above the last], and op → sum of seconds;
        #: both guarded by _lock.
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)  # le semantics: a bound includes itself
        with self._lock:
            counts = self._counts.get(op)
            if counts is None:
                counts = self._counts[op] = [0] * (len(self.buckets) + 1)
                self._sums[op] = 0.0
            counts[i] += 1
            self._sums[op] += seconds

    def snapshot(self) -> dict[str, HistogramSnapshot]:
        with self._lock:
            return {
                op: HistogramSnapshot(tuple(c), self._sums[op]) for op, c in self._counts.items()
            }
