"""
Rate limits (L{txlb.policy.ratelimit}, L{txlb.policy.admission},
L{txlb.policy.redislimit}, L{txlb.policy.build}): token buckets on a
Clock, with exact counts of refusals and exact Retry-After values; the
shared store's fallback, timeout and NOSCRIPT handling against a fake
Redis connection; the HTTP proxy's 429 on StringTransport.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txlb.config import parse
from txlb.config._policy import RateLimitConfig
from txlb.http.routing import Router
from txlb.observe.metrics import Metrics
from txlb.policy.access import AccessList
from txlb.policy.admission import DENIED, Admission, Refusal, limited
from txlb.policy.build import Policies
from txlb.policy.ratelimit import (
    MAX_KEYS,
    Buckets,
    ConnectionLimits,
    RateLimiter,
    checkKey,
    parseRate,
    retryAfter,
)
from txlb.policy.redislimit import SCRIPT, RedisBuckets

from tests.test_http_frontend import Harness, head


def limitConfig(rate="10/s", burst=5, key="ip", store="memory", timeout=0.05) -> RateLimitConfig:
    return RateLimitConfig(rate=parseRate(rate), burst=burst, key=key, store=store, timeout=timeout)


# Parsing.


@pytest.mark.parametrize("text, per_second", [("100/s", 100.0), ("600/m", 10.0), ("36/h", 0.01), ("2.5/s", 2.5),
                                              (" 5 / s ", 5.0)])
def test_rates(text, per_second):
    assert parseRate(text).perSecond == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["100", "100/d", "/s", "-1/s", "0/s", "1e3/s", "ten/s", ""])
def test_bad_rates(text):
    with pytest.raises(ValueError):
        parseRate(text)


def test_keys():
    for good in ("ip", "header:X-Api-Key", "cookie:SESSION"):
        assert checkKey(good) == good
    for bad in ("IP", "header:", "cookie:a b", "query:x", "path"):
        with pytest.raises(ValueError):
            checkKey(bad)


@pytest.mark.parametrize("wait, seconds", [(0.001, 1), (0.5, 1), (1.0, 1), (1.0000001, 2), (10.0, 10), (59.3, 60)])
def test_retry_after_is_whole_seconds_at_least_one(wait, seconds):
    assert retryAfter(wait) == seconds


# Buckets.


def test_a_burst_above_the_limit_gets_exactly_the_excess_refused():
    clock = Clock()
    buckets = Buckets(clock, rate=10.0, burst=5)
    waits = [buckets.take("c") for _ in range(12)]
    assert waits[:5] == [0.0] * 5
    assert len([w for w in waits if w]) == 7
    assert all(w == pytest.approx(0.1) for w in waits[5:])


def test_tokens_come_back_at_the_rate():
    clock = Clock()
    buckets = Buckets(clock, rate=10.0, burst=5)
    for _ in range(5):
        assert buckets.take("c") == 0.0
    # 100 requests, one every 10ms over the next second: a token every 100ms.
    allowed = 0
    for _ in range(100):
        clock.advance(0.01)
        allowed += buckets.take("c") == 0.0
    assert allowed == 10


def test_retry_after_values():
    clock = Clock()
    buckets = Buckets(clock, rate=parseRate("6/m").perSecond, burst=2)
    assert buckets.take("c") == buckets.take("c") == 0.0
    wait = buckets.take("c")
    assert wait == pytest.approx(10.0) and retryAfter(wait) == 10
    clock.advance(4)
    assert retryAfter(buckets.take("c")) == 6
    clock.advance(6)
    assert buckets.take("c") == 0.0
    assert retryAfter(buckets.take("c")) == 10
    # A refusal takes nothing: the wait only shrinks with time.
    clock.advance(9.5)
    assert retryAfter(buckets.take("c")) == 1
    clock.advance(0.5)
    assert buckets.take("c") == 0.0


def test_keys_have_their_own_buckets():
    clock = Clock()
    buckets = Buckets(clock, rate=1.0, burst=1)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_idle_keys_are_dropped_as_new_ones_come():
    clock = Clock()
    buckets = Buckets(clock, rate=10.0, burst=5)
    for i in range(50):
        buckets.take(f"old{i}")
    assert len(buckets) == 50
    clock.advance(1.0)  # every old bucket is full again: as good as absent
    for i in range(50):
        buckets.take(f"new{i}")
    assert len(buckets) == 50
    # A key still in debt is kept, and still refused.
    for _ in range(5):
        buckets.take("new0")
    assert buckets.take("new0") > 0


def test_memory_is_bounded_whatever_the_clients_do():
    clock = Clock()
    buckets = Buckets(clock, rate=0.001, burst=1, maxKeys=100)
    for i in range(1000):
        buckets.take(f"k{i}")
    assert len(buckets) == 100
    assert MAX_KEYS >= 10_000


# What a request counts against.


def test_limiter_keys():
    clock = Clock()
    byIp = RateLimiter("web", limitConfig(), clock)
    assert byIp.keyOf("10.0.0.1", b"/", []) == "10.0.0.1"
    byHeader = RateLimiter("web", limitConfig(key="header:X-Api-Key"), clock)
    assert byHeader.keyOf("10.0.0.1", b"/", [(b"x-api-KEY", b"k1")]) == "k=k1"
    assert byHeader.keyOf("10.0.0.1", b"/", []) == "ip=10.0.0.1"
    assert len(byHeader.keyOf("10.0.0.1", b"/", [(b"X-Api-Key", b"x" * 5000)])) < 100
    byCookie = RateLimiter("web", limitConfig(key="cookie:SID"), clock)
    assert byCookie.keyOf("10.0.0.1", b"/", [(b"Cookie", b"a=1; SID=s9")]) == "k=s9"


def test_an_api_key_is_limited_across_clients_and_a_missing_one_per_client():
    clock = Clock()
    limiter = RateLimiter("web", limitConfig(rate="1/m", burst=2, key="header:X-Api-Key"), clock)
    key = [(b"X-Api-Key", b"k1")]
    assert [limiter.take(c, b"/", key) == 0.0 for c in ("1.1.1.1", "2.2.2.2", "3.3.3.3")] == [True, True, False]
    assert limiter.take("1.1.1.1", b"/", []) == 0.0  # without the header: its own bucket, by address


# Admission.


def test_admission_denies_before_limiting():
    clock = Clock()
    limiter = RateLimiter("web", limitConfig(rate="1/s", burst=1), clock)
    admission = Admission(AccessList(None, ["10.9.0.0/16"]), limiter)
    assert admission.admit("10.9.1.1", b"/", []) is DENIED
    assert len(limiter.local) == 0  # a denied client takes no token
    assert admission.admit("10.1.1.1", b"/", []) is None
    refusal = admission.admit("10.1.1.1", b"/", [])
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.status, refusal.headers) == ("rate_limit", 429, b"Retry-After: 1\r\n")
    assert limited(61.2).headers == b"Retry-After: 62\r\n"


def test_connection_limits():
    clock = Clock()
    limits = ConnectionLimits(clock, maxPerClient=2, rate=parseRate("3/s"))
    assert limits.admit("c", 0) is None
    assert limits.admit("c", 2) == "max_connections_per_client"
    assert limits.admit("c", 1) is None
    assert limits.admit("c", 1) is None
    assert limits.admit("c", 1) == "connection_rate"  # 3 at once, then one every 1/3 s
    clock.advance(1 / 3)
    assert limits.admit("c", 1) is None


# The HTTP proxy: 429 with Retry-After, counted and logged.


def test_http_burst_gets_exactly_the_excess_429s(events):
    h = Harness()
    clock = h.reactor
    metrics = Metrics(h.service.pools, clock)
    h.service.metrics = metrics
    admission = Admission(None, RateLimiter("web", limitConfig(rate="2/s", burst=3), clock))
    h.service.update(router=Router("p", (), admission=admission))
    frontend, client = h.accept()
    statuses = []
    for i in range(5):
        before = len(client.value())
        frontend.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        if h.connects() > len(h.backends):
            backend, _ = h.answer()
        if len(client.value()) == before:
            h.backends[-1][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        statuses.append(client.value()[before:].split(b" ", 2)[1])
    assert statuses == [b"200", b"200", b"200", b"429", b"429"]
    last = client.value()[client.value().rindex(b"HTTP/1.1 429"):]
    status, fields = head(last)
    assert fields[b"retry-after"] == [b"1"]
    assert fields[b"content-type"] == [b"application/json"]
    assert json.loads(last.partition(b"\r\n\r\n")[2])["error"] == "rate limit exceeded"
    refused = [e for e in events if e.get("event") == "request" and e.get("refused")]
    assert [(e["status"], e["refused"], e["selectedServer"]) for e in refused] == [(429, "rate_limit", None)] * 2
    assert metrics.refusals == {("web", "rate_limit"): 2}
    clock.advance(0.5)  # one token back
    before = len(client.value())
    frontend.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client.value()[before:] == b""
    assert sum(t.value().count(b"GET /x ") for _, t in h.backends) == 4  # the fourth reached a backend


def test_http_deny_is_a_403_and_no_backend_is_touched(events):
    h = Harness()
    h.service.update(router=Router("p", (), admission=Admission(AccessList(["10.0.0.0/8"]), None)))
    frontend, client = h.accept("192.0.2.9")
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    status, fields = head(client.value())
    assert status == b"HTTP/1.1 403 Forbidden"
    body = json.loads(client.value().partition(b"\r\n\r\n")[2])
    assert body["error"] == "client not allowed" and body["requestId"]
    assert h.connects() == 0
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["refused"] == "deny" and event["status"] == 403


def test_http_waits_for_the_shared_store_without_reading_on(events):
    """While Redis decides, the request waits; a refusal from it is a 429."""
    h = Harness()

    class Deciding:
        def __init__(self):
            self.pending: list[Deferred] = []

        def take(self, client, target, headers):
            d = Deferred()
            self.pending.append(d)
            return d

    deciding = Deciding()
    h.service.update(router=Router("p", (), admission=Admission(None, deciding)))
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
    assert h.connects() == 0 and client.producerState == "paused"
    deciding.pending[0].callback(0.0)
    assert h.connects() == 1
    h.answer()
    assert client.producerState == "producing"
    frontend.dataReceived(b"cd")
    h.backends[0][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert h.backends[0][1].value().endswith(b"\r\n\r\nabcd")
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    deciding.pending[1].callback(2.5)
    assert b"HTTP/1.1 429" in client.value() and b"Retry-After: 3\r\n" in client.value()


# The shared store, against a fake connection.


class FakeTransport:
    aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeRedis:
    """Answers nothing until told: each command's Deferred is kept."""

    def __init__(self):
        self.commands: list[tuple] = []
        self.transport = FakeTransport()

    def execute_command(self, *args):
        d = Deferred()
        self.commands.append((args, d))
        return d


