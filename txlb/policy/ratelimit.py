# -*- test-case-name: tests.test_ratelimit -*-
"""
How fast: token buckets per client (or per API key, or per session
cookie), for C{rate_limit} on HTTP services and routes and for
C{limits.connection_rate} on TCP services.

A bucket holds at most C{burst} tokens and gains C{rate} tokens a second;
each request takes one, and a request that finds none is refused with the
time until one is free.  The buckets are kept in the equivalent "generic
cell rate" form: one number per key, the time at which its bucket would
be full again (its theoretical arrival time).  A key whose time has passed
has a full bucket, which is the same as having no entry, so idle keys are
dropped as new ones come (in least recently used order) and memory is
bounded by L{MAX_KEYS} whatever the clients do.  The same form makes the
shared store (L{txlb.policy.redislimit}) a single small value per key
with an expiry of exactly that time.

C{store = "memory"} keeps the buckets in this process: with
C{[txlb] workers} above one, each worker process has its own, so the
service as a whole lets through up to C{workers} times the rate.
C{store = "redis"} shares them between every process and balancer using
the same Redis, and falls back to these local buckets while Redis is slow
or away.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import attrs

from txlb.balance.hashkey import hashKeyOf

#: The reasons a refusal is counted and logged under.
RATE_LIMIT = "rate_limit"
CONNECTION_RATE = "connection_rate"

#: Keys remembered per bucket set; the least recently used go first.
MAX_KEYS = 100_000

#: Idle keys looked at (and dropped when their bucket is full) per new key.
_SWEEP = 4

#: Rounding slack when comparing times (seconds).
_EPSILON = 1e-9

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(s|m|h)")
_KEY = re.compile(r"ip|(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@attrs.frozen
class Rate:
    """C{count} tokens every C{per} seconds, as the operator wrote it (C{text})."""

    count: float
    per: float
    text: str

    @property
    def perSecond(self) -> float:
        return self.count / self.per


def parseRate(text: str) -> Rate:
    """
    C{"100/s"}, C{"600/m"} or C{"10/h"}.

    @raise ValueError: with a message an operator can act on.
    """
    m = _RATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a rate (write it like \"100/s\", \"600/m\" or \"10/h\")")
    count = float(m.group(1))
    if count <= 0:
        raise ValueError(f"{text!r}: the rate must be more than 0 (leave the limit out for none)")
    return Rate(count, _UNITS[m.group(2)], text)


def checkKey(text: str) -> str:
    """
    A C{rate_limit.key}: C{ip}, C{header:NAME} or C{cookie:NAME}.

    @raise ValueError: it is none of those.
    """
    if not isinstance(text, str) or not _KEY.fullmatch(text):
        raise ValueError(f"{text!r} is not a key (\"ip\", \"header:NAME\" or \"cookie:NAME\")")
    return text


def retryAfter(wait: float) -> int:
    """The C{Retry-After} for a wait of C{wait} seconds: whole seconds, at least 1."""
    return max(1, math.ceil(wait - _EPSILON))


class Buckets:
    """
    Token buckets in this process's memory, one per key.

    @param clock: an C{IReactorTime}.
    @param rate: tokens a second.
    @param burst: tokens a bucket holds.
    """

    def __init__(self, clock, rate: float, burst: int, maxKeys: int = MAX_KEYS) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.maxKeys = maxKeys
        #: Seconds one token takes to come back.
        self.interval = 1.0 / rate
        #: How far ahead of now a key's full-again time may be and still
        #: have a token: C{burst - 1} intervals.
        self.tolerance = self.interval * (burst - 1)
        self._full: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full)

    def take(self, key: str) -> float:
        """
        Take a token from C{key}'s bucket: C{0.0} when there was one, else
        the seconds until there is (more than 0); nothing is taken then.
        """
        now = self.clock.seconds()
        full = self._full
        tat = full.get(key)
        if tat is None:
            self._room(now)
            full[key] = now + self.interval
            return 0.0
        if tat < now:
            tat = now
        wait = tat - now - self.tolerance
        if wait > _EPSILON:
            return wait
        full[key] = tat + self.interval
        full.move_to_end(key)
        return 0.0

    def _room(self, now: float) -> None:
        """Before a new key: drop a few idle ones, and the oldest when full."""
        full = self._full
        for _ in range(_SWEEP):
            if not full:
                return
            key, tat = next(iter(full.items()))
            if tat > now:
                break
            del full[key]
        while len(full) >= self.maxKeys:
            full.popitem(last=False)


class RateLimiter:
    """
    One C{rate_limit} table, compiled: which key a request counts against,
    and the buckets (this process's, and the shared ones when C{store =
    "redis"}).

    @param name: the key prefix shared buckets are stored under (the
        service, and the route when it has its own limit).
    @param shared: a L{txlb.policy.redislimit.RedisBuckets}, or L{None}.
    """

    def __init__(self, name: str, config, clock, shared=None) -> None:
        self.config = config
        rate = config.rate
        self.local = Buckets(clock, rate.perSecond, config.burst)
        self._take = self.local.take
        self.shared = shared
        self.timeout = config.timeout
        self.prefix = f"txlb:rl:{name}:"
        self.spec = config.key
        self.byClient = config.key == "ip"
        # The shared script's arguments, in microseconds (whole numbers
        # travel exactly; the Lua side has double precision).
        self._intervalUs = max(1, round(self.local.interval * 1_000_000))
        self._toleranceUs = round(self.local.tolerance * 1_000_000)

    def keyOf(self, client: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> str:
        """
        What the request counts against: the client address, or the named
        header's or cookie's value.  A request without that header or
        cookie counts against its client address, so that leaving it out
        is no way around the limit.
        """
        if self.byClient:
            return client
        value = hashKeyOf(self.spec, target, headers)
        if value is None:
            return "ip=" + client
        if len(value) > 128:
            value = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
        return "k=" + value

    def take(self, client: str, target: bytes, headers: Sequence[tuple[bytes, bytes]]):
        """
        Take a token for this request: a wait in seconds (C{0.0}: go
        ahead), or, when the buckets are shared, a L{Deferred} firing with
        one within C{timeout} (this process's buckets decide when Redis
        does not answer in time).
        """
        key = client if self.byClient else self.keyOf(client, target, headers)
        shared = self.shared
        if shared is None:
            return self._take(key)
        return shared.take(self.prefix + key, self._intervalUs, self._toleranceUs, self.timeout,
                           self._fallback(key))

    def _fallback(self, key: str) -> Callable[[], float]:
        local = self.local
        return lambda: local.take(key)


class ConnectionLimits:
    """
    A TCP service's C{limits}: C{max_connections_per_client} (0: none)
    and C{connection_rate} (a L{Rate}, or L{None}), per client address.
    A connection rate of C{N/unit} lets a client open N connections at
    once, then one every C{unit/N}.
    """

    def __init__(self, clock, maxPerClient: int = 0, rate: Optional[Rate] = None) -> None:
        self.maxPerClient = maxPerClient
        self.rate = rate
        self.buckets = None if rate is None else Buckets(clock, rate.perSecond, max(1, math.floor(rate.count)))

    def admit(self, client: str, open: int) -> Optional[str]:
        """
        The reason to refuse a new connection from C{client}, which has
        C{open} connections already, or L{None} to let it in.
        """
        if self.maxPerClient and open >= self.maxPerClient:
            return "max_connections_per_client"
        if self.buckets is not None and self.buckets.take(client):
            return CONNECTION_RATE
        return None
