# -*- test-case-name: tests.test_schedulers_least -*-
"""
"Least" schedulers: the server with the lowest load by some live figure.

Scanning every server on each pick costs about 0.1 µs a server in CPython,
too much for large pools, so each scheduler keeps a structure that the
pool's notifications (L{IScheduler.setServers} and
L{IScheduler.loadChanged}) update incrementally, as HAProxy's C{lb_fwlc.c}
does with its tree: buckets by connection count for least connections, a
heap with lazy deletion for the others.
"""

from __future__ import annotations

from collections import OrderedDict
from heapq import heapify, heappop, heappush, heapreplace
from itertools import count
from typing import Callable, Collection, Hashable, Mapping, Optional, Sequence

from txlb.balance.schedulers._base import SchedulerBase, SchedulerFactory, noOptions
from txlb.interfaces import Decision, PickContext


class LeastConnections(SchedulerBase):
    """
    The server with the fewest connections in flight; weights are not used.

    Servers are kept in buckets by their active count, each bucket ordered
    by when the server entered it.  A pick takes the first server of the
    lowest bucket and moves it to the end, so that equal loads are served
    in rotation instead of piling onto the first server, and a pick or a
    load change is M{O(1)} whatever the size of the pool.
    """

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        noOptions("least_connections", options)
        super().__init__(options)
        self._buckets: dict[int, OrderedDict] = {}
        self._where: dict = {}
        self._min = 0

    def setServers(self, servers: Sequence) -> None:
        super().setServers(servers)
        self._buckets = {}
        self._where = {}
        for server in self.servers:
            self._enter(server, server.active)
        self._min = min(self._buckets) if self._buckets else 0

    def _enter(self, server, active: int) -> None:
        bucket = self._buckets.get(active)
        if bucket is None:
            bucket = self._buckets[active] = OrderedDict()
        bucket[server] = None
        self._where[server] = active

    def loadChanged(self, server) -> None:
        old = self._where.get(server)
        new = server.active
        if old is None or old == new:
            return
        bucket = self._buckets[old]
        del bucket[server]
        if not bucket:
            del self._buckets[old]
        self._enter(server, new)
        if new < self._min:
            self._min = new
        elif old == self._min and old not in self._buckets:
            self._min = new if new == old + 1 else min(self._buckets)

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        if not self._buckets:
            return None
        if not exclude:
            active = self._min
            bucket = self._buckets[active]
            server = next(iter(bucket))
            bucket.move_to_end(server)
            return Decision(server, f"fewest active connections ({active})")
        for active in sorted(self._buckets):
            bucket = self._buckets[active]
            for server in bucket:
                if server not in exclude:
                    bucket.move_to_end(server)
                    return Decision(server, f"fewest active connections ({active})")
        return None


class _KeyedHeap:
    """
    A min-heap of servers ordered by C{keyOf(server)}, a key that changes
    over time.

    L{update} pushes a fresh entry (unless the key is unchanged) and leaves
    the old one in place, marked stale by its sequence number; stale entries are dropped when they reach
    the top, and the heap is compacted when they outnumber the live ones.
    Before a server is returned its key is computed again: a key that grew
    without an L{update} (bandwidth does, see L{LeastBandwidth}) is pushed
    anew.  Equal keys are served in the order the entries were pushed, so a
    server just picked goes behind its equals.
    """

    def __init__(self, keyOf: Callable[[object], Hashable]) -> None:
        self._keyOf = keyOf
        self._heap: list = []
        self._live: dict = {}
        self._keys: dict = {}
        self._seq = count()

    def reset(self, servers: Sequence) -> None:
        self._live = {}
        self._keys = {}
        self._heap = []
        for server in servers:
            seq = next(self._seq)
            key = self._keyOf(server)
            self._live[server] = seq
            self._keys[server] = key
            self._heap.append((key, seq, server))
        heapify(self._heap)

    def update(self, server) -> None:
        live = self._keys.get(server)
        if live is None:
            return
        key = self._keyOf(server)
        if key == live:
            return  # a change this order does not depend on
        seq = next(self._seq)
        self._live[server] = seq
        self._keys[server] = key
        heappush(self._heap, (key, seq, server))
        if len(self._heap) > 2 * len(self._live) + 32:
            live = self._live
            self._heap = [e for e in self._heap if live[e[2]] == e[1]]
            heapify(self._heap)

    def smallest(self, exclude: Collection):
        """
        The server with the smallest key that is not in C{exclude}, and
        that key; or C{(None, None)}.
        """
        heap = self._heap
        live = self._live
        skipped = []
        found = (None, None)
        while heap:
            key, seq, server = heap[0]
            if live[server] != seq:
                heappop(heap)
                continue
            current = self._keyOf(server)
            if current != key:
                seq = next(self._seq)
                live[server] = seq
                self._keys[server] = current
                heapreplace(heap, (current, seq, server))
                continue
            if exclude and server in exclude:
                skipped.append(heappop(heap))
                continue
            found = (server, key)
            break
        for entry in skipped:
            heappush(heap, entry)
        return found


