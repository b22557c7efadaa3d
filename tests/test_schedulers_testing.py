"""
txlb.testing: the fake pool drives a scheduler as the real pool does, and
the contract check catches the mistakes a plugin author can make.
"""

from __future__ import annotations

from typing import Collection, Optional

import pytest

from txlb.balance.schedulers import SchedulerBase, SchedulerFactory
from txlb.balance.schedulers.least import LeastConnections
from txlb.interfaces import Decision, PickContext
from txlb.testing import FakePool, verifySchedulerFactory


class _First(SchedulerBase):
    """Always the first eligible server, honouring exclude."""

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        for server in self.servers:
            if server not in exclude:
                return Decision(server, "first")
        return None


class _IgnoresExclude(SchedulerBase):
    def pick(self, context, exclude):
        return Decision(self.servers[0], "first") if self.servers else None


class _NoReason(_First):
    def pick(self, context, exclude):
        decision = super().pick(context, exclude)
        return decision and decision._replace(reason="")


class _Stale(_First):
    """Remembers the first set it saw: picks removed servers."""

    def setServers(self, servers):
        if not self.servers:
            super().setServers(servers)


def _factory(cls) -> SchedulerFactory:
    return SchedulerFactory(cls.__name__, "test", lambda options: cls(options))


def test_a_correct_scheduler_passes():
    verifySchedulerFactory(_factory(_First))


@pytest.mark.parametrize(
    "cls, message",
    [
        (_IgnoresExclude, "not one of"),
        (_NoReason, "needs a reason"),
        (_Stale, "not one of"),
    ],
)
def test_broken_schedulers_are_caught(cls, message):
    with pytest.raises(AssertionError, match=message):
        verifySchedulerFactory(_factory(cls))


def test_a_factory_not_providing_the_interface_is_caught():
    from zope.interface.exceptions import Invalid

    with pytest.raises(Invalid):
        verifySchedulerFactory(lambda options: _First(options))


def test_fake_pool_counts_like_the_real_pool():
    pool = FakePool(LeastConnections(), ["a", ("b", 2)])
    assert pool.server("b").weight == 2
    decision = pool.pick()
    assert pool.server(decision.server.name).active == 1
    pool.release(decision)
    assert [s.active for s in pool.servers] == [0, 0]
    assert pool.hold(2) == ["b", "a"]


def test_fake_pool_clock_drives_bandwidth():
    pool = FakePool(LeastConnections(), ["a"])
    pool.transfer("a", 1000)
    rate = pool.bandwidth("a")
    pool.advance(10)
    assert 0 < pool.bandwidth("a") < rate


def test_fake_pool_membership_changes():
    pool = FakePool(LeastConnections(), ["a", "b"])
    pool.add("c", weight=3)
    pool.remove("a")
    pool.down("b")
    assert set(pool.sequence(4)) == {"c"}
    pool.up("b")
    assert set(pool.sequence(4)) == {"b", "c"}
