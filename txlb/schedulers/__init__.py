# -*- test-case-name: tests.test_schedulers -*-
"""
The registry of scheduling algorithms, by the name C{algorithm =} uses.

Algorithms are found with L{twisted.plugin.getPlugins} against
L{ISchedulerFactory}: txlb's built-ins are declared in
C{twisted/plugins/txlb_schedulers.py} like any third party's.  The built-ins
are also listed here so that txlb works from a source tree whose plugin
directory is not on C{sys.path}.
"""

from __future__ import annotations

from typing import Mapping

from twisted.logger import Logger
from twisted.plugin import getPlugins

from txlb.interfaces import ISchedulerFactory
from txlb.schedulers.rotation import roundRobin

_log = Logger()

#: The default when a pool does not name an algorithm.
DEFAULT_ALGORITHM = "round_robin"

BUILTINS: tuple[ISchedulerFactory, ...] = (roundRobin,)


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
