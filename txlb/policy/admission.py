# -*- test-case-name: tests.test_ratelimit -*-
"""
Whether an HTTP request may go on: a service's or route's C{allow}/C{deny}
(L{txlb.policy.access}) and C{rate_limit} (L{txlb.policy.ratelimit}),
asked once per request before anything else is done with it (no cache
lookup, no redirect, no backend).

L{Admission.admit} answers L{None} (go on), a L{Refusal}, or, when the
rate limit's buckets are shared through Redis, a L{Deferred} firing with
one of those two within the limit's timeout.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

from txlb.policy.access import DENY, AccessList
from txlb.policy.ratelimit import RATE_LIMIT, RateLimiter, retryAfter


@attrs.frozen
class Refusal:
    """
    What a refused client is answered: C{status}, the JSON C{error}, and
    extra header lines; C{reason} is what the refusal is counted and logged
    under (C{txlb_refused_total}, the C{request} event's C{refused}).
    """

    reason: str
    status: int
    message: str
    headers: bytes = b""


DENIED = Refusal(DENY, 403, "client not allowed")

#: Refusals by Retry-After, made once each.
_LIMITED: dict[int, Refusal] = {}


def limited(wait: float) -> Refusal:
    """The 429 for a wait of C{wait} seconds."""
    seconds = retryAfter(wait)
    refusal = _LIMITED.get(seconds)
    if refusal is None:
        refusal = Refusal(RATE_LIMIT, 429, "rate limit exceeded", b"Retry-After: %d\r\n" % seconds)
        if len(_LIMITED) < 4096:
            _LIMITED[seconds] = refusal
    return refusal


def _decided(wait: float) -> Optional[Refusal]:
    return limited(wait) if wait else None


class Admission:
    """
    The C{allow}/C{deny} and C{rate_limit} that apply to one route's (or
    the service's) requests; either may be L{None}.
    """

    def __init__(self, access: Optional[AccessList], limiter: Optional[RateLimiter]) -> None:
        self.access = access
        self.limiter = limiter

    def admit(self, client: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]):
        """L{None}, a L{Refusal}, or a L{Deferred} of one of them (see the module)."""
        access = self.access
        if access is not None and not access.allows(client):
            return DENIED
        limiter = self.limiter
        if limiter is None:
            return None
        wait = limiter.take(client, target, headers)
        if wait.__class__ is float:
            return limited(wait) if wait else None
        return wait.addCallback(_decided)  # a Deferred: the shared store decides
