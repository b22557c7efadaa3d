"""
Cluster membership, the leader lease with fencing, and admin changes shared
between nodes: L{txlb.control.cluster.Cluster}'s time runs on a L{Clock}, its store is
a real C{redis-server} started on a free loopback port.

Redis replies arrive through the global reactor, which these tests turn by
hand (L{spin}) until the reply they wait for has landed; the cluster's own
timing (heartbeats, lease deadlines) only moves when the test advances the
clock.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Callable, Optional

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import ClusterConfig
from txlb.control.cluster import (
    Cluster, IClusterStore, RedisConnection, RedisStore, Standalone, applyChange, spawnCommand,
)
from tests.support import RedisServer

pytest.importorskip("txredisapi")

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis():
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    server = RedisServer()
    yield server
    server.stop()


def spin(condition: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Turn the global reactor until C{condition()} is true (I/O only)."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        reactor.iterate(0.01)


def resolve(d: defer.Deferred, timeout: float = 5.0):
    """The result of C{d}, turning the reactor until it has one."""
    box: list = []
    d.addBoth(box.append)
    spin(lambda: box, timeout, "a Deferred")
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def connection(redis):
    from twisted.internet import reactor

    conn = RedisConnection(reactor, redis.address)
    conn.startService()
    yield conn
    resolve(conn.stopService())


class Listeners:
    """Stands in for the service's listeners: counts what was asked."""

    def __init__(self) -> None:
        self.open = False
        self.opened = 0
        self.closed = 0

    def openListeners(self) -> None:
        self.open = True
        self.opened += 1

    def closeListeners(self) -> None:
        self.open = False
        self.closed += 1


class Flaky:
    """A store that can be made unreachable."""

    def __init__(self, store) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name):
        method = getattr(self.store, name)
        if name == "subscribe":
            return method

        def call(*args):
            if self.down:
                return defer.fail(ConnectionError("Redis is down"))
            return method(*args)

        return call


def makeNode(connection, name, clock, mode="active-passive", on_active="", store=None, pools=None):
    config = ClusterConfig(
        mode=mode, node=name, heartbeat=1.0, failover_after=3.0,
        address=f"127.0.0.{len(name) + ord(name[-1]) % 200}", on_active=on_active,
    )
    store = store or RedisStore(connection.execute, connection.subscribe)
    listeners = Listeners()
    commands: list[str] = []

    def run(command):
        commands.append(command)
        return defer.succeed(0)

    node = Cluster(config, store, clock, listeners, (lambda: pools) if pools is not None else dict, run)
    node.listenersStub, node.commands = listeners, commands
    return node


def settle(clock: Clock, *nodes: Cluster) -> None:
    """Wait for every node's requests of this heartbeat to be answered."""
    for node in nodes:
        if node.running:
            spin(lambda: node._viewAt == clock.seconds(), what=f"{node.config.node}'s heartbeat")


def beat(clock: Clock, *nodes: Cluster, seconds: float = 1.0) -> None:
    clock.advance(seconds)
    settle(clock, *nodes)


def start(clock: Clock, *nodes: Cluster) -> None:
    for node in nodes:
        node.startService()
        settle(clock, node)


def test_store_provides_the_interface(connection):
    verifyObject(IClusterStore, RedisStore(connection.execute, connection.subscribe))


def test_claim_is_set_if_absent_or_renew_if_ours(connection, redis):
    store = RedisStore(connection.execute)
    assert resolve(store.claim("a 1", 3)) == (True, "a 1")
    assert resolve(store.claim("b 2", 3)) == (False, "a 1")
    assert resolve(store.claim("a 1", 3)) == (True, "a 1")
    assert 2000 < int(redis.command("PTTL", "txlb:cluster:leader")) <= 3000
    resolve(store.release("b 2"))
    assert redis.command("GET", "txlb:cluster:leader") == "a 1"
    resolve(store.release("a 1"))
    assert resolve(store.claim("b 2", 3)) == (True, "b 2")


