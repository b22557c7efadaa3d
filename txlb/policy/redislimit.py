# -*- test-case-name: tests.test_ratelimit -*-
"""
Rate-limit buckets shared through Redis (C{rate_limit.store = "redis"},
at the C{[sessions] redis} address), so that every balancer and worker
process using that Redis counts against the same limit.

Each decision is one atomic Lua script (L{SCRIPT}), loaded once per
connection with C{SCRIPT LOAD} and run with C{EVALSHA} (C{EVAL} once when
Redis answers C{NOSCRIPT}, after a restart or a C{SCRIPT FLUSH}).  It keeps
one value per key, the time (Redis's own clock, so balancers' clocks need
not agree) at which the key's bucket is full again, and sets the key to
expire at exactly that time: keys vanish on their own.

Redis is a help, never a dependency of a request: a decision that Redis
does not answer within the limit's C{timeout} is made by this process's
own buckets (L{txlb.policy.ratelimit.Buckets}), Redis is then left alone
(logged once, C{rate_limit_degraded}) until a reconnection answers a
C{PING} again (C{rate_limit_restored}); meanwhile every decision is local.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txlb.balance.sessions import RedisConnected

_log = Logger(namespace="txlb.ratelimit")

#: KEYS[1]: the bucket; ARGV: the token interval and the tolerance
#: (C{burst - 1} intervals), in microseconds.  Answers 0 (a token was
#: taken) or the microseconds until one is free.
SCRIPT = """\
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local wait = tat - now - tolerance
if wait > 0 then return math.ceil(wait) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
"""


class RedisBuckets(RedisConnected):
    """
    One connection to Redis for every shared rate limit of this process.

    @param address: the Redis server, a client endpoint string.
    @param probeTimeout: how long a new connection has to answer C{PING}.
    """

    #: The live connection, with the script loaded, or L{None} (then: local only).
    _conn = None
    _candidate = None
    _sha = None
    _factory = None
    role = ("rate-limit store", "rate_limit")

    def __init__(self, clock, address: str, probeTimeout: float = 0.2) -> None:
        self.clock = clock
        self.address = address
        self.probeTimeout = probeTimeout
        #: Decisions made, by who made them: C{redis} or C{local}.
        self.decisions = {"redis": 0, "local": 0}

    def take(self, key: str, intervalUs: int, toleranceUs: int, timeout: float,
             fallback: Callable[[], float]) -> "float | Deferred[float]":
        """
        Take a token from the shared bucket C{key}: the wait in seconds
        (C{0.0}: taken), now from C{fallback} when Redis is away, or a
        L{Deferred} firing within C{timeout}.
        """
        conn = self._conn
        if conn is None:
            self.decisions["local"] += 1
            return fallback()
        try:
            command = conn.execute_command("EVALSHA", self._sha, 1, key, intervalUs, toleranceUs)
        except Exception as e:  # the connection died a moment ago
            self._failed(f"EVALSHA failed: {e}")
            self.decisions["local"] += 1
            return fallback()
        answer: Deferred = Deferred()

        def timedOut() -> None:
            self._failed(f"no answer within {timeout * 1000:g}ms")
            self.decisions["local"] += 1
            answer.callback(fallback())

        timer = self.clock.callLater(timeout, timedOut)

        def answered(value) -> None:
            if answer.called:
                return
            if isinstance(value, Failure) and "NOSCRIPT" in str(value.value) and conn is self._conn:
                # Redis lost its scripts: run it whole, which loads it again.
                again = conn.execute_command("EVAL", SCRIPT, 1, key, intervalUs, toleranceUs)
                again.addBoth(lastTry)
                return
            lastTry(value)

        def lastTry(value) -> None:
            if answer.called:
                return
            timer.cancel()
            if isinstance(value, Failure) or not isinstance(value, int):
                why = value.getErrorMessage() if isinstance(value, Failure) else f"answered {value!r}"
                self._failed(f"the rate-limit script failed: {why}")
                self.decisions["local"] += 1
                answer.callback(fallback())
                return
            self.decisions["redis"] += 1
            answer.callback(value / 1_000_000)

        command.addBoth(answered)
        return answer

    # Redis coming and going (through txlb.balance.sessions' reconnecting factory).

    def _up(self, conn) -> None:
        """
        A new connection: use it once it answers C{PING} and has the
        script, in time (a stopped Redis still accepts connections).
        """
        self._candidate = conn
        timer = self.clock.callLater(self.probeTimeout, self._probeTimedOut, conn)

        def loaded(sha) -> None:
            if not timer.active():
                return
            timer.cancel()
            if isinstance(sha, Failure) or conn is not self._candidate:
                if isinstance(sha, Failure):
                    self._candidate = None
                    self._failed(f"cannot load the rate-limit script: {sha.getErrorMessage()}")
                return
            self._sha = sha.decode("ascii") if isinstance(sha, bytes) else str(sha)
            self._accepted(conn)

        def ponged(value):
            if isinstance(value, Failure):
                return value
            return conn.execute_command("SCRIPT", "LOAD", SCRIPT)

        conn.execute_command("PING").addCallback(ponged).addBoth(loaded)

    def _failed(self, why: str) -> None:
        """
        Redis did not answer: decide locally from now on, and drop the
        connection so that reconnecting (with back-off) finds out when it
        is back.
        """
        conn, self._conn = self._conn, None
        if not self.running:
            return
        if not self.degraded:
            self.degraded = True
            _log.warn(
                "rate-limit store {address} unavailable ({reason}): each balancer limits on its own "
                "until it is back", event="rate_limit_degraded", store="redis", address=self.address,
                reason=why, fallback="memory",
            )
        if conn is not None and conn.transport is not None:
            conn.transport.abortConnection()
