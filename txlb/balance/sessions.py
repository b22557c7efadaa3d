# -*- test-case-name: tests.test_sessions -*-
"""
Session stores: where C{ip} and C{key} sticky affinities live.

L{MemoryStore} is the embedded default: a dict in LRU order whose entries
expire C{ttl} seconds after their last use, bounded by C{max_entries}.

L{RedisStore} shares affinities between several balancers through Redis
(txredisapi).  Redis is a help, never a dependency of a request: every
lookup is bounded by a short timeout, and while Redis is slow or down the
store answers from its own memory store (which it keeps as a write-through
copy), logs the outage once (C{sessions_degraded}) and goes back to Redis
when a probe shows it answering again (C{sessions_restored}).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.interfaces import ISessionStore
from txlb.net.endpoints import connectFailure

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import SessionsConfig

_log = Logger(namespace="txlb.balance.sessions")

#: The longest a request waits for Redis, in seconds.
REDIS_TIMEOUT = 0.075


@implementer(ISessionStore)
class MemoryStore:
    """
    Affinities in this process's memory.

    Every entry's expiry is its last use plus the one C{ttl}, so LRU order
    is also expiry order: expired entries are dropped from the old end as
    new ones arrive, and the map never holds more than C{maxEntries}.

    @param clock: an C{IReactorTime}.
    """

    synchronous = True

    def __init__(self, clock, ttl: float, maxEntries: int = 100_000) -> None:
        self.clock = clock
        self.ttl = ttl
        self.maxEntries = maxEntries
        self._entries: OrderedDict[str, list] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[str]:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock.seconds()
        if entry[1] <= now:
            del self._entries[key]
            return None
        entry[1] = now + self.ttl
        self._entries.move_to_end(key)
        return entry[0]

    def set(self, key: str, server: str, replace: bool = True) -> None:
        entries = self._entries
        now = self.clock.seconds()
        entry = entries.get(key)
        if entry is not None and not replace and entry[1] > now:
            return
        entries[key] = [server, now + self.ttl]
        entries.move_to_end(key)
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self.maxEntries and oldest[1] > now:
                break
            entries.popitem(last=False)

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that tells the store when a connection attempt fails."""

    def __init__(self, endpoint, store: "RedisStore") -> None:
        self.endpoint = endpoint
        self.store = store

    def connect(self, factory) -> Deferred:
        def failed(failure: Failure) -> Failure:
            self.store._failed(f"cannot connect: {connectFailure(failure)}")
            return failure  # the reconnecting service retries

        return self.endpoint.connect(factory).addErrback(failed)

    def __repr__(self) -> str:
        return f"<session store {self.store.address}>"


def _redisFactory(store: "RedisStore"):
    import txredisapi

    class Factory(txredisapi.RedisFactory):
        """One connection; the store hears of it coming and going."""

        initialDelay = 0.25
        maxDelay = 5.0

        def addConnection(self, conn) -> None:
            super().addConnection(conn)
            if conn.connected:
                store._up(conn)

        def delConnection(self, conn) -> None:
            super().delConnection(conn)
            store._down(conn)

        def retryDelay(self, attempt: int) -> float:
            # A connection that opens but does not answer (a stopped Redis)
            # counts as a failed attempt too, so back-off keeps growing.
            return super().retryDelay(max(attempt, store._probeFailures + 1))

    return Factory(store.address, None, 1, isLazy=True, convertNumbers=False)


@implementer(ISessionStore)
class RedisConnected(Service):
    """
    A service that keeps one connection to the Redis at C{self.address}
    (reconnecting with back-off); C{self.clock} is the reactor.  A subclass
    probes each new connection in C{_up} (within C{self.probeTimeout}),
    takes it with L{_accepted}, and hears of trouble in C{_failed}; a probe
    not answered in time and a lost connection are handled here.
    """

    _factory = None
    _conn = _candidate = None

    def startService(self) -> None:
        super().startService()
        self._factory = _redisFactory(self)
        self._factory.startConnecting(_WatchedEndpoint(clientFromString(self.clock, self.address), self))

    def stopService(self):
        super().stopService()
        self._conn = self._candidate = None
        if self._factory is not None:
            factory, self._factory = self._factory, None
            return factory.disconnect()
        return None

    #: What the connection serves, in its events' words: the text's name
    #: and the events' prefix (C{sessions_connected}, C{sessions_restored}).
    role = ("session store", "sessions")
    degraded = False
    connected = False
    _probeFailures = 0

    def _accepted(self, conn) -> None:
        """C{conn} answered its probe: it is the connection from now on."""
        what, prefix = self.role
        self._candidate = None
        self._conn = conn
        self._probeFailures = 0
        if self.degraded:
            self.degraded = False
            _log.info(f"{what} {{address}} is back", event=f"{prefix}_restored", store="redis", address=self.address)
        elif not self.connected:
            _log.info(f"{what} {{address}} connected", event=f"{prefix}_connected", store="redis",
                      address=self.address)
        self.connected = True

    def _probeTimedOut(self, conn) -> None:
        """C{conn} did not answer its probe within C{self.probeTimeout}: drop it."""
        if conn is self._candidate:
            self._candidate = None
            self._probeFailures += 1
            self._failed(f"no answer to PING within {self.probeTimeout * 1000:g}ms")
            if conn.transport is not None:
                conn.transport.abortConnection()

    def _down(self, conn) -> None:
        if conn is self._candidate:
            self._candidate = None
        if conn is self._conn:
            self._conn = None
            self._failed("connection lost")


