"""
A txlb scheduler plugin: "failover" sends every connection to the first
server of a preference list that is up, and to the next one only when the
first is down or has just failed.
"""

from typing import Collection, Mapping, Optional, Sequence

from twisted.plugin import IPlugin
from zope.interface import implementer

from txlb.interfaces import (
    Decision,
    IScheduler,
    ISchedulerFactory,
    PickContext,
    SchedulerOptionsError,
)


@implementer(IScheduler)
class Failover:
    def __init__(self, order: Sequence[str]) -> None:
        self._rank = {name: rank for rank, name in enumerate(order)}
        self._servers: list = []

    def setServers(self, servers: Sequence) -> None:
        # Called whenever a server goes up or down: sort once here, not per pick.
        # Servers the order does not name come last, in config order.
        last = len(self._rank)
        self._servers = sorted(servers, key=lambda s: self._rank.get(s.name, last))

    def loadChanged(self, server) -> None:
        pass  # load does not matter to this algorithm

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        for server in self._servers:
            if server not in exclude:
                return Decision(server, "first available server in preference order")
        return None


@implementer(IPlugin, ISchedulerFactory)
class FailoverFactory:
    name = "failover"
    description = "every connection to the first available server of options.order"

    def __call__(self, options: Mapping[str, object]) -> IScheduler:
        unknown = set(options) - {"order"}
        if unknown:
            raise SchedulerOptionsError(f"unknown option {', '.join(sorted(unknown))}")
        order = options.get("order", [])
        if not isinstance(order, (list, tuple)) or not all(isinstance(n, str) for n in order):
            raise SchedulerOptionsError("order must be a list of server names")
        return Failover(order)


failover = FailoverFactory()