def sharedStore(clock):
    store = RedisBuckets(clock, "tcp:host=127.0.0.1:port=1")
    store.running = True  # as if started, without connecting
    conn = FakeRedis()
    store._up(conn)
    (ping, d), = conn.commands
    assert ping == ("PING",)
    d.callback("PONG")
    (load, d) = conn.commands[1]
    assert load == ("SCRIPT", "LOAD", SCRIPT)
    d.callback("f00d")
    assert store._conn is conn
    return store, conn


def test_shared_decision_is_one_evalsha():
    clock = Clock()
    store, conn = sharedStore(clock)
    limiter = RateLimiter("web", limitConfig(rate="4/s", burst=2, store="redis"), clock, store)
    d = limiter.take("10.0.0.1", b"/", [])
    args, answer = conn.commands[-1]
    assert args == ("EVALSHA", "f00d", 1, "txlb:rl:web:10.0.0.1", 250_000, 250_000)
    got = []
    d.addCallback(got.append)
    answer.callback(750_000)
    assert got == [0.75]
    assert store.decisions == {"redis": 1, "local": 0}


def test_noscript_runs_the_script_whole():
    clock = Clock()
    store, conn = sharedStore(clock)
    limiter = RateLimiter("web", limitConfig(store="redis"), clock, store)
    got = []
    limiter.take("c", b"/", []).addCallback(got.append)
    conn.commands[-1][1].errback(Failure(Exception("NOSCRIPT No matching script. Please use EVAL.")))
    args, answer = conn.commands[-1]
    assert args[:3] == ("EVAL", SCRIPT, 1)
    answer.callback(0)
    assert got == [0.0] and not store.degraded


