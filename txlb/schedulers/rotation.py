# -*- test-case-name: tests.test_schedulers_rotation -*-
"""
Rotation schedulers: each eligible server in turn, or in proportion to its
weight.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import Collection, Mapping, Optional, Sequence

from txlb.interfaces import Decision, PickContext
from txlb.schedulers._base import SchedulerBase, SchedulerFactory, noOptions


class RoundRobin(SchedulerBase):
    """
    Every eligible server in turn, weights ignored.  The position survives
    changes of the eligible set, so a server going down does not send the
    next pick back to the first server.
    """

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        noOptions("round_robin", options)
        super().__init__(options)
        self._next = 0

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        servers = self.servers
        count = len(servers)
        for step in range(count):
            index = (self._next + step) % count
            server = servers[index]
            if server not in exclude:
                self._next = index + 1
                return Decision(server, "round robin")
        return None


class WeightedRoundRobin(SchedulerBase):
    """
    Smooth weighted round robin: every cycle of C{sum(weights)} picks gives
    each server exactly its weight, spread through the cycle rather than in
    bursts.

    Server M{i} of weight M{w} is due at the times M{(2k - 1) / 2w} for
    M{k = 1..w} of each cycle -- the middles of M{w} equal slices of the
    cycle -- and the servers are taken in order of due time.  A cycle thus
    holds exactly M{w} turns of each server, interleaved (weights 5, 1, 1
    give A A A B C A A ... never five As in a row), and a heap of the next
    due turn of each server makes a pick M{O(log n)} with no table of
    M{sum(weights)} entries.

    Heap entries are C{(cycle, due, index, k, server)}: the cycle is an
    integer so that cycle boundaries are exact, the index breaks ties in
    configuration order and is unique, so servers are never compared.
    """

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        noOptions("weighted_round_robin", options)
        super().__init__(options)
        self._heap: list = []

    def setServers(self, servers: Sequence) -> None:
        """
        A new eligible set (or new weights) starts a new cycle.
        """
        super().setServers(servers)
        self._heap = [
            (0, 0.5 / server.weight, index, 1, server)
            for index, server in enumerate(self.servers)
        ]
        heapify(self._heap)

    @staticmethod
    def _after(entry: tuple) -> tuple:
        cycle, due, index, k, server = entry
        weight = server.weight
        if k < weight:
            return (cycle, (2 * k + 1) / (2 * weight), index, k + 1, server)
        return (cycle + 1, 0.5 / weight, index, 1, server)

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        heap = self._heap
        if not heap:
            return None
        entry = heap[0]
        server = entry[4]
        if not exclude or server not in exclude:
            heapreplace(heap, self._after(entry))
            return Decision(server, f"weighted round robin (weight {server.weight})")
        # Retrying: skip the servers already tried without using their turn.
        skipped = []
        chosen = None
        while heap:
            entry = heappop(heap)
            if entry[4] in exclude:
                skipped.append(entry)
            else:
                heappush(heap, self._after(entry))
                chosen = entry[4]
                break
        for entry in skipped:
            heappush(heap, entry)
        if chosen is None:
            return None
        return Decision(chosen, f"weighted round robin (weight {chosen.weight})")


roundRobin = SchedulerFactory(
    "round_robin", "each eligible server in turn, weights ignored", RoundRobin
)
weightedRoundRobin = SchedulerFactory(
    "weighted_round_robin",
    "smooth weighted rotation: each cycle gives every server exactly its weight",
    WeightedRoundRobin,
)
