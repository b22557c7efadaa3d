"""
Helpers shared by the built-in schedulers, and usable by plugins.
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping, Optional, Sequence

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from txlb.interfaces import (
    Decision,
    IScheduler,
    ISchedulerFactory,
    PickContext,
    SchedulerOptionsError,
)


@implementer(IPlugin, ISchedulerFactory)
@attrs.frozen
class SchedulerFactory:
    """
    The plugin object for a scheduler class whose constructor takes the
    pool's C{options} mapping.
    """

    name: str
    description: str
    makeScheduler: Callable[[Mapping[str, object]], IScheduler]

    def __call__(self, options: Mapping[str, object]) -> IScheduler:
        return self.makeScheduler(options)


def noOptions(name: str, options: Mapping[str, object]) -> None:
    """
    Refuse any option: for schedulers that take none.
    """
    if options:
        raise SchedulerOptionsError(
            f"{name} takes no options (got {', '.join(sorted(options))})"
        )


@implementer(IScheduler)
class SchedulerBase:
    """
    Keeps the eligible list; subclasses implement L{pick}.
    """

    servers: Sequence

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        self.servers = ()

    def setServers(self, servers: Sequence) -> None:
        self.servers = tuple(servers)

    def loadChanged(self, server) -> None:
        pass

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        raise NotImplementedError()
