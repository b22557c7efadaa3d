# -*- test-case-name: tests.test_schedulers -*-
"""
The scheduling algorithms, by the name C{algorithm =} uses, and what a
plugin author needs to write another.

Algorithms are found with L{twisted.plugin.getPlugins} against
L{ISchedulerFactory}: txlb's built-ins are declared in
C{twisted/plugins/txlb_schedulers.py} like any third party's.  The built-ins
are also listed here so that txlb works from a source tree whose plugin
directory is not on C{sys.path}.

One module per family, as HAProxy has one file per family:
L{rotation <txlb.balance.schedulers.rotation>}, L{least <txlb.balance.schedulers.least>},
L{hashing <txlb.balance.schedulers.hashing>} and
L{randomized <txlb.balance.schedulers.randomized>}.
"""

from __future__ import annotations

from typing import Mapping

from twisted.logger import Logger
from twisted.plugin import getPlugins

from txlb.balance.schedulers._base import SchedulerBase, SchedulerFactory, noOptions
from txlb.balance.schedulers.hashing import consistentHash, ipHash
from txlb.balance.schedulers.least import leastBandwidth, leastConnections, leastResponseTime
from txlb.balance.schedulers.randomized import powerOfTwo, randomPick
from txlb.balance.schedulers.rotation import roundRobin, weightedRoundRobin
from txlb.interfaces import ISchedulerFactory

__all__ = [
    "BUILTINS",
    "DEFAULT_ALGORITHM",
    "SchedulerBase",
    "SchedulerFactory",
    "noOptions",
    "schedulerFactories",
]

_log = Logger()

#: The default when a pool does not name an algorithm, as in HAProxy and
#: Envoy: close to least connections, with no shared state to contend on.
DEFAULT_ALGORITHM = "power_of_two"

BUILTINS: tuple[ISchedulerFactory, ...] = (
    roundRobin,
    weightedRoundRobin,
    leastConnections,
    leastResponseTime,
    leastBandwidth,
    ipHash,
    consistentHash,
    randomPick,
    powerOfTwo,
)


def schedulerFactories() -> Mapping[str, ISchedulerFactory]:
    """
    Every scheduler factory installed, by name.  A plugin that reuses a
    built-in name is ignored, with a warning.
    """
    found: dict[str, ISchedulerFactory] = {f.name: f for f in BUILTINS}
    import twisted.plugins

    for factory in getPlugins(ISchedulerFactory, twisted.plugins):
        existing = found.get(factory.name)
        if existing is None:
            found[factory.name] = factory
        elif existing is not factory and existing != factory:
            _log.warn(
                "scheduler plugin {name!r} ignored: the name is taken",
                event="plugin_conflict",
                name=factory.name,
            )
    return found