def test_members_are_the_unexpired_heartbeats(connection, redis):
    store = RedisStore(connection.execute)
    resolve(store.heartbeat("a", '{"node": "a"}', 3))
    resolve(store.heartbeat("b", '{"node": "b"}', 3))
    assert sorted(resolve(store.members())) == ['{"node": "a"}', '{"node": "b"}']
    redis.command("DEL", "txlb:cluster:node:b")
    assert resolve(store.members()) == ['{"node": "a"}']
    assert redis.command("SMEMBERS", "txlb:cluster:nodes") == "a"
    resolve(store.leave("a"))
    assert resolve(store.members()) == []


def test_a_command_fails_when_redis_is_down(connection, redis):
    redis.stop()
    with pytest.raises(Exception):
        resolve(RedisStore(connection.execute).claim("a 1", 3))


def test_membership_lists_live_nodes(connection):
    clock = Clock()
    a = makeNode(connection, "a", clock, mode="active-active")
    b = makeNode(connection, "b", clock, mode="active-active")
    start(clock, a, b)
    beat(clock, a, b)
    status = a.status()
    assert (status["mode"], status["node"], status["active"]) == ("active-active", "a", True)
    assert [(n["node"], n["address"], n["active"]) for n in status["nodes"]] == [
        ("a", a.config.address, True), ("b", b.config.address, True),
    ]
    assert {"version", "time"} <= set(status["nodes"][0])
    assert sorted(a.addresses()) == sorted([a.config.address, b.config.address])
    resolve(b.stopService())
    beat(clock, a)
    assert [n["node"] for n in a.status()["nodes"]] == ["a"]
    resolve(a.stopService())


def test_first_node_is_active_second_passive(connection, events):
    clock = Clock()
    a = makeNode(connection, "a", clock)
    b = makeNode(connection, "b", clock)
    start(clock, a, b)
    assert a.active and a.listenersStub.open
    assert not b.active and not b.listenersStub.open and b.leader == "a"
    beat(clock, a, b)
    assert b.status()["nodes"] == [
        {**a.record(), "time": b.nodes[0]["time"], "active": True},
        {**b.record(), "active": False},
    ]
    assert a.addresses() == b.addresses() == [a.config.address]
    assert [e for e in events if e.get("event") == "failover"] == []
    for node in (a, b):
        resolve(node.stopService())


def test_passive_takes_over_when_the_lease_expires(connection, redis, events):
    clock = Clock()
    a = makeNode(connection, "a", clock)
    b = makeNode(connection, "b", clock, on_active="ip addr add 10.0.0.100/32 dev eth0")
    start(clock, a, b)
    # a dies without a word: its heartbeats stop and Redis expires its keys.
    a._loop.stop()
    a._cancelFence()
    beat(clock, b)
    assert not b.active
    redis.command("DEL", "txlb:cluster:leader")
    beat(clock, b)
    assert b.active and b.listenersStub.opened == 1
    assert b.commands == ["ip addr add 10.0.0.100/32 dev eth0"]
    [failover] = [e for e in events if e.get("event") == "failover"]
    assert (failover["failedLoadBalancer"], failover["newActiveLoadBalancer"], failover["failoverStatus"]) == (
        "a", "b", "completed",
    )
    redis.command("DEL", "txlb:cluster:node:a")
    beat(clock, b)
    assert b.addresses() == [b.config.address]
    resolve(b.stopService())


def test_clean_shutdown_gives_the_lease_up(connection, redis):
    clock = Clock()
    a = makeNode(connection, "a", clock)
    b = makeNode(connection, "b", clock)
    start(clock, a, b)
    resolve(a.stopService())
    assert redis.command("EXISTS", "txlb:cluster:leader") == "0"
    beat(clock, b)
    assert b.active
    resolve(b.stopService())


