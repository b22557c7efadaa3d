"""
Session stores on a Clock: the memory store's TTL and LRU bound, and the
Redis store's timeouts, fallback, outage logging and recovery against a
fake connection whose answers the tests give by hand.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from txlb.balance.sessions import MemoryStore, RedisStore, makeStore
from txlb.config import SessionsConfig
from txlb.interfaces import ISessionStore


def kinds(events, kind):
    return [e for e in events if e.get("event") == kind]


# The memory store.


def test_memory_store_provides_the_interface():
    assert verifyObject(ISessionStore, MemoryStore(Clock(), 10))


def test_entries_expire_ttl_after_their_last_use():
    clock = Clock()
    store = MemoryStore(clock, ttl=10)
    store.set("a", "s1")
    clock.advance(9)
    assert store.get("a") == "s1"  # used: ten more seconds
    clock.advance(9)
    assert store.get("a") == "s1"
    clock.advance(10)
    assert store.get("a") is None
    assert len(store) == 0


def test_least_recently_used_entries_go_first():
    clock = Clock()
    store = MemoryStore(clock, ttl=100, maxEntries=3)
    for key in "abc":
        store.set(key, "s-" + key)
        clock.advance(1)
    assert store.get("a") == "s-a"  # b is now the least recently used
    store.set("d", "s-d")
    assert len(store) == 3
    assert store.get("b") is None
    assert [store.get(k) for k in "acd"] == ["s-a", "s-c", "s-d"]


def test_expired_entries_are_dropped_as_new_ones_arrive():
    clock = Clock()
    store = MemoryStore(clock, ttl=5, maxEntries=1000)
    for i in range(100):
        store.set(f"k{i}", "s")
    clock.advance(6)
    store.set("new", "s")
    assert len(store) == 1


def test_replace_false_keeps_a_live_pin():
    clock = Clock()
    store = MemoryStore(clock, ttl=5)
    store.set("a", "s1")
    store.set("a", "s2", replace=False)
    assert store.get("a") == "s1"
    store.set("a", "s2")
    assert store.get("a") == "s2"
    clock.advance(6)
    store.set("a", "s3", replace=False)  # the old pin had expired
    assert store.get("a") == "s3"
    store.delete("a")
    store.delete("a")
    assert store.get("a") is None


def test_make_store_follows_the_config():
    clock = Clock()
    memory = makeStore(SessionsConfig(ttl=7, max_entries=9), clock)
    assert isinstance(memory, MemoryStore) and (memory.ttl, memory.maxEntries) == (7, 9)
    redis = makeStore(SessionsConfig(store="redis", redis="tcp:host=127.0.0.1:port=1", ttl=7), clock)
    assert isinstance(redis, RedisStore) and redis.ttl == 7 and redis.fallback.ttl == 7


# The Redis store, on a fake connection.


class FakeTransport:
    aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeRedis:
    connected = 1

    def __init__(self):
        self.transport = FakeTransport()
        self.sent: list[tuple] = []
        self.waiting: list[Deferred] = []

    def execute_command(self, *args):
        d = Deferred()
        self.sent.append(args)
        self.waiting.append(d)
        return d

    def reply(self, value, index=0):
        self.sent.pop(index)
        self.waiting.pop(index).callback(value)


def connected(clock, ttl=60.0):
    store = RedisStore(clock, "tcp:host=127.0.0.1:port=6379", MemoryStore(clock, ttl))
    store.running = True  # as if started, without connecting
    conn = FakeRedis()
    store._up(conn)
    assert conn.sent == [("PING",)]
    conn.reply("PONG")
    return store, conn


def result(d):
    out = []
    d.addBoth(out.append)
    return out


def test_redis_store_provides_the_interface():
    clock = Clock()
    assert verifyObject(ISessionStore, RedisStore(clock, "tcp:host=127.0.0.1:port=1", MemoryStore(clock, 1)))


def test_lookups_refresh_the_ttl_and_are_copied_to_memory(events):
    clock = Clock()
    store, conn = connected(clock, ttl=90)
    assert [e["event"] for e in events if "event" in e] == ["sessions_connected"]
    got = result(store.get("txlb:sticky:web:abc"))
    assert conn.sent == [("GETEX", "txlb:sticky:web:abc", "PX", 90000)]
    assert got == []
    conn.reply(b"s2")
    assert got == ["s2"]
    assert store.fallback.get("txlb:sticky:web:abc") == "s2"
    clock.advance(1)  # the timeout that did not fire stays quiet
    assert not kinds(events, "sessions_degraded")


def test_writes_carry_the_ttl_and_nx_for_new_pins():
    clock = Clock()
    store, conn = connected(clock, ttl=1.5)
    store.set("k", "s1", replace=False)
    store.set("k", "s2")
    store.delete("j")
    assert conn.sent == [("SET", "k", "s1", "PX", 1500, "NX"), ("SET", "k", "s2", "PX", 1500), ("DEL", "j")]


def test_a_slow_redis_is_waited_for_only_briefly_and_reported_once(events):
    clock = Clock()
    store, conn = connected(clock)
    store.set("k", "s1")
    conn.reply("OK")
    got = result(store.get("k"))
    clock.advance(0.074)
    assert got == []
    clock.advance(0.002)
    assert got == ["s1"]  # from memory
    assert conn.transport.aborted  # reconnecting finds out when it is back
    # Later requests do not wait at all, and the outage is logged once.
    for _ in range(5):
        assert store.get("k") == "s1"
    [degraded] = kinds(events, "sessions_degraded")
    assert degraded["reason"] == "no answer within 75ms" and degraded["fallback"] == "memory"
    conn.reply(None)  # the late answer changes nothing
    assert store.get("k") == "s1"


def test_redis_down_means_memory_then_redis_again_when_it_answers(events):
    clock = Clock()
    store, conn = connected(clock)
    store._down(conn)
    store._failed("cannot connect: refused")
    assert len(kinds(events, "sessions_degraded")) == 1
    store.set("k", "s3")  # pinned while Redis is away
    assert store.get("k") == "s3"
    again = FakeRedis()
    store._up(again)
    assert store.get("k") == "s3"  # not until it has answered
    again.reply("PONG")
    [restored] = kinds(events, "sessions_restored")
    assert restored["store"] == "redis"
    got = result(store.get("k"))
    assert again.sent == [("GETEX", "k", "PX", 60000)]
    again.reply(None)
    # Redis has not heard of it: this balancer's pin is shared now.
    assert got == ["s3"]
    assert again.sent == [("SET", "k", "s3", "PX", 60000, "NX")]


def test_a_connection_that_does_not_answer_its_ping_is_dropped(events):
    clock = Clock()
    store = RedisStore(clock, "tcp:host=127.0.0.1:port=6379", MemoryStore(clock, 60))
    store.running = True
    conn = FakeRedis()
    store._up(conn)
    clock.advance(1)
    assert conn.transport.aborted and store._probeFailures == 1
    assert len(kinds(events, "sessions_degraded")) == 1
    assert store.get("k") is None


def test_a_failed_command_falls_back(events):
    clock = Clock()
    store, conn = connected(clock)
    got = result(store.get("k"))
    conn.reply(Failure(ConnectionError("Lost connection")))
    assert got == [None]
    assert kinds(events, "sessions_degraded")[0]["reason"] == "lookup failed: Lost connection"


def test_redis_without_getex_gets_get_and_pexpire():
    clock = Clock()
    store, conn = connected(clock)
    got = result(store.get("k"))
    conn.reply(Failure(Exception("ERR unknown command 'GETEX'")))
    assert got == [None] and not store.degraded
    got = result(store.get("k"))
    assert conn.sent == [("GET", "k"), ("PEXPIRE", "k", 60000)]
    conn.reply("s1")
    assert got == ["s1"]


def test_stopping_is_no_outage(events):
    clock = Clock()
    store, conn = connected(clock)
    store.stopService()
    store._down(conn)
    assert store.get("k") is None
    assert not kinds(events, "sessions_degraded")


def test_a_connection_dead_under_our_feet_falls_back(events):
    clock = Clock()
    store, conn = connected(clock)
    store.set("k", "s1")

    def dead(*args):
        raise ConnectionError("Not connected")

    conn.execute_command = dead
    assert store.get("k") == "s1"
    store.set("k", "s2")
    assert store.get("k") == "s2"
    assert len(kinds(events, "sessions_degraded")) == 1


def test_a_connect_failure_says_only_why(events):
    from twisted.internet import defer, error
    from twisted.internet.protocol import Factory

    from txlb.balance.sessions import _WatchedEndpoint

    class Refusing:
        def connect(self, factory):
            return defer.fail(error.getConnectError((111, "Connection refused")))

    clock = Clock()
    store = RedisStore(clock, "tcp:host=127.0.0.1:port=6379", MemoryStore(clock, 60))
    store.running = True
    failed = []
    _WatchedEndpoint(Refusing(), store).connect(Factory()).addErrback(failed.append)
    assert failed  # the reconnecting service retries
    [degraded] = kinds(events, "sessions_degraded")
    assert degraded["reason"] == "cannot connect: Connection refused"  # not Twisted's "An error occurred..."
