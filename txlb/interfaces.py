# -*- test-case-name: tests.test_interfaces -*-
"""
The extension points of txlb.

A third party extends txlb by shipping, in its own distribution's
C{twisted/plugins/} directory, an object that provides L{twisted.plugin.IPlugin}
and one of the factory interfaces below.  txlb's own built-ins are registered
exactly the same way, so a plugin is a first-class citizen.

Schedulers follow the split Envoy and HAProxy make: health, draining and
weights are decided by the pool, and a scheduler only ever sees the servers
that are eligible right now.  A scheduler is a small pure object: no I/O, no
reactor, no clock of its own; it is told when its eligible set changes and
when a server's load changes, and is asked to pick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Mapping, NamedTuple, Optional, Sequence

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred

    from txlb.balance.pool import Server


class SchedulerOptionsError(ValueError):
    """
    Raised by an L{ISchedulerFactory} when the pool's C{options} table does
    not suit it.  The message is shown to the operator next to the key path
    C{pools.NAME.options}, so it should name the option and what is wrong.
    """


class PickContext(NamedTuple):
    """
    What a scheduler may know about the connection or request it places.
    (A named tuple: one is made per request, so it must be cheap.)

    @ivar client: the client's address as text (C{"127.0.0.1"}), for
        C{ip_hash} and for C{hash_key = "client_ip"}.
    @ivar key: the value of the pool's C{hash_key} for this request when it
        is not the client address (a header, cookie, path or query value),
        or L{None}.  Hashing schedulers use C{key} when set, else C{client}.
    """

    client: str = ""
    key: Optional[str] = None

    @property
    def hashKey(self) -> str:
        return self.client if self.key is None else self.key


class Decision(NamedTuple):
    """
    A scheduler's answer: the server, and a short human reason that proxies
    put in their events and in C{/api/decisions}.
    """

    server: "Server"
    reason: str


class IScheduler(Interface):
    """
    A load-balancing algorithm for one pool.

    The servers handed to a scheduler provide at least C{name}, C{weight}
    (the effective weight, slow start included), C{active} (connections or
    requests in flight), C{responseTime} (moving average, seconds, 0 when
    unknown) and C{bandwidthAt(now)} (bytes per second, decaying).
    """

    def setServers(servers: Sequence["Server"]) -> None:
        """
        Replace the eligible set.  Called whenever a server joins or leaves
        rotation or changes weight, so that schedulers can rebuild their
        structures (ring, rotation table) here rather than on every pick.
        """

    def loadChanged(server: "Server") -> None:
        """
        C{server.active} or C{server.responseTime} just changed.
        Schedulers that keep an incremental structure over load (least
        connections, least response time) update it here; others do
        nothing.  Bandwidth changes are not announced (they come with every
        chunk of data); see C{Server.bandwidthRank} for how to rank by it.
        """

    def pick(
        context: PickContext, exclude: Collection["Server"]
    ) -> Optional[Decision]:
        """
        Choose one eligible server that is not in C{exclude} (servers that
        already failed for this connection), or return L{None} when there is
        none.
        """


class ISchedulerFactory(Interface):
    """
    Makes schedulers; the plugin object that C{algorithm = NAME} finds.
    """

    name = Attribute("The name written in C{algorithm = ...}.")
    description = Attribute("One line shown by C{--check} and in the docs.")

    def __call__(options: Mapping[str, object]) -> IScheduler:
        """
        Make a scheduler for one pool.  C{options} is the pool's C{options}
        table.  Raise L{SchedulerOptionsError} when it is unusable: the
        config check calls this once per pool, so bad options are reported
        before anything starts.
        """


# Health checks.


class HealthCheckOptionsError(ValueError):
    """
    Raised by an L{IHealthCheckFactory} when the pool's C{health.options}
    table does not suit it.  The message is shown to the operator next to
    the key path C{pools.NAME.health.options}, so it should name the option
    and what is wrong.
    """


class CheckResult(NamedTuple):
    """
    What one health check found.

    @ivar ok: the server passed.
    @ivar detail: a short human account (C{"HTTP 200"}, C{"HTTP 503
        {"status": "down"}"}, C{"connection refused"}); the detail of the
        check that moves a server in or out of rotation becomes the
        C{reason} of its C{server_state} event.
    """

    ok: bool
    detail: str = ""


class IHealthCheck(Interface):
    """
    One kind of active health check, configured for one pool.

    txlb decides when to check, how many results move a server (C{rise},
    C{fall}) and when a check has taken too long; a check only looks at one
    server once and says what it saw.
    """

    def check(server: "Server", endpoint: Any, config: Any) -> "Deferred[CheckResult]":
        """
        Check C{server} once.

        @param server: the server (its C{name} and C{address} are what a
            check may use).
        @param endpoint: an C{IStreamClientEndpoint} for C{server.address},
            parsed once and reused.
        @param config: the pool's C{txlb.config.HealthConfig} (C{path},
            C{method}, C{timeout}, C{expect_status}, C{expect_json}, ...).
        @return: a Deferred that fires with a L{CheckResult}.  An errback
            counts as a failure whose detail is the error's message.  txlb
            never runs two checks of the same server at once, and cancels
            the Deferred when C{config.timeout} passes (a failure) or when
            checks stop: cancelling must close whatever the check opened.
        """


class IHealthCheckFactory(Interface):
    """
    Makes health checks; the plugin object that C{health.kind = NAME} finds.
    """

    name = Attribute("The name written in C{kind = ...}.")
    description = Attribute("One line shown by C{--check} and in the docs.")

    def __call__(options: Mapping[str, object]) -> IHealthCheck:
        """
        Make a health check for one pool.  C{options} is the pool's
        C{health.options} table.  Raise L{HealthCheckOptionsError} when it
        is unusable.
        """


# Sticky sessions.


class ISessionStore(Interface):
    """
    Where C{ip} and C{key} sticky affinities are kept: a map from a
    namespaced key (C{txlb:sticky:SERVICE:KEY}) to a server name, whose
    entries expire C{ttl} seconds after they were last used.

    A store never fails a request: an unreachable backend (Redis) answers
    from a fallback instead, within a short bound.  A synchronous store
    (C{synchronous} true, the in-memory one) answers L{get} with a plain
    value so that the hot path never touches a Deferred.
    """

    synchronous = Attribute(
        "True when L{get} always returns a plain value, never a Deferred."
    )
    ttl = Attribute("Seconds an entry lives after it was last used.")

    def get(key: str) -> "Optional[str] | Deferred[Optional[str]]":
        """
        The server pinned for C{key}, or L{None}; using an entry refreshes
        its TTL.  A Deferred, when returned, fires (never errbacks) within
        the store's own timeout.
        """

    def set(key: str, server: str, replace: bool = True) -> None:
        """
        Pin C{key} to C{server} for C{ttl} seconds.  With C{replace} false,
        an existing pin (perhaps made by another balancer meanwhile) wins.
        Fire and forget: nothing waits for it.
        """

    def delete(key: str) -> None:
        """Forget C{key}."""


class IEarlyBytes(Interface):
    """
    A protocol that takes the bytes a client sent before the protocol's
    connection was made: what followed a PROXY header in the same read
    (L{txlb.net.proxyproto}).  A protocol that hands its socket to the kernel
    (the TCP balancer's splicing) must send them on first, and cannot if
    they come as a C{dataReceived} after it has done so.
    """

    def earlyBytes(data: bytes) -> None:
        """
        Called once, before C{makeConnection}, with non-empty C{data}: the
        first bytes of the client's stream, to forward before any other.
        """