def test_fencing_stops_serving_before_the_lease_could_expire(connection):
    clock = Clock()
    store = Flaky(RedisStore(connection.execute, connection.subscribe))
    a = makeNode(connection, "a", clock, store=store)
    start(clock, a)
    assert a.active
    renewed = clock.seconds()
    store.down = True
    # failover_after 3s, heartbeat 1s: a stops at 2s, a full second before
    # Redis can give the lease to anyone else.
    clock.advance(1.0)
    clock.advance(0.9)
    assert a.active and a.listenersStub.open
    clock.advance(0.1)
    assert clock.seconds() == renewed + 2.0
    assert not a.active and not a.listenersStub.open
    # Redis is back and the lease is still ours: a serves again.
    store.down = False
    beat(clock, a)
    assert a.active and a.listenersStub.opened == 2
    resolve(a.stopService())


def test_an_active_that_lost_its_lease_stops_at_once(connection, redis):
    clock = Clock()
    a = makeNode(connection, "a", clock)
    start(clock, a)
    redis.command("SET", "txlb:cluster:leader", "b 0123", "PX", "3000")
    beat(clock, a)
    assert not a.active and a.listenersStub.closed == 1 and a.leader == "b"
    resolve(a.stopService())
    assert redis.command("GET", "txlb:cluster:leader") == "b 0123"


def test_redis_down_keeps_active_active_serving(connection):
    clock = Clock()
    store = Flaky(RedisStore(connection.execute, connection.subscribe))
    a = makeNode(connection, "a", clock, mode="active-active", store=store)
    start(clock, a)
    store.down = True
    for _ in range(10):
        clock.advance(1.0)
    assert a.active and not a.fresh()
    assert a.addresses() == [a.config.address]
    store.down = False
    resolve(a.stopService())


def makePool() -> Pool:
    servers = [Server(f"s{i}", f"tcp:host=127.0.0.1:port={9000 + i}") for i in range(2)]
    return Pool("api", "round_robin", RoundRobin(), servers, Clock())


def test_admin_changes_reach_the_other_nodes(connection, events):
    clock = Clock()
    poolA, poolB = makePool(), makePool()
    a = makeNode(connection, "a", clock, mode="active-active", pools={"api": poolA})
    b = makeNode(connection, "b", clock, mode="active-active", pools={"api": poolB})
    start(clock, a, b)
    spin(lambda: connection._subscriber.running, what="subscriber")
    # Let the subscription be in place before publishing.
    spin(lambda: resolve(connection.execute("PUBSUB", "NUMSUB", "txlb:cluster:changes"))[1] not in (0, "0"),
         what="subscription")
    a.publishChange({"op": "drain", "pool": "api", "server": "s1"})
    spin(lambda: poolB.server("s1").state != ServerState.UP, what="the drain on b")
    assert poolA.server("s1").state == ServerState.UP  # a's own message is not applied twice
    applied = [e for e in events if e.get("event") == "cluster_change"]
    assert [(e["op"], e["origin"]) for e in applied] == [("drain", "a")]
    for node in (a, b):
        resolve(node.stopService())


def test_apply_change_covers_every_admin_operation():
    pool = makePool()
    pools = {"api": pool}
    assert applyChange(pools, {"op": "drain", "pool": "api", "server": "s0"})
    assert pool.server("s0").state in (ServerState.DRAINING, ServerState.DRAINED)
    assert applyChange(pools, {"op": "enable", "pool": "api", "server": "s0"})
    assert pool.server("s0").state not in (ServerState.DRAINING, ServerState.DRAINED)
    assert applyChange(pools, {"op": "weight", "pool": "api", "server": "s1", "weight": 5})
    assert pool.server("s1").configuredWeight == 5
    assert applyChange(pools, {"op": "add", "pool": "api", "server": "s9",
                               "address": "tcp:host=127.0.0.1:port=9009", "weight": 2})
    assert pool.server("s9").address == "tcp:host=127.0.0.1:port=9009"
    assert not applyChange(pools, {"op": "add", "pool": "api", "server": "s9", "address": "x"})
    assert applyChange(pools, {"op": "delete", "pool": "api", "server": "s9"})
    assert not applyChange(pools, {"op": "drain", "pool": "nope", "server": "s0"})
    assert not applyChange(pools, {"op": "drain", "pool": "api", "server": "nope"})
    assert not applyChange(pools, {"op": "explode", "pool": "api", "server": "s0"})