class _HeapScheduler(SchedulerBase):
    """
    A scheduler that picks the server with the smallest C{key(server)},
    kept in a L{_KeyedHeap} that L{loadChanged} re-keys.
    """

    name = ""

    @staticmethod
    def key(server) -> tuple:
        raise NotImplementedError()

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        noOptions(self.name, options)
        super().__init__(options)
        self._heap = _KeyedHeap(self.key)

    def setServers(self, servers: Sequence) -> None:
        super().setServers(servers)
        self._heap.reset(self.servers)

    def loadChanged(self, server) -> None:
        self._heap.update(server)


def _responseKey(server) -> tuple:
    """
    Servers never measured come first while idle, so each gets tried; then
    the measured ones by M{(active + 1) × responseTime}; then the unmeasured
    ones that are busy, which are still waiting for their first answer.
    """
    rt = server.responseTime
    if rt > 0.0:
        return (1, (server.active + 1) * rt)
    return (0 if server.active == 0 else 2, server.active)


class LeastResponseTime(_HeapScheduler):
    """
    The server with the lowest M{(active + 1) × responseTime}: the expected
    wait for a new request if each in flight takes the moving average.  With
    40 connections at 180 ms, 55 at 90 ms and 20 at 300 ms the scores are
    7.38, 5.04 and 6.3: the 90 ms server wins.

    The pool calls L{loadChanged} when C{active} or C{responseTime}
    changes, which is when this scheduler re-keys the server.
    """

    name = "least_response_time"
    key = staticmethod(_responseKey)

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        server, key = self._heap.smallest(exclude)
        if server is None:
            return None
        tier = key[0]
        if tier == 1:
            reason = (
                "best balance of active connections and response time "
                f"({server.active} active, {server.responseTime * 1000:.0f} ms)"
            )
        elif tier == 0:
            reason = "not measured yet: trying it"
        else:
            reason = f"no response time yet anywhere idle; fewest waiting ({server.active})"
        return Decision(server, reason)


def _bandwidthKey(server) -> tuple:
    return (server.bandwidthRank(), server.active)


class LeastBandwidth(_HeapScheduler):
    """
    The server with the lowest current bytes per second (both directions,
    decaying); between equals, the fewest active connections.

    The rate decays as M{r · e^(-(now - t)/τ)} after the last sample at
    M{t}, so ordering servers by it at any single moment is ordering them
    by M{log r + t/τ} -- L{Server.bandwidthRank} -- which does not depend
    on the moment and only ever grows as bytes flow.  The scheduler
    therefore needs no clock, and a heap keyed on the rank stays correct
    without being told about every byte: a key found to have grown when it
    reaches the top is simply pushed again.
    """

    name = "least_bandwidth"
    key = staticmethod(_bandwidthKey)

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        server, key = self._heap.smallest(exclude)
        if server is None:
            return None
        if key[0] == float("-inf"):
            return Decision(server, f"no traffic yet; fewest active connections ({server.active})")
        return Decision(server, "lowest recent bandwidth")


leastConnections = SchedulerFactory(
    "least_connections",
    "the server with the fewest connections in flight, ties in rotation",
    LeastConnections,
)
leastResponseTime = SchedulerFactory(
    "least_response_time",
    "the lowest (active + 1) × average response time",
    LeastResponseTime,
)
leastBandwidth = SchedulerFactory(
    "least_bandwidth",
    "the lowest current bytes per second through the server",
    LeastBandwidth,
)
