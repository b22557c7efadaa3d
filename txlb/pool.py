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
from typing import Collection, Iterable, Iterator, Optional

import attrs
from constantly import ValueConstant, Values

from txlb.interfaces import Decision, IScheduler, PickContext

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
    state: ServerState = ServerState.UP
    active: int = 0
    total: int = 0
    failures: int = 0
    bytesIn: int = 0
    bytesOut: int = 0
    responseTime: float = 0.0
    _rate: float = 0.0
    _rateStamp: float = 0.0

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


class Pool:
    """
    A named set of servers and the scheduler that places traffic on them.

    @param clock: an C{IReactorTime}, used for the bandwidth rate.
    """

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
    ) -> None:
        self.name = name
        self.algorithm = algorithm
        self.scheduler = scheduler
        self.retries = retries
        self.connectTimeout = connectTimeout
        #: What hashing schedulers hash for HTTP requests (see L{txlb.http.routing.hashKeyOf}).
        self.hashKey = hashKey
        self._clock = clock
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
        self.scheduler.setServers(self.eligible())

    # What proxies call.

    def pick(
        self, context: PickContext, exclude: Collection[Server] = ()
    ) -> Optional[Decision]:
        """
        Ask the scheduler for a server and count it as in flight at once, so
        that concurrent picks see each other.  The caller must call
        L{release} exactly once for every decision it gets.
        """
        decision = self.scheduler.pick(context, exclude)
        if decision is not None:
            server = decision.server
            server.active += 1
            server.total += 1
            self.scheduler.loadChanged(server)
        return decision

    def release(self, server: Server) -> None:
        """
        A connection or request that L{pick} counted has ended.
        """
        server.active -= 1
        self.scheduler.loadChanged(server)

    def connectFailed(self, server: Server) -> None:
        server.failures += 1

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

    def setState(self, server: Server, state: ServerState) -> None:
        if server.state is not state:
            server.state = state
            self._refresh()

    def setWeight(self, server: Server, weight: int) -> None:
        if server.weight != weight:
            server.weight = weight
            self._refresh()

    def add(self, server: Server) -> None:
        """
        @raise ValueError: a server of that name is already in the pool.
        """
        if server.name in self._servers:
            raise ValueError(f"pool {self.name!r} already has a server {server.name!r}")
        self._servers[server.name] = server
        self._refresh()

    def remove(self, server: Server) -> None:
        del self._servers[server.name]
        self._refresh()
