# -*- test-case-name: tests.test_pool -*-
"""
Servers and pools: the one owner of server state and live counters.

Everything that changes a server (a connection starting or ending, a health
verdict, an operator's drain or weight change) goes through L{Pool}, which
keeps the scheduler's view of the eligible servers up to date.  Proxies only
ask the pool to pick and tell it what happened.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Collection, Iterable, Iterator, Optional

import attrs
from constantly import ValueConstant, Values

from twisted.logger import Logger

from txlb.interfaces import Decision, IScheduler, PickContext

_log = Logger(namespace="txlb.balance.pool")

#: Weight of the newest sample in the response-time moving average.
RESPONSE_TIME_ALPHA = 0.3
#: Time constant, in seconds, of the decaying bandwidth rate.
BANDWIDTH_TAU = 2.0


class ServerState(Values):
    """
    Where a server stands.  Only C{UP} servers are handed to the scheduler.
    """

    UP = ValueConstant("up")
    DOWN = ValueConstant("down")
    CHECKING = ValueConstant("checking")
    DRAINING = ValueConstant("draining")
    DRAINED = ValueConstant("drained")
    EJECTED = ValueConstant("ejected")


@attrs.define(eq=False)
class Server:
    """
    One backend server of a pool, with the live figures schedulers read.

    @ivar address: the connect endpoint string (C{tcp:host=...:port=...}).
    @ivar active: connections or requests in flight, counted from the moment
        the server is picked until the proxy tells the pool it is done.
    @ivar responseTime: moving average in seconds of the time to the
        server's first response byte (0 until the first sample).
    """

    name: str
    address: str
    weight: int = 1
    #: What health checks say: C{UP}, C{DOWN}, or C{CHECKING} (not yet known).
    health: ServerState = ServerState.UP
    #: An operator asked for no new traffic; C{removing}: then remove it.
    draining: bool = False
    removing: bool = False
    #: Passive ejection: out of rotation until this time (0: not ejected).
    ejectedUntil: float = 0.0
    ejections: int = 0
    consecutiveFailures: int = 0
    ejectedAt: float = 0.0
    #: The weight the operator set; C{weight} is what schedulers see, lower
    #: while slow start ramps a recovered server up.
    configuredWeight: int = -1
    rampStarted: Optional[float] = None

    def __attrs_post_init__(self) -> None:
        if self.configuredWeight < 0:
            self.configuredWeight = self.weight
    active: int = 0
    total: int = 0
    failures: int = 0
    bytesIn: int = 0
    bytesOut: int = 0
    responseTime: float = 0.0
    _rate: float = 0.0
    _rateStamp: float = 0.0

    @property
    def state(self) -> ServerState:
        """
        The one state the admin API shows, derived from the facets above:
        an operator's drain outranks an ejection, which outranks health.
        """
        if self.draining:
            return ServerState.DRAINED if self.active <= 0 else ServerState.DRAINING
        if self.ejectedUntil:
            return ServerState.EJECTED
        return self.health

    def bandwidthAt(self, now: float) -> float:
        """
        Bytes per second through this server (both directions), decayed
        exponentially so a burst a minute ago no longer counts.
        """
        if self._rate == 0.0:
            return 0.0
        return self._rate * math.exp((self._rateStamp - now) / BANDWIDTH_TAU)

    def bandwidthRank(self) -> float:
        """
        A number that orders servers as L{bandwidthAt} does at any one
        moment, whatever the moment: C{log(rate) + stamp / tau}, or minus
        infinity before the first byte.  It never decreases, so schedulers
        can rank servers by bandwidth without a clock and without being told
        about every byte.
        """
        if self._rate == 0.0:
            return -math.inf
        return math.log(self._rate) + self._rateStamp / BANDWIDTH_TAU

    def _observeBytes(self, count: int, now: float) -> None:
        self._rate = self.bandwidthAt(now) + count / BANDWIDTH_TAU
        self._rateStamp = now

    def _observeResponseTime(self, seconds: float) -> None:
        if self.responseTime == 0.0:
            self.responseTime = seconds
        else:
            self.responseTime += RESPONSE_TIME_ALPHA * (seconds - self.responseTime)


@attrs.define(eq=False)
class _Waiter:
    context: PickContext
    exclude: tuple
    callback: Callable[[Optional[Decision]], None]
    call: object = None


class Pool:
    """
    A named set of servers and the scheduler that places traffic on them.

    Every change of a server's state goes through here, and is logged here
    as the events of SPEC section 5, so that TCP, HTTP, health checks and
    the admin API never disagree about a server.

    @param clock: an C{IReactorTime}, for the bandwidth rate and ejections.
    @param passive: C{(consecutive_failures, eject_for)} to eject servers
        that fail live traffic, or L{None}.
    """

    #: Active health checks run for this pool: servers added at run time
    #: start as C{CHECKING} rather than C{UP}.
    checked = False
    #: TLS to this pool's servers (a L{txlb.config.BackendTLSConfig}), or L{None}.
    tls = None
    #: What HTTP services speak to this pool's servers: C{"http/1.1"}, or
    #: C{"h2"} for HTTP/2 (L{txlb.http.h2backend}).
    protocol = "http/1.1"

    def __init__(
        self,
        name: str,
        algorithm: str,
        scheduler: IScheduler,
        servers: Iterable[Server],
        clock,
        *,
        retries: int = 2,
        connectTimeout: float = 2.0,
        hashKey: str = "client_ip",
        passive: Optional[tuple[int, float]] = None,
        maxConnections: int = 0,
        queueTimeout: float = 5.0,
        slowStart: float = 0.0,
    ) -> None:
        self.name = name
        self.algorithm = algorithm
        self.scheduler = scheduler
        self.retries = retries
        self.connectTimeout = connectTimeout
        #: What hashing schedulers hash for HTTP requests (see L{txlb.http.routing.hashKeyOf}).
        self.hashKey = hashKey
        self.passive = passive
        self.maxConnections = maxConnections
        self.queueTimeout = queueTimeout
        self.slowStart = slowStart
        self._full: set[Server] = set()
        self._queue: deque[_Waiter] = deque()
        self._eligible: list[Server] = []
        self._clock = clock
        self._watchers: list = []
        self._servers: dict[str, Server] = {}
        for server in servers:
            self._servers[server.name] = server
        self._refresh()

    def __iter__(self) -> Iterator[Server]:
        return iter(self._servers.values())

    def __len__(self) -> int:
        return len(self._servers)

    def server(self, name: str) -> Server:
        """
        @raise KeyError: no server of that name.
        """
        return self._servers[name]

    def eligible(self) -> list[Server]:
        return [s for s in self._servers.values() if s.state is ServerState.UP]

    def _refresh(self) -> None:
        self._eligible = self.eligible()
        self.scheduler.setServers(self._eligible)
        if self._queue:
            self._serveQueue()

    # What proxies call.

    def pick(
        self, context: PickContext, exclude: Collection[Server] = ()
    ) -> Optional[Decision]:
        """
        Ask the scheduler for a server and count it as in flight at once, so
        that concurrent picks see each other.  The caller must call
        L{release} exactly once for every decision it gets.
        """
        if self._full:
            exclude = self._full.union(exclude)
        decision = self.scheduler.pick(context, exclude)
        if decision is not None:
            self._inFlight(decision.server)
        return decision

    def take(self, server: Server, reason: str) -> Decision:
        """
        Count C{server} in flight for work placed without the scheduler
        (a sticky session's pinned server), as L{pick} counts its choice;
        the caller releases it the same way.
        """
        self._inFlight(server)
        return Decision(server, reason)

    def _inFlight(self, server: Server) -> None:
        server.active += 1
        server.total += 1
        if self.maxConnections and server.active >= self.maxConnections:
            self._full.add(server)
        self.scheduler.loadChanged(server)

    def release(self, server: Server) -> None:
        """
        A connection or request that L{pick} counted has ended.
        """
        server.active -= 1
        if self._full and server.active < self.maxConnections:
            self._full.discard(server)
        self.scheduler.loadChanged(server)
        if server.draining and server.active == 0:
            self._drained(server)
        if self._queue:
            self._serveQueue()

    # Connection limits: a queue of work waiting for a free server.

    def saturated(self, exclude: Collection[Server] = ()) -> bool:
        """
        No server is free for this work, but one will be when something in
        flight ends: worth queueing rather than failing.
        """
        return bool(self._full) and any(s in self._full and s not in exclude for s in self._eligible)

    def enqueue(
        self, context: PickContext, exclude: Collection[Server], callback: Callable[[Optional[Decision]], None]
    ) -> "_Waiter":
        """
        Wait for a free server: C{callback(decision)} as soon as one frees
        up (whichever first), or C{callback(None)} after C{queueTimeout}.
        """
        waiter = _Waiter(context, tuple(exclude), callback)
        waiter.call = self._clock.callLater(self.queueTimeout, self._expire, waiter)
        self._queue.append(waiter)
        return waiter

    def cancel(self, waiter: "_Waiter") -> None:
        """The work gave up waiting (its client left)."""
        if waiter in self._queue:
            self._queue.remove(waiter)
            if waiter.call.active():
                waiter.call.cancel()

    def _expire(self, waiter: "_Waiter") -> None:
        self._queue.remove(waiter)
        waiter.callback(None)

    def _serveQueue(self) -> None:
        while self._queue:
            waiter = self._queue[0]
            decision = self.pick(waiter.context, waiter.exclude)
            if decision is None:
                return
            self._queue.popleft()
            waiter.call.cancel()
            waiter.callback(decision)

    def connectFailed(self, server: Server) -> None:
        server.failures += 1
        self.reportResult(server, False, "connect failed")

    def reportResult(self, server: Server, ok: bool, what: str = "") -> None:
        """
        How live traffic fared on C{server}: a connect failure or a 5xx
        answer is a failure.  Enough failures in a row eject it.
        """
        if ok:
            server.consecutiveFailures = 0
            return
        server.consecutiveFailures += 1
        if (
            self.passive is not None
            and server.consecutiveFailures >= self.passive[0]
            and not server.ejectedUntil
            and server.name in self._servers
        ):
            self._eject(server, f"{server.consecutiveFailures} consecutive failures: {what}")

    def observeResponseTime(self, server: Server, seconds: float) -> None:
        server._observeResponseTime(seconds)
        self.scheduler.loadChanged(server)

    def observeBytes(self, server: Server, received: int, sent: int) -> None:
        server.bytesIn += received
        server.bytesOut += sent
        server._observeBytes(received + sent, self._clock.seconds())

    def bandwidth(self, server: Server) -> float:
        return server.bandwidthAt(self._clock.seconds())

    # What health checks and the admin API call.

    def watch(self, watcher) -> None:
        """
        C{watcher.serverAdded(server)} and C{watcher.serverRemoved(server)}
        are called as servers come and go (health checks use this).
        """
        self._watchers.append(watcher)

    def unwatch(self, watcher) -> None:
        """Undo L{watch} (health checks a reload replaced)."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    # What a config reload calls: servers keep their state and counters.

    def setScheduler(self, algorithm: str, scheduler: IScheduler) -> None:
        """A new algorithm or new options: C{scheduler} takes over from the next pick."""
        self.algorithm = algorithm
        self.scheduler = scheduler
        self._refresh()

    def configure(
        self,
        *,
        retries: int,
        connectTimeout: float,
        hashKey: str,
        passive: Optional[tuple[int, float]],
        maxConnections: int,
        queueTimeout: float,
        slowStart: float,
    ) -> None:
        """New settings, for the picks and connections that follow."""
        self.retries = retries
        self.connectTimeout = connectTimeout
        self.hashKey = hashKey
        self.passive = passive
        self.queueTimeout = queueTimeout
        self.slowStart = slowStart
        if maxConnections != self.maxConnections:
            self.maxConnections = maxConnections
            self._full = {s for s in self._servers.values() if maxConnections and s.active >= maxConnections}
            self._refresh()

    def setHealth(self, server: Server, health: ServerState, reason: str = "") -> None:
        """What the health checks concluded (after rise or fall)."""
        old = server.health
        if old is health:
            return
        server.health = health
        if health is ServerState.UP:
            self._startRamp(server)
        self._refresh()
        if server.name not in self._servers:
            return
        if health is ServerState.UP:
            _log.info(
                "server {server} of pool {pool} is healthy: {reason}",
                event="server_state", pool=self.name, server=server.name,
                health="healthy", action="added_to_rotation", reason=reason,
            )
            if old is ServerState.CHECKING:
                self._logAdded(server, "passed")
        elif health is ServerState.DOWN:
            _log.info(
                "server {server} of pool {pool} is unhealthy: {reason}",
                event="server_state", pool=self.name, server=server.name,
                health="unhealthy", action="removed_from_rotation", reason=reason,
            )

    def setState(self, server: Server, state: ServerState) -> None:
        """
        Force a health state (C{UP}, C{DOWN}, C{CHECKING}): for tests and
        tools that stand in for health checks.
        """
        self.setHealth(server, state, "set by hand")

    def setWeight(self, server: Server, weight: int) -> None:
        server.configuredWeight = weight
        if server.rampStarted is None and server.weight != weight:
            server.weight = weight
            self._refresh()

    def _startRamp(self, server: Server) -> None:
        """Slow start: from weight 1 up to the configured weight, linearly."""
        if self.slowStart <= 0 or server.configuredWeight <= 1:
            return
        server.rampStarted = self._clock.seconds()
        server.weight = 1
        self._clock.callLater(self._rampStep(), self._ramp, server)

    def _rampStep(self) -> float:
        return max(self.slowStart / 10, 0.1)

    def _ramp(self, server: Server) -> None:
        if server.rampStarted is None or server.name not in self._servers:
            return
        done = (self._clock.seconds() - server.rampStarted) / self.slowStart
        if done >= 1:
            server.rampStarted = None
            weight = server.configuredWeight
        else:
            weight = max(1, math.ceil(server.configuredWeight * done))
            self._clock.callLater(self._rampStep(), self._ramp, server)
        if weight != server.weight:
            server.weight = weight
            self._refresh()

    def add(self, server: Server) -> None:
        """
        A server joins: at once when the pool has no active checks, else
        as C{CHECKING} until its checks pass.

        @raise ValueError: a server of that name is already in the pool.
        """
        if server.name in self._servers:
            raise ValueError(f"pool {self.name!r} already has a server {server.name!r}")
        server.health = ServerState.CHECKING if self.checked else ServerState.UP
        self._servers[server.name] = server
        self._refresh()
        for watcher in self._watchers:
            watcher.serverAdded(server)
        if not self.checked:
            self._logAdded(server, "none")

    def _logAdded(self, server: Server, check: str) -> None:
        _log.info(
            "server {server} added to pool {pool}",
            event="server_added", pool=self.name, server=server.name,
            healthCheck=check, action="added_to_load_balancer_pool",
        )

    def drain(self, server: Server) -> None:
        """No new traffic for C{server}; what is in flight finishes."""
        if not server.draining:
            server.draining = True
            self._refresh()
            _log.info(
                "server {server} of pool {pool} draining, {inFlight} in flight",
                event="server_draining", pool=self.name, server=server.name,
                action="draining", inFlight=server.active,
            )
        if server.active == 0:
            self._drained(server)

    def enable(self, server: Server) -> None:
        """Undo a drain: back in rotation (when healthy)."""
        if server.draining:
            server.draining = server.removing = False
            self._refresh()
            _log.info(
                "server {server} of pool {pool} enabled",
                event="server_enabled", pool=self.name, server=server.name,
                action="enabled", inFlight=server.active,
            )

    def delete(self, server: Server) -> None:
        """Drain C{server}, then remove it once nothing is in flight."""
        server.removing = True
        self.drain(server)

    def _drained(self, server: Server) -> None:
        _log.info(
            "server {server} of pool {pool} drained",
            event="server_drained", pool=self.name, server=server.name,
            action="drained", inFlight=0,
        )
        if server.removing and server.name in self._servers:
            self.remove(server)
            _log.info(
                "server {server} removed from pool {pool}",
                event="server_removed", pool=self.name, server=server.name,
                action="removed", inFlight=0,
            )

    def remove(self, server: Server) -> None:
        del self._servers[server.name]
        self._refresh()
        for watcher in self._watchers:
            watcher.serverRemoved(server)

    def eject(self, server: Server, reason: str) -> None:
        """
        Eject C{server} as passive detection would: for a failure that was
        seen elsewhere (a worker process, L{txlb.service.workers}).
        """
        if self.passive is not None and not server.ejectedUntil and server.name in self._servers:
            self._eject(server, reason)

    def _eject(self, server: Server, reason: str) -> None:
        base = self.passive[1]
        now = self._clock.seconds()
        if server.ejections and now - server.ejectedAt > 10 * base * 2 ** server.ejections:
            server.ejections = 0  # well behaved for long enough: forgiven
        duration = base * 2 ** server.ejections
        server.ejections += 1
        server.ejectedAt = now
        server.ejectedUntil = now + duration
        self._refresh()
        _log.info(
            "server {server} of pool {pool} ejected for {ejectFor}s: {reason}",
            event="server_ejected", pool=self.name, server=server.name,
            reason=reason, ejectFor=duration,
        )
        self._clock.callLater(duration, self._ejectionOver, server)

    def _ejectionOver(self, server: Server) -> None:
        server.ejectedUntil = 0.0
        server.consecutiveFailures = 0
        self._startRamp(server)
        self._refresh()
        if server.name in self._servers and server.health is ServerState.UP:
            _log.info(
                "server {server} of pool {pool} back after ejection",
                event="server_state", pool=self.name, server=server.name,
                health="healthy", action="added_to_rotation", reason="ejection over",
            )
