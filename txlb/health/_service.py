# -*- test-case-name: tests.test_health -*-
"""
L{HealthChecks}: the active checks of one pool, as a service.

Every server has its own little timer on the injected clock.  The first
check of a server comes at a random moment within one interval, so that a
pool of a thousand servers spreads its checks over the interval instead of
opening a thousand connections at once; after that each server is checked
every C{interval}, give or take L{JITTER}, counted from the start of its
previous check.  The next check is only scheduled when the previous one has
ended, so checks of one server never overlap, and a check that has not
answered within C{timeout} is cancelled and counts as a failure.
"""

from __future__ import annotations

import random
from typing import Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from txlb.balance.pool import Server, ServerState
from txlb.health._checks import describeFailure
from txlb.health._machine import RiseFall
from txlb.interfaces import CheckResult, IHealthCheck, IHealthCheckFactory

_log = Logger(namespace="txlb.health")

#: Each interval after the first is C{interval * uniform(1 - JITTER, 1 + JITTER)}.
JITTER = 0.1


class _Checker:
    """The checks of one server: a timer, at most one check in flight."""

    def __init__(self, owner: "HealthChecks", server: Server) -> None:
        self.owner = owner
        self.server = server
        self.machine = RiseFall(owner.config.rise, owner.config.fall)
        self.timer = None
        self.inFlight: Optional[Deferred] = None
        self.started = 0.0
        self.stopped = False

    def start(self, delay: float) -> None:
        self.timer = self.owner.clock.callLater(delay, self.run)

    def run(self) -> None:
        self.timer = None
        owner = self.owner
        config = owner.config
        self.started = owner.clock.seconds()
        try:
            # The pool's TLS, unless the check brings its own (health options).
            tls = None if getattr(owner.check, "tls", None) is not None else owner.pool.tls
            endpoint = owner.endpoints.get(self.server.address, tls, alpn=getattr(owner.check, "alpn", ()))
            d = owner.check.check(self.server, endpoint, config)
        except Exception:
            d = Deferred()
            d.errback()
        self.inFlight = d
        d.addTimeout(config.timeout, owner.clock)
        d.addBoth(self.done)

    def done(self, outcome: object) -> None:
        """A check ended (passed, failed, timed out or was cancelled)."""
        self.inFlight = None
        if self.stopped:
            return
        try:
            ok, detail = self.judge(outcome)
            owner = self.owner
            if ok:
                owner.passed += 1
            else:
                owner.failed += 1
            if owner.metrics is not None:
                owner.metrics.healthCheck(owner.pool.name, self.server.name, ok)
            move = self.machine.observe(self.server.health, ok, detail)
            if move is not None:
                owner.pool.setHealth(self.server, *move)
        except Exception:
            _log.failure("health check of {server} in pool {pool}", server=self.server.name, pool=self.owner.pool.name)
        finally:
            if not self.stopped:
                self.scheduleNext()

    def judge(self, outcome: object) -> tuple[bool, str]:
        if isinstance(outcome, Failure):
            if outcome.check(TimeoutError):
                return False, f"no answer within {_seconds(self.owner.config.timeout)}"
            return False, describeFailure(outcome)
        if isinstance(outcome, CheckResult):
            return bool(outcome.ok), outcome.detail
        return False, f"the check answered {outcome!r}, not a CheckResult"

    def scheduleNext(self) -> None:
        owner = self.owner
        due = self.started + owner.config.interval * owner.rng.uniform(1 - JITTER, 1 + JITTER)
        self.start(max(0.0, due - owner.clock.seconds()))

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        if self.inFlight is not None:
            d, self.inFlight = self.inFlight, None
            d.cancel()


class HealthChecks(Service):
    """
    The active health checks of one pool.

    On start it marks the pool as checked, so that servers added at run
    time start as C{CHECKING}, and checks every server of the pool,
    following servers as they are added and removed.  Verdicts go to
    L{txlb.balance.pool.Pool.setHealth}, which logs the C{server_state} events.

    With C{kind = "none"} it checks nothing, and on start marks the pool
    unchecked and puts any server that is not C{UP} back up (what a reload
    that turns checks off needs).  Stopping leaves every server as it is,
    so that the checks of a reloaded config take over where these ended.

    @param pool: the L{txlb.balance.pool.Pool} to check.
    @param config: its L{txlb.config.HealthConfig}.
    @param endpoints: an L{txlb.net.endpoints.EndpointCache} to connect with.
    @param clock: an C{IReactorTime}; checks are timed on it.
    @param factories: health-check factories by kind, as
        L{healthCheckFactories} returns them.
    @param rng: where the jitter comes from (seed it in tests).

    @raise KeyError: C{config.kind} is not in C{factories}.
    @raise txlb.interfaces.HealthCheckOptionsError: the kind's factory
        refuses C{config.options}.

    @ivar passed: checks passed since start; C{failed}: checks failed.
    """

    def __init__(
        self,
        pool,
        config,
        endpoints,
        clock,
        factories: Mapping[str, IHealthCheckFactory],
        rng: Optional[random.Random] = None,
        metrics=None,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.config = config
        self.endpoints = endpoints
        self.clock = clock
        self.rng = rng or random.Random()
        self.check: Optional[IHealthCheck] = None
        if config.kind != "none":
            self.check = factories[config.kind](config.options)
        self._checkers: dict[Server, _Checker] = {}
        self._watching = False
        self.passed = 0
        self.failed = 0

    @property
    def checking(self) -> frozenset[Server]:
        """The servers that have a checker now."""
        return frozenset(self._checkers)

    def startService(self) -> None:
        super().startService()
        if self.check is None:
            self._noChecks()
            return
        self.pool.checked = True
        if not self._watching:
            self.pool.watch(self)
            self._watching = True
        interval = self.config.interval
        for server in self.pool:
            self._startChecker(server, self.rng.uniform(0, interval))

    def _noChecks(self) -> None:
        """
        C{kind = "none"}: every server is taken as healthy.  This matters
        after a reload turned checks off: a server they had found down (or
        were still checking) would otherwise never come back.
        """
        self.pool.checked = False
        for server in list(self.pool):
            if server.health is not ServerState.UP:
                self.pool.setHealth(server, ServerState.UP, "health checks are off")

    def stopService(self) -> None:
        """Stop every timer and cancel every check in flight (at once)."""
        super().stopService()
        checkers, self._checkers = self._checkers, {}
        for checker in checkers.values():
            checker.stop()

    # What the pool calls (Pool.watch).

    def serverAdded(self, server: Server) -> None:
        if self.running and self.check is not None:
            self._startChecker(server, self.rng.uniform(0, self.config.interval))

    def serverRemoved(self, server: Server) -> None:
        checker = self._checkers.pop(server, None)
        if checker is not None:
            checker.stop()

    def _startChecker(self, server: Server, delay: float) -> None:
        if server in self._checkers:
            return
        checker = self._checkers[server] = _Checker(self, server)
        checker.start(delay)


def _seconds(value: float) -> str:
    if value < 1:
        return f"{round(value * 1000)}ms"
    return f"{value:g}s"
