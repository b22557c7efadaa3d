# -*- test-case-name: tests.test_schedulers_rotation -*-
"""
Rotation schedulers: each eligible server in turn.
"""

from __future__ import annotations

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


roundRobin = SchedulerFactory(
    "round_robin", "each eligible server in turn, weights ignored", RoundRobin
)