def test_a_slow_redis_falls_back_within_the_timeout(events):
    clock = Clock()
    store, conn = sharedStore(clock)
    limiter = RateLimiter("web", limitConfig(rate="1/m", burst=1, store="redis", timeout=0.05), clock, store)
    got = []
    limiter.take("c", b"/", []).addCallback(got.append)
    clock.advance(0.049)
    assert got == []
    clock.advance(0.001)
    assert got == [0.0]  # the local bucket decided
    assert store.degraded and conn.transport.aborted and store._conn is None
    conn.commands[-1][1].callback(0)  # a late answer changes nothing
    assert got == [0.0]
    # Meanwhile every decision is local, at once, and the local bucket limits.
    assert limiter.take("c", b"/", []) > 0
    assert store.decisions == {"redis": 0, "local": 2}
    assert [e["event"] for e in events if e.get("event", "").startswith("rate_limit")] == [
        "rate_limit_connected", "rate_limit_degraded"]
    # A new connection that answers brings Redis back.
    conn2 = FakeRedis()
    store._up(conn2)
    conn2.commands[0][1].callback("PONG")
    conn2.commands[1][1].callback("f00d")
    assert store._conn is conn2 and not store.degraded
    assert [e["event"] for e in events if e.get("event", "").startswith("rate_limit")][-1] == "rate_limit_restored"


