# -*- test-case-name: tests.test_schedulers_randomized -*-
"""
Randomised schedulers.  They need no shared state between picks, which is
why Envoy and HAProxy now default to the power of two choices: it is
nearly as good as least connections, costs two random numbers, and cannot
make several balancers in front of the same servers send a burst to the
same one.

Each takes an optional C{random.Random} so that tests can make it
deterministic; the factory gives every pool its own, seeded by the system.
"""

from __future__ import annotations

import random as _random
from bisect import bisect_right
from itertools import accumulate
from typing import Collection, Mapping, Optional, Sequence

from txlb.balance.schedulers._base import SchedulerBase, SchedulerFactory, noOptions
from txlb.interfaces import Decision, PickContext

#: Draws tried before a randomised scheduler that is retrying a connection
#: falls back to listing the servers not yet tried.
_REJECTION_TRIES = 8


class Random(SchedulerBase):
    """
    A random server, with probability in proportion to its weight.
    """

    def __init__(
        self, options: Mapping[str, object] = {}, random: Optional[_random.Random] = None
    ) -> None:
        noOptions("random", options)
        super().__init__(options)
        self._random = random or _random.Random()
        self._cumulative: list[int] = []
        self._total = 0

    def setServers(self, servers: Sequence) -> None:
        super().setServers(servers)
        self._cumulative = list(accumulate(s.weight for s in self.servers))
        self._total = self._cumulative[-1] if self._cumulative else 0

    def _draw(self):
        return self.servers[bisect_right(self._cumulative, self._random.random() * self._total)]

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        if not self.servers:
            return None
        if exclude:
            for _ in range(_REJECTION_TRIES):
                server = self._draw()
                if server not in exclude:
                    break
            else:
                left = [s for s in self.servers if s not in exclude]
                if not left:
                    return None
                server = self._random.choices(left, [s.weight for s in left])[0]
        else:
            server = self._draw()
        return Decision(server, "random pick")


class PowerOfTwo(SchedulerBase):
    """
    Two distinct servers drawn at random; the one with fewer connections in
    flight wins (the first drawn on a tie).  The busiest of three or more
    servers can thus never be chosen, and load evens out without a scan.
    """

    def __init__(
        self, options: Mapping[str, object] = {}, random: Optional[_random.Random] = None
    ) -> None:
        noOptions("power_of_two", options)
        super().__init__(options)
        self._random = random or _random.Random()

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        servers = self.servers
        if exclude:
            servers = [s for s in servers if s not in exclude]
        count = len(servers)
        if count < 2:
            if count == 0:
                return None
            return Decision(servers[0], "the only server left")
        draw = self._random.random
        first = int(draw() * count)
        second = int(draw() * (count - 1))
        if second >= first:
            second += 1
        a = servers[first]
        b = servers[second]
        if b.active < a.active:
            a, b = b, a
        return Decision(
            a, f"fewer active connections of two random picks ({a.active} vs {b.active})"
        )


randomPick = SchedulerFactory("random", "a random server, in proportion to weight", Random)
powerOfTwo = SchedulerFactory(
    "power_of_two",
    "two random servers, the one with fewer connections in flight wins",
    PowerOfTwo,
)
