# -*- test-case-name: tests.test_policy_access -*-
"""
Reading who may come in and how fast: C{allow}, C{deny} and
C{rate_limit} on services and routes, and a TCP service's per-client
C{limits}.  Every value is checked here, with its key path, so that
compiling the records (L{txlb.policy.access}, L{txlb.policy.ratelimit})
cannot fail.
"""

from __future__ import annotations

from typing import Any, Optional

from txlb.config._policy import AccessConfig, RateLimitConfig
from txlb.config._table import _describe, _integer, _Invalid, _oneOf, _positiveDuration, _Table
from txlb.policy.access import AccessList, parseNetwork
from txlb.policy.ratelimit import Rate, checkKey, parseRate

#: The longest a request may wait for the shared store.
MAX_TIMEOUT = 1.0


def _networks(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _Invalid('must be a network or a non-empty array of them, like ["10.0.0.0/8", "192.0.2.7"]')
    problems = []
    out = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, str):
                raise ValueError(f"must be a string, not {_describe(item)}")
            out.append(str(parseNetwork(item.strip())))
        except ValueError as e:
            problems.append((i, str(e)))
    if problems:
        if isinstance(value, str):
            raise _Invalid(problems[0][1])
        raise _Invalid(items=problems)
    return tuple(out)


def readAccess(t: _Table) -> Optional[AccessConfig]:
    """A service's or route's C{allow} and C{deny}, or L{None} when it has neither."""
    allow = t.get("allow", _networks, None)
    deny = t.get("deny", _networks, ())
    if "allow" not in t.data and "deny" not in t.data:
        return None
    return AccessConfig(allow=allow, deny=deny)


def rate(value: Any) -> Rate:
    """A rate: C{"100/s"}, C{"600/m"}, C{"10/h"}."""
    if not isinstance(value, str):
        raise _Invalid(f'must be a string like "100/s", not {_describe(value)}')
    try:
        return parseRate(value)
    except ValueError as e:
        raise _Invalid(str(e))


def _key(value: Any) -> str:
    try:
        return checkKey(value)
    except ValueError as e:
        raise _Invalid(str(e))


def _timeout(value: Any) -> float:
    seconds = _positiveDuration(value)
    if seconds > MAX_TIMEOUT:
        raise _Invalid(f"must be at most {MAX_TIMEOUT:g}s: every request waits this long when Redis stalls")
    return seconds


def readRateLimit(t: Optional[_Table]) -> Optional[RateLimitConfig]:
    """A service's or route's C{rate_limit} table."""
    if t is None:
        return None
    limit = t.get("rate", rate)
    default = max(1, int(limit.count)) if limit is not None else 1
    config = RateLimitConfig(
        rate=limit,
        burst=t.get("burst", _integer(1, 1_000_000_000), default),
        key=t.get("key", _key, "ip"),
        store=t.get("store", _oneOf("memory", "redis"), "memory"),
        timeout=t.get("timeout", _timeout, 0.05),
    )
    if "timeout" in t.data and config.store != "redis":
        t.error("timeout", 'is how long to wait for Redis: it applies to store = "redis" only')
    t.finish()
    return config


def checkRedis(t: _Table, service, sessions: Any) -> None:
    """
    A limit shared through Redis needs to be told where Redis is:
    C{sessions} is the C{[sessions]} table as written, if any.
    """
    if isinstance(sessions, dict) and "redis" in sessions:
        return
    limits = [("rate_limit", getattr(service, "rate_limit", None))]
    limits += [(f"routes[{i}].rate_limit", r.rate_limit) for i, r in enumerate(getattr(service, "routes", ()))]
    for where, limit in limits:
        if limit is not None and limit.store == "redis":
            t.error(f"{where}.store", 'is "redis", but [sessions] has no redis address: add '
                                      '[sessions] redis = "tcp:host=127.0.0.1:port=6379"')


def _describeLimit(limit: Optional[RateLimitConfig]) -> list[str]:
    if limit is None:
        return []
    store = "per process (memory)" if limit.store == "memory" else f"shared (redis, {limit.timeout * 1000:g}ms timeout)"
    return [f"rate_limit: {limit.rate.text}, burst {limit.burst}, by {limit.key}, {store}"]


def _describeAccess(access: Optional[AccessConfig]) -> list[str]:
    if access is None:
        return []
    return [f"access: {AccessList(access.allow, access.deny).describe()}"]


def describeAdmission(service) -> list[str]:
    """Lines for C{--check}'s summary: who may come in and how fast, service then routes."""
    lines = _describeAccess(getattr(service, "access", None)) + _describeLimit(getattr(service, "rate_limit", None))
    limits = service.limits
    if limits.max_connections_per_client:
        lines.append(f"at most {limits.max_connections_per_client} connections per client")
    if limits.connection_rate is not None:
        lines.append(f"connection_rate: {limits.connection_rate.text} per client")
    for i, route in enumerate(service.routes):
        own = _describeAccess(route.access) + _describeLimit(route.rate_limit)
        lines += [f"routes[{i}] {line}" for line in own]
    return lines
