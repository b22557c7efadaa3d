# -*- test-case-name: tests.test_policy_access -*-
"""
The records of who may come in and how fast: C{allow}/C{deny} and
C{rate_limit} on services and routes, and a TCP service's per-client
C{limits}.  Read by L{txlb.config._admission}; compiled for the proxy by
L{txlb.policy.access} and L{txlb.policy.ratelimit}.
"""

from __future__ import annotations

from typing import Optional

import attrs

from txlb.policy.ratelimit import Rate


@attrs.frozen
class AccessConfig:
    """
    C{allow} and C{deny}, as written (each already checked to be a
    network).  C{allow = None}: everyone who is not denied.
    """

    allow: Optional[tuple[str, ...]] = None
    deny: tuple[str, ...] = ()


@attrs.frozen
class RateLimitConfig:
    """
    A C{rate_limit} table: C{burst} tokens per key, refilled at C{rate};
    C{key} is C{ip}, C{header:NAME} or C{cookie:NAME}; C{store} is
    C{memory} or C{redis}, whose answers are awaited C{timeout} seconds.
    """

    rate: Rate
    burst: int
    key: str = "ip"
    store: str = "memory"
    timeout: float = 0.05
