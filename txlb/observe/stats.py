# -*- test-case-name: tests.test_metrics -*-
"""
Live figures for C{/api/stats} and the status page: request rates, latency
percentiles and 5xx rates over sliding windows, in bounded memory.

A L{Window} is a ring of one-second slots.  Each slot holds a count, a 5xx
count and a sparse log-scale latency histogram (buckets 5% wide), so
recording a request is a few dictionary and list operations, and a
percentile over the last minute is a merge of at most sixty small
histograms, done only when someone asks.  Memory is fixed by the ring's
length whatever the traffic: a percentile is accurate to the bucket width
(about 2.5%), not to the microsecond.

L{DecisionLog} is the ring of the last routing decisions.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Optional

#: Latency histogram resolution: bucket i holds latencies around
#: C{_FLOOR * _RATIO ** i} seconds.
_RATIO = 1.05
_SCALE = 1 / math.log(_RATIO)
_FLOOR = 1e-5
_LOG = math.log


def latencyBucket(seconds: float) -> int:
    """The histogram bucket of a latency (0 for anything under 10 µs)."""
    if seconds <= _FLOOR:
        return 0
    return int(_LOG(seconds / _FLOOR) * _SCALE) + 1


def bucketSeconds(bucket: int) -> float:
    """A latency representative of C{bucket}: its geometric middle."""
    if bucket <= 0:
        return _FLOOR
    return _FLOOR * _RATIO ** (bucket - 0.5)


class Window:
    """
    The last C{length} seconds of traffic of one scope (everything, one
    service, one pool), one slot per second.

    A slot is a list C{[second, count, errors, histogram]}; a slot whose
    second is not the one being asked about is stale and reads as empty.
    """

    __slots__ = ("length", "ring")

    def __init__(self, length: int = 300) -> None:
        self.length = length
        self.ring = [[-1, 0, 0, None] for _ in range(length)]

    def add(self, second: int, bucket: Optional[int], error: bool) -> None:
        """
        Count one request finished at C{second} (an integer timestamp), with
        its latency bucket (L{None}: no latency, e.g. a TCP connection) and
        whether it was a 5xx.
        """
        slot = self.ring[second % self.length]
        if slot[0] != second:
            slot[0] = second
            slot[1] = 0
            slot[2] = 0
            slot[3] = {}
        slot[1] += 1
        if error:
            slot[2] += 1
        if bucket is not None:
            histogram = slot[3]
            histogram[bucket] = histogram.get(bucket, 0) + 1

    def slots(self) -> list[list]:
        """
        The slots in use, as plain lists (C{[second, count, errors,
        {bucket: n}]}): what a worker process sends the master, which adds
        them into its own window with L{merge}.
        """
        return [list(slot) for slot in self.ring if slot[0] >= 0]

    def merge(self, slots: Iterable[list]) -> None:
        """
        Add another window's L{slots} (histogram keys may arrive as strings,
        from JSON) into this one.  Windows of the same length and clock add
        up exactly: counts and histograms are sums.
        """
        ring = self.ring
        length = self.length
        for second, count, errors, histogram in slots:
            second = int(second)
            slot = ring[second % length]
            if slot[0] != second:
                if slot[0] > second:
                    continue  # older than what this slot already holds
                slot[0], slot[1], slot[2], slot[3] = second, 0, 0, {}
            slot[1] += count
            slot[2] += errors
            mine = slot[3]
            for bucket, n in (histogram or {}).items():
                bucket = int(bucket)
                mine[bucket] = mine.get(bucket, 0) + n

    def _slots(self, now: float, seconds: int) -> Iterable[list]:
        current = int(now)
        first = current - seconds + 1
        for slot in self.ring:
            if first <= slot[0] <= current:
                yield slot

    def count(self, now: float, seconds: int) -> tuple[int, int]:
        """Requests and 5xx answers in the last C{seconds} (this one included)."""
        total = errors = 0
        for slot in self._slots(now, seconds):
            total += slot[1]
            errors += slot[2]
        return total, errors

    def percentiles(self, now: float, seconds: int, quantiles: Iterable[float]) -> list[Optional[float]]:
        """
        Latency quantiles, in seconds, over the last C{seconds}; L{None}
        for each when nothing was measured.
        """
        merged: dict[int, int] = {}
        for slot in self._slots(now, seconds):
            for bucket, n in slot[3].items():
                merged[bucket] = merged.get(bucket, 0) + n
        return quantilesOf(merged, quantiles)

    def history(self, now: float, seconds: int, step: int) -> list[dict[str, Any]]:
        """
        The last C{seconds} as points C{step} seconds apart, oldest first:
        C{{"t", "rps", "p95Ms", "errors"}} for charts.  The second under way
        is left out (it would read low); the newest point may span fewer
        than C{step} seconds, and its rate is over the seconds it spans.
        """
        current = int(now) - 1
        slots = {slot[0]: slot for slot in self._slots(current, seconds)}
        points = []
        start = current - seconds + 1
        start -= start % step
        for t in range(start, current + 1, step):
            count = errors = 0
            merged: dict[int, int] = {}
            for second in range(t, min(t + step, current + 1)):
                slot = slots.get(second)
                if slot is None:
                    continue
                count += slot[1]
                errors += slot[2]
                for bucket, n in slot[3].items():
                    merged[bucket] = merged.get(bucket, 0) + n
            span = min(t + step, current + 1) - t
            [p95] = quantilesOf(merged, (0.95,))
            points.append({
                "t": t,
                "rps": round(count / span, 3),
                "p95Ms": None if p95 is None else round(p95 * 1000, 3),
                "errors": errors,
            })
        return points


def quantilesOf(histogram: dict[int, int], quantiles: Iterable[float]) -> list[Optional[float]]:
    """Quantiles (seconds) of a bucket histogram; nearest-rank."""
    total = sum(histogram.values())
    if not total:
        return [None for _ in quantiles]
    ordered = sorted(histogram.items())
    out = []
    for q in quantiles:
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bucket, n in ordered:
            seen += n
            if seen >= rank:
                out.append(bucketSeconds(bucket))
                break
    return out


class DecisionLog:
    """
    The last C{size} routing decisions, oldest dropped first.

    A decision is stored as the tuple the proxy hands over; it becomes a
    dict only when C{/api/decisions} asks, so the hot path allocates one
    tuple.
    """

    FIELDS = (
        "time", "requestId", "service", "pool", "algorithm", "selectedServer", "reason",
        "serverActiveConnections", "serverResponseTimeMs", "serverWeight", "retried", "status",
    )

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._ring: deque[tuple] = deque(maxlen=size)
        self.append = self._ring.append

    def __len__(self) -> int:
        return len(self._ring)

    def last(self, limit: int) -> list[dict[str, Any]]:
        """The newest C{limit} decisions, newest first."""
        ring = self._ring
        out = []
        for i in range(1, min(limit, len(ring)) + 1):
            record = dict(zip(self.FIELDS, ring[-i]))
            record["serverResponseTimeMs"] = round(record["serverResponseTimeMs"] * 1000, 3)
            out.append(record)
        return out
