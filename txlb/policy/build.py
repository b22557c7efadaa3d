# -*- test-case-name: tests.test_ratelimit -*-
"""
Compiling a config's C{allow}/C{deny}, C{rate_limit} and TCP per-client
limits into what the proxies consult, at start and at each reload.

L{Policies} lives as long as the process: it owns the one connection to
Redis that shared rate limits use, and keeps the buckets of every limit a
reload leaves unchanged (same service, same route, same settings), so
that reloading for some other reason does not hand every client a fresh
burst.  A limit that changed starts with full buckets.
"""

from __future__ import annotations

from typing import Optional

from txlb.policy.access import AccessList
from txlb.policy.admission import Admission
from txlb.policy.ratelimit import ConnectionLimits, RateLimiter


class Policies:
    """
    @param clock: an C{IReactorTime}.
    @param parent: the service tree the Redis connection joins (it is a
        service, started and stopped with txlb).
    """

    def __init__(self, clock, parent=None) -> None:
        self.clock = clock
        self.parent = parent
        #: The L{txlb.policy.redislimit.RedisBuckets}, once a limit needs it.
        self.redis = None
        self._built: dict[tuple, object] = {}
        self._previous: dict[tuple, object] = {}

    def configure(self, config) -> None:
        """
        A config (the first, or a reloaded one) is about to be applied:
        what it asks for below is built afresh or kept from the last one.
        """
        self._previous, self._built = self._built, {}
        wantsRedis = any(
            limit is not None and limit.store == "redis"
            for s in config.services
            for limit in (s.rate_limit, *(r.rate_limit for r in s.routes))
        )
        if wantsRedis and self.redis is None:
            from txlb.policy.redislimit import RedisBuckets

            self.redis = RedisBuckets(self.clock, config.sessions.redis)
            if self.parent is not None:
                self.redis.setServiceParent(self.parent)

    def _kept(self, key: tuple, make):
        thing = self._built.get(key) or self._previous.get(key)
        if thing is None:
            thing = make()
        self._built[key] = thing
        return thing

    def _limiter(self, name: str, config) -> Optional[RateLimiter]:
        if config is None:
            return None
        shared = self.redis if config.store == "redis" else None
        return self._kept(("rate_limit", name, config),
                          lambda: RateLimiter(name, config, self.clock, shared))

    @staticmethod
    def _access(config) -> Optional[AccessList]:
        return AccessList.fromConfig(config)

    def http(self, service) -> tuple[Optional[Admission], list[Optional[Admission]]]:
        """
        An HTTP service's admission, and each route's: a route's own
        C{allow}/C{deny} replaces its service's, and so does its own
        C{rate_limit} (with buckets of its own); what it does not say it
        takes from its service.
        """
        access = self._access(service.access)
        limiter = self._limiter(service.name, service.rate_limit)
        own = Admission(access, limiter) if access is not None or limiter is not None else None
        routes = []
        for i, route in enumerate(service.routes):
            if route.access is None and route.rate_limit is None:
                routes.append(own)
                continue
            routeAccess = access if route.access is None else self._access(route.access)
            routeLimiter = (limiter if route.rate_limit is None
                            else self._limiter(f"{service.name}/routes[{i}]", route.rate_limit))
            routes.append(Admission(routeAccess, routeLimiter))
        return own, routes

    def access(self, service) -> Optional[AccessList]:
        """A TCP or UDP service's C{allow}/C{deny}."""
        return self._access(service.access)

    def connections(self, service) -> Optional[ConnectionLimits]:
        """A TCP service's per-client C{limits}, or L{None} when it has none."""
        limits = service.limits
        if not limits.max_connections_per_client and limits.connection_rate is None:
            return None
        return self._kept(
            ("connections", service.name, limits.max_connections_per_client, limits.connection_rate),
            lambda: ConnectionLimits(self.clock, limits.max_connections_per_client, limits.connection_rate),
        )
