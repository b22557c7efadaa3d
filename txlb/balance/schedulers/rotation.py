# -*- test-case-name: tests.test_schedulers_rotation -*-
"""
Rotation schedulers: each eligible server in turn, or in proportion to its
weight.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush, heapreplace
from typing import Collection, Mapping, Optional, Sequence

from txlb.balance.schedulers._base import SchedulerBase, SchedulerFactory, noOptions
from txlb.interfaces import Decision, PickContext


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

    Server M{i} of M{n}, of weight M{w}, is due at the times
    M{(k - 1 + φ) / w} for M{k = 1..w} of each cycle: M{w} evenly spaced
    turns, shifted by a phase M{φ = (i + ½) / n} in M{[0, 1)} so that
    servers of equal spacing do not all fall due together.  The servers are
    taken in order of due time.  As every turn falls inside its cycle, a
    cycle holds exactly M{w} turns of each server, and any window of
    M{sum(weights)} consecutive picks does too; the phases keep runs short
    (weights 5, 1, 1 give a a a b a a c, never five a's in a row, which
    equal phases would give across the end of a cycle).  A heap of each
    server's next turn makes a pick M{O(log n)}, with no table of
    M{sum(weights)} entries.

    Heap entries are C{(cycle, due, index, k, server)}: the cycle is an
    integer so that cycle boundaries are exact; the index breaks ties in
    configuration order and is unique, so servers are never compared.
    """

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        noOptions("weighted_round_robin", options)
        super().__init__(options)
        self._heap: list = []
        self._phase: list[float] = []

    def setServers(self, servers: Sequence) -> None:
        """
        A new eligible set (or new weights) starts a new cycle.
        """
        super().setServers(servers)
        count = len(self.servers)
        self._phase = [(index + 0.5) / count for index in range(count)]
        self._heap = [
            (0, self._phase[index] / server.weight, index, 1, server)
            for index, server in enumerate(self.servers)
        ]
        heapify(self._heap)

    def _after(self, entry: tuple) -> tuple:
        cycle, due, index, k, server = entry
        weight = server.weight
        if k < weight:
            return (cycle, (k + self._phase[index]) / weight, index, k + 1, server)
        return (cycle + 1, self._phase[index] / weight, index, 1, server)

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