def test_on_active_runs_without_blocking(events):
    from twisted.internet import process, reactor

    def run(command):
        box: list = []
        spawnCommand(reactor, command).addBoth(box.append)
        # Outside reactor.run() nothing reaps children on SIGCHLD: do it here.
        spin(lambda: process.reapAllProcesses() or box, what=command)
        return box[0]

    assert run("exit 3") == 3
    assert run("true") == 0
    assert [(e["command"], e["exitCode"]) for e in events if e.get("event") == "on_active"] == [
        ("exit 3", 3), ("true", 0),
    ]


class Recorder:
    """A cluster as the admin API sees it: a status, and changes to share."""

    def __init__(self) -> None:
        self.changes: list[dict] = []

    def status(self) -> dict:
        return {"mode": "active-active", "node": "a", "active": True, "nodes": []}

    def publishChange(self, change) -> None:
        self.changes.append(dict(change))


def adminCall(resource, method: bytes, path: bytes, body: Optional[dict] = None):
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.method, request.path = method, path
    if body is not None:
        from io import BytesIO

        request.content = BytesIO(json.dumps(body).encode())
    data = resource.render(request)
    return request.responseCode or 200, json.loads(data)


def test_admin_changes_are_shared():
    from txlb.control.admin import AdminResource

    pool = makePool()
    resource = AdminResource({"api": pool})
    resource.cluster = cluster = Recorder()
    assert adminCall(resource, b"GET", b"/api/cluster") == (200, cluster.status())
    adminCall(resource, b"POST", b"/api/pools/api/servers/s0/drain")
    adminCall(resource, b"POST", b"/api/pools/api/servers/s0/enable")
    adminCall(resource, b"PATCH", b"/api/pools/api/servers/s1", {"weight": 4})
    adminCall(resource, b"POST", b"/api/pools/api/servers", {"name": "s9", "address": "127.0.0.1:9009"})
    adminCall(resource, b"DELETE", b"/api/pools/api/servers/s9")
    adminCall(resource, b"POST", b"/api/pools/api/servers/nope/drain")  # 404: nothing shared
    assert cluster.changes == [
        {"op": "drain", "pool": "api", "server": "s0"},
        {"op": "enable", "pool": "api", "server": "s0"},
        {"op": "weight", "pool": "api", "server": "s1", "weight": 4},
        {"op": "add", "pool": "api", "server": "s9", "address": "tcp:host=127.0.0.1:port=9009", "weight": 1},
        {"op": "delete", "pool": "api", "server": "s9"},
    ]
    # What is shared applies on another node as the API applied it here.
    other = makePool()
    for change in cluster.changes:
        assert applyChange({"api": other}, change)
    assert [(s.name, s.configuredWeight) for s in other] == [(s.name, s.configuredWeight) for s in pool]


def test_standalone_status():
    clock = Clock()
    status = Standalone(ClusterConfig(node="solo", address="127.0.0.9"), clock).status()
    assert (status["mode"], status["node"], status["active"]) == ("standalone", "solo", True)
    assert [n["address"] for n in status["nodes"]] == ["127.0.0.9"]


class Refusing:
    """A store whose Redis refuses connections, as Twisted reports it."""

    def __getattr__(self, name):
        return lambda *args: defer.fail(error.getConnectError((111, "Connection refused")))


def test_an_unreachable_redis_is_named_without_twisteds_preamble(events):
    node = makeNode(None, "a", Clock(), mode="active-active", store=Refusing())
    node._tick()
    [event] = [e for e in events if e.get("event") == "cluster_redis"]
    assert event["error"] == "Connection refused"  # not "An error occurred while connecting: ..."