class RedisStore(RedisConnected):
    """
    Affinities in Redis, shared by every balancer that uses the same Redis.

    Keys are written by L{txlb.balance.sticky} already namespaced
    (C{txlb:sticky:SERVICE:KEY}); each carries the TTL, refreshed on every
    use (C{GETEX ... PX}).

    @param address: the Redis server, a client endpoint string.
    @param fallback: the memory store used while Redis is away, and kept
        up to date meanwhile.
    """

    synchronous = False
    #: The live, answering connection, or L{None} (then: memory only).
    _conn = None
    #: A connection made but not yet seen answering.
    _candidate = None
    #: Redis older than 6.2 has no GETEX: GET, then PEXPIRE.
    _legacy = False

    def __init__(self, clock, address: str, fallback: MemoryStore, timeout: float = REDIS_TIMEOUT) -> None:
        self.clock = clock
        self.address = address
        self.fallback = fallback
        self.ttl = fallback.ttl
        self.timeout = timeout
        self._ms = max(1, int(self.ttl * 1000))

    # The service (L{RedisConnected}): connect, reconnect with back-off
    # (txredisapi's ClientService), disconnect.

    # ISessionStore.

    def get(self, key: str) -> "Optional[str] | Deferred[Optional[str]]":
        conn = self._conn
        if conn is None:
            return self.fallback.get(key)
        try:
            if self._legacy:
                command = conn.execute_command("GET", key)
                conn.execute_command("PEXPIRE", key, self._ms).addErrback(lambda _: None)
            else:
                command = conn.execute_command("GETEX", key, "PX", self._ms)
        except Exception as e:  # the connection died a moment ago
            self._failed(f"lookup failed: {e}")
            return self.fallback.get(key)
        answer: Deferred = Deferred()

        def answered(value) -> None:
            if answer.called:
                return
            timer.cancel()
            if isinstance(value, Failure):
                if not self._legacy and "unknown command" in str(value.value).lower():
                    self._legacy = True
                else:
                    self._failed(f"lookup failed: {value.getErrorMessage()}")
                answer.callback(self.fallback.get(key))
                return
            if value is None:
                # Perhaps pinned here while Redis was away: share it now.
                value = self.fallback.get(key)
                if value is not None:
                    self._send("SET", key, value, "PX", self._ms, "NX")
            else:
                value = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                self.fallback.set(key, value)
            answer.callback(value)

        def timedOut() -> None:
            self._failed(f"no answer within {self.timeout * 1000:g}ms")
            answer.callback(self.fallback.get(key))

        timer = self.clock.callLater(self.timeout, timedOut)
        command.addBoth(answered)
        return answer

    def set(self, key: str, server: str, replace: bool = True) -> None:
        self.fallback.set(key, server, replace)
        if replace:
            self._send("SET", key, server, "PX", self._ms)
        else:
            self._send("SET", key, server, "PX", self._ms, "NX")

    def delete(self, key: str) -> None:
        self.fallback.delete(key)
        self._send("DEL", key)

    def _send(self, *command) -> None:
        """A write nothing waits for; a failure only marks Redis as away."""
        conn = self._conn
        if conn is None:
            return
        try:
            sent = conn.execute_command(*command)
        except Exception as e:
            self._failed(f"write failed: {e}")
            return
        sent.addErrback(
            lambda f: self._failed(f"write failed: {f.getErrorMessage()}") if conn is self._conn else None
        )

    # Redis coming and going.

    @property
    def probeTimeout(self) -> float:
        """How long a new connection has to answer C{PING}: four times a lookup's timeout."""
        return self.timeout * 4

    def _up(self, conn) -> None:
        """
        A new connection: use it once it has answered a PING in time (a
        stopped Redis still accepts connections).
        """
        self._candidate = conn
        timer = self.clock.callLater(self.probeTimeout, self._probeTimedOut, conn)

        def ponged(value) -> None:
            if not timer.active():
                return
            timer.cancel()
            if isinstance(value, Failure) or conn is not self._candidate:
                return
            self._accepted(conn)

        conn.execute_command("PING").addBoth(ponged)

    def _failed(self, why: str) -> None:
        """
        Redis did not answer: stop asking it (memory meanwhile); drop the
        connection so that reconnecting, with back-off, finds out when it
        is back.
        """
        conn, self._conn = self._conn, None
        if not self.running:
            return  # stopping: our own disconnect is no outage
        if not self.degraded:
            self.degraded = True
            _log.warn(
                "session store {address} unavailable ({reason}): sticky sessions use memory until it is back",
                event="sessions_degraded", store="redis", address=self.address, reason=why, fallback="memory",
            )
        if conn is not None and conn.transport is not None:
            conn.transport.abortConnection()


def makeStore(config: SessionsConfig, reactor) -> ISessionStore:
    """The store C{[sessions]} asks for (a L{RedisStore} is a service to start)."""
    memory = MemoryStore(reactor, config.ttl, config.max_entries)
    if config.store == "redis":
        return RedisStore(reactor, config.redis, memory)
    return memory