def test_a_new_connection_that_does_not_answer_is_dropped():
    clock = Clock()
    store = RedisBuckets(clock, "tcp:host=127.0.0.1:port=1", probeTimeout=0.2)
    store.running = True
    conn = FakeRedis()
    store._up(conn)
    clock.advance(0.2)
    assert store._conn is None and conn.transport.aborted and store._probeFailures == 1


def test_an_error_from_redis_falls_back():
    clock = Clock()
    store, conn = sharedStore(clock)
    limiter = RateLimiter("web", limitConfig(store="redis"), clock, store)
    got = []
    limiter.take("c", b"/", []).addCallback(got.append)
    conn.commands[-1][1].errback(Failure(Exception("LOADING Redis is loading the dataset in memory")))
    assert got == [0.0] and store.degraded


# Compiling a config, and reloads.


CONFIG = """
[pools.p]
servers = [{{ name = "a", address = "127.0.0.1:9001" }}]

[[services]]
name = "web"
protocol = "http"
listen = "tcp:8080"
pool = "p"
rate_limit = {{ rate = "{rate}", burst = 3 }}
allow = ["10.0.0.0/8"]

[[services.routes]]
path_prefix = "/own"
pool = "p"
rate_limit = {{ rate = "1/s" }}

[[services.routes]]
path_prefix = "/inherits"
pool = "p"
deny = ["10.9.0.0/16"]
"""


def test_routes_take_what_they_do_not_say_from_their_service():
    policies = Policies(Clock())
    config = parse(CONFIG.format(rate="5/s"))
    policies.configure(config)
    own, (route0, route1) = policies.http(config.services[0])
    assert route0.limiter is not own.limiter and route0.access is own.access
    assert route0.limiter.prefix == "txlb:rl:web/routes[0]:"
    assert route1.limiter is own.limiter and route1.access is not own.access
    assert route1.admit("10.9.0.1", b"/", []) is DENIED
    assert own.admit("10.9.0.1", b"/", []) is None


def test_a_reload_keeps_the_buckets_of_unchanged_limits_only():
    policies = Policies(Clock())
    config = parse(CONFIG.format(rate="5/s"))
    policies.configure(config)
    own, routes = policies.http(config.services[0])
    policies.configure(config)
    again, routesAgain = policies.http(config.services[0])
    assert again.limiter is own.limiter and routesAgain[0].limiter is routes[0].limiter
    changed = parse(CONFIG.format(rate="6/s"))
    policies.configure(changed)
    third, routesThird = policies.http(changed.services[0])
    assert third.limiter is not own.limiter
    assert routesThird[0].limiter is routes[0].limiter  # the route's own did not change


def test_a_shared_limit_makes_one_redis_client():
    config = parse(CONFIG.format(rate="5/s").replace('burst = 3 }', 'burst = 3, store = "redis" }')
                   + '[sessions]\nredis = "tcp:host=127.0.0.1:port=7777"\n')
    policies = Policies(Clock())
    policies.configure(config)
    assert policies.redis is not None and policies.redis.address == "tcp:host=127.0.0.1:port=7777"
    own, routes = policies.http(config.services[0])
    assert own.limiter.shared is policies.redis and routes[0].limiter.shared is None
    first = policies.redis
    policies.configure(config)
    assert policies.redis is first
