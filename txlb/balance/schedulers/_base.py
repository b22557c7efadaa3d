"""
Helpers shared by the built-in schedulers, and usable by plugins.

The public names are re-exported from L{txlb.balance.schedulers}; import them from
there.
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


def intOption(
    name: str,
    options: Mapping[str, object],
    key: str,
    default: int,
    low: int,
    high: int,
) -> int:
    """
    Read one integer option, refusing any other option name, so that a typo
    in the config is reported instead of silently ignored.
    """
    unknown = set(options) - {key}
    if unknown:
        raise SchedulerOptionsError(
            f"{name} takes only the option {key!r} (got {', '.join(sorted(unknown))})"
        )
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SchedulerOptionsError(
            f"{name}: {key} must be an integer from {low} to {high} (got {value!r})"
        )
    return value


@implementer(IScheduler)
class SchedulerBase:
    """
    Keeps the eligible list; subclasses implement L{pick}.

    A server whose weight is 0 takes no new traffic, as in HAProxy, so it is
    left out here for every algorithm, weighted or not.
    """

    servers: Sequence

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        self.servers = ()

    def setServers(self, servers: Sequence) -> None:
        self.servers = tuple(s for s in servers if s.weight > 0)

    def loadChanged(self, server) -> None:
        pass

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        raise NotImplementedError()
