# -*- test-case-name: tests.test_schedulers_testing -*-
"""
Test doubles for people who write txlb schedulers.

As C{treq.testing} lets code that uses treq be tested without a network,
this module lets a scheduler be driven exactly as txlb's pool drives it --
the same L{txlb.balance.pool.Pool}, the same notifications, in the same order --
but with a L{twisted.internet.task.Clock} and no reactor or sockets, so a
test runs in microseconds and can set every live figure a scheduler reads.

    from txlb.testing import FakePool, verifySchedulerFactory

    pool = FakePool(MyScheduler({}), ["a", "b", ("c", 3)])
    counts = pool.distribution(100)     # pick and release 100 times
    pool.setActive("a", 45)             # as if 45 connections were open
    decision = pool.pick(client="127.0.0.7")
    verifySchedulerFactory(myFactory)   # the contract every scheduler keeps
"""

from __future__ import annotations

from collections import Counter
from typing import Collection, Iterable, Mapping, Optional, Sequence, Union

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from txlb.balance.pool import Pool, Server, ServerState
from txlb.interfaces import Decision, IScheduler, ISchedulerFactory, PickContext

__all__ = ["FakePool", "verifySchedulerFactory"]

ServerSpec = Union[str, tuple[str, int], Server]
ServerRef = Union[str, Server]


def _server(spec: ServerSpec, port: int) -> Server:
    if isinstance(spec, Server):
        return spec
    if isinstance(spec, tuple):
        name, weight = spec
    else:
        name, weight = spec, 1
    return Server(name, f"tcp:host=127.0.0.1:port={port}", weight)


class FakePool:
    """
    A pool of fake servers around the scheduler under test.

    @param scheduler: the L{IScheduler} to drive.
    @param servers: names, C{(name, weight)} pairs or L{Server}s.
    @param clock: the clock bandwidth is measured against; a fresh
        L{Clock} by default.
    @ivar pool: the real L{Pool}, for anything not wrapped here.
    """

    def __init__(
        self,
        scheduler: IScheduler,
        servers: Iterable[ServerSpec] = (),
        clock: Optional[Clock] = None,
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock if clock is not None else Clock()
        made = [_server(spec, 10000 + i) for i, spec in enumerate(servers)]
        self.pool = Pool("test", "test", scheduler, made, self.clock)

    def _get(self, server: ServerRef) -> Server:
        return self.pool.server(server) if isinstance(server, str) else server

    @property
    def servers(self) -> list[Server]:
        return list(self.pool)

    def server(self, name: str) -> Server:
        return self.pool.server(name)

    # Changing the pool, as health checks and operators do.

    def add(self, name: str, weight: int = 1) -> Server:
        server = _server((name, weight), 10000 + len(self.pool))
        self.pool.add(server)
        return server

    def remove(self, server: ServerRef) -> None:
        self.pool.remove(self._get(server))

    def down(self, server: ServerRef) -> None:
        self.pool.setState(self._get(server), ServerState.DOWN)

    def up(self, server: ServerRef) -> None:
        self.pool.setState(self._get(server), ServerState.UP)

    def setWeight(self, server: ServerRef, weight: int) -> None:
        self.pool.setWeight(self._get(server), weight)

    # Changing live figures, as traffic does.

    def setActive(self, server: ServerRef, active: int) -> None:
        """
        As if C{active} connections were in flight to C{server}.
        """
        s = self._get(server)
        s.active = active
        self.scheduler.loadChanged(s)

    def observeResponseTime(self, server: ServerRef, seconds: float) -> None:
        self.pool.observeResponseTime(self._get(server), seconds)

    def transfer(self, server: ServerRef, count: int) -> None:
        """
        C{count} bytes went through C{server} now.
        """
        self.pool.observeBytes(self._get(server), count, 0)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def bandwidth(self, server: ServerRef) -> float:
        return self.pool.bandwidth(self._get(server))

    # Picking.

    def pick(
        self,
        client: str = "127.0.0.1",
        key: Optional[str] = None,
        exclude: Collection[ServerRef] = (),
    ) -> Optional[Decision]:
        """
        Pick as a proxy does: the server chosen counts as active until
        L{release}.
        """
        tried = [self._get(s) for s in exclude]
        return self.pool.pick(PickContext(client, key), tried)

    def release(self, server: Union[ServerRef, Decision]) -> None:
        if isinstance(server, Decision):
            server = server.server
        self.pool.release(self._get(server))

    def hold(self, count: int, client: str = "127.0.0.1", key: Optional[str] = None) -> list[str]:
        """
        Pick C{count} times without releasing, as long-lived connections
        do; the names picked, in order.
        """
        names = []
        for _ in range(count):
            decision = self.pick(client, key)
            assert decision is not None, "no server picked"
            names.append(decision.server.name)
        return names

    def sequence(self, count: int, client: str = "127.0.0.1", key: Optional[str] = None) -> list[str]:
        """
        Pick and release C{count} times, as short connections do; the names
        picked, in order.
        """
        names = []
        for _ in range(count):
            decision = self.pick(client, key)
            assert decision is not None, "no server picked"
            self.release(decision)
            names.append(decision.server.name)
        return names

    def distribution(self, count: int, client: str = "127.0.0.1", key: Optional[str] = None) -> Counter:
        """
        How many of C{count} short connections each server got.
        """
        return Counter(self.sequence(count, client, key))


def verifySchedulerFactory(
    factory: ISchedulerFactory, options: Mapping[str, object] = {}
) -> None:
    """
    Check the contract every scheduler keeps, built-in or plugin: the
    factory and its schedulers provide their interfaces; nothing is picked
    from an empty pool or when every server was tried; a tried, down or
    removed server is never picked; every decision has a reason.

    @raise AssertionError: naming the broken rule.
    """
    verifyObject(ISchedulerFactory, factory)
    assert isinstance(factory.name, str) and factory.name, "factory.name must be a non-empty str"
    scheduler = factory(options)
    verifyObject(IScheduler, scheduler)

    empty = FakePool(factory(options))
    assert empty.pick() is None, f"{factory.name}: picked from an empty pool"

    pool = FakePool(scheduler, ["a", "b", ("c", 2)])
    names = {"a", "b", "c"}
    for i in range(30):
        decision = pool.pick(client=f"127.0.0.{i}")
        _checkDecision(factory.name, decision, names)
        pool.release(decision)

    for tried in (["a"], ["b", "c"], ["c", "a"]):
        for i in range(10):
            decision = pool.pick(client=f"127.0.1.{i}", exclude=tried)
            _checkDecision(factory.name, decision, names - set(tried))
            pool.release(decision)
    assert pool.pick(exclude=["a", "b", "c"]) is None, (
        f"{factory.name}: picked a server although every one was tried"
    )

    pool.down("b")
    held = []
    for i in range(20):
        decision = pool.pick(client=f"127.0.2.{i}")
        _checkDecision(factory.name, decision, {"a", "c"})
        held.append(decision)
    for decision in held:
        pool.release(decision)
    pool.up("b")
    pool.remove("a")
    for i in range(20):
        decision = pool.pick(client=f"127.0.3.{i}")
        _checkDecision(factory.name, decision, {"b", "c"})
        pool.release(decision)


def _checkDecision(name: str, decision: Optional[Decision], allowed: Sequence[str]) -> None:
    assert decision is not None, f"{name}: picked nothing from {sorted(allowed)}"
    assert decision.server.name in allowed, (
        f"{name}: picked {decision.server.name}, not one of {sorted(allowed)}"
    )
    assert isinstance(decision.reason, str) and decision.reason, f"{name}: a decision needs a reason"
