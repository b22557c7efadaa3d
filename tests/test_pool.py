"""
Pool and server bookkeeping: the scheduler's view follows every change, and
counts stay exact.
"""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock

from txlb.balance.pool import BANDWIDTH_TAU, Pool, Server, ServerState
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.interfaces import PickContext


def makePool(n: int = 3):
    clock = Clock()
    servers = [Server(f"s{i}", f"tcp:host=127.0.0.1:port={9000 + i}") for i in range(n)]
    return Pool("p", "round_robin", RoundRobin(), servers, clock), servers, clock


def test_pick_counts_in_flight_until_release():
    pool, servers, _ = makePool()
    decision = pool.pick(PickContext("1.2.3.4"))
    assert decision.server is servers[0] and decision.reason == "round robin"
    assert (servers[0].active, servers[0].total) == (1, 1)
    pool.release(servers[0])
    assert (servers[0].active, servers[0].total) == (0, 1)


def test_only_up_servers_are_picked():
    pool, servers, _ = makePool()
    pool.setState(servers[1], ServerState.DOWN)
    picked = {pool.pick(PickContext()).server.name for _ in range(6)}
    assert picked == {"s0", "s2"}
    pool.setState(servers[1], ServerState.UP)
    picked = {pool.pick(PickContext()).server.name for _ in range(3)}
    assert picked == {"s0", "s1", "s2"}


def test_exclude_and_exhaustion():
    pool, servers, _ = makePool(2)
    assert pool.pick(PickContext(), exclude=[servers[0]]).server is servers[1]
    assert pool.pick(PickContext(), exclude=servers) is None


def test_add_remove_and_duplicate_names():
    pool, servers, _ = makePool(1)
    extra = Server("s9", "tcp:host=127.0.0.1:port=9009")
    pool.add(extra)
    assert pool.server("s9") is extra and len(pool) == 2
    with pytest.raises(ValueError):
        pool.add(Server("s9", "tcp:host=127.0.0.1:port=1"))
    pool.remove(extra)
    assert [s.name for s in pool] == ["s0"]
    assert all(pool.pick(PickContext()).server is servers[0] for _ in range(3))


def test_response_time_is_a_moving_average():
    pool, servers, _ = makePool(1)
    pool.observeResponseTime(servers[0], 0.100)
    assert servers[0].responseTime == pytest.approx(0.100)
    pool.observeResponseTime(servers[0], 0.200)
    assert servers[0].responseTime == pytest.approx(0.130)


def test_bandwidth_decays():
    pool, servers, clock = makePool(1)
    pool.observeBytes(servers[0], 1000, 1000)
    assert pool.bandwidth(servers[0]) == pytest.approx(2000 / BANDWIDTH_TAU)
    clock.advance(BANDWIDTH_TAU)
    assert pool.bandwidth(servers[0]) == pytest.approx(2000 / BANDWIDTH_TAU / math.e)
    assert (servers[0].bytesIn, servers[0].bytesOut) == (1000, 1000)


@pytest.fixture
def events():
    from twisted.logger import globalLogPublisher

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield lambda kind: [e for e in seen if e.get("event") == kind]
    globalLogPublisher.removeObserver(seen.append)


def test_health_moves_servers_in_and_out_with_events(events):
    pool, servers, _ = makePool()
    pool.setHealth(servers[0], ServerState.DOWN, "3 consecutive failures: HTTP 503")
    assert servers[0].state is ServerState.DOWN
    assert {pool.pick(PickContext()).server.name for _ in range(4)} == {"s1", "s2"}
    pool.setHealth(servers[0], ServerState.UP, "2 consecutive passes")
    [down, up] = events("server_state")
    assert (down["health"], down["action"], down["reason"]) == (
        "unhealthy", "removed_from_rotation", "3 consecutive failures: HTTP 503")
    assert (up["health"], up["action"]) == ("healthy", "added_to_rotation")


def test_added_server_waits_for_checks_when_the_pool_has_them(events):
    pool, servers, _ = makePool(1)
    pool.checked = True
    new = Server("s9", "tcp:host=127.0.0.1:port=9")
    pool.add(new)
    assert new.state is ServerState.CHECKING
    assert all(pool.pick(PickContext()).server is servers[0] for _ in range(3))
    assert events("server_added") == []
    pool.setHealth(new, ServerState.UP, "2 consecutive passes")
    [added] = events("server_added")
    assert (added["healthCheck"], added["action"]) == ("passed", "added_to_load_balancer_pool")


def test_added_server_joins_at_once_without_checks(events):
    pool, servers, _ = makePool(1)
    new = Server("s9", "tcp:host=127.0.0.1:port=9")
    pool.add(new)
    assert new.state is ServerState.UP
    assert events("server_added")[0]["healthCheck"] == "none"


def test_drain_waits_for_in_flight_then_drained(events):
    pool, servers, _ = makePool(2)
    first = pool.pick(PickContext()).server
    pool.drain(first)
    assert first.state is ServerState.DRAINING
    assert all(pool.pick(PickContext()).server is not first for _ in range(3))
    assert events("server_draining")[0]["inFlight"] == 1
    assert events("server_drained") == []
    pool.release(first)
    assert first.state is ServerState.DRAINED
    assert len(events("server_drained")) == 1
    pool.enable(first)
    assert first.state is ServerState.UP


def test_delete_drains_then_removes(events):
    pool, servers, _ = makePool(2)
    held = pool.pick(PickContext()).server
    pool.delete(held)
    assert held.name in [s.name for s in pool]
    pool.release(held)
    assert held.name not in [s.name for s in pool]
    assert events("server_removed")[0]["server"] == held.name


def test_passive_ejection_doubles_for_repeat_offenders(events):
    clock = Clock()
    servers = [Server("a", "tcp:host=127.0.0.1:port=1"), Server("b", "tcp:host=127.0.0.1:port=2")]
    pool = Pool("p", "round_robin", RoundRobin(), servers, clock, passive=(3, 10.0))
    for _ in range(2):
        pool.reportResult(servers[0], False, "HTTP 500")
    pool.reportResult(servers[0], True)
    pool.reportResult(servers[0], False, "HTTP 500")
    assert servers[0].state is ServerState.UP  # the success reset the count
    for _ in range(3):
        pool.reportResult(servers[0], False, "HTTP 500")
    assert servers[0].state is ServerState.EJECTED
    assert all(pool.pick(PickContext()).server is servers[1] for _ in range(3))
    clock.advance(10)
    assert servers[0].state is ServerState.UP
    for _ in range(3):
        pool.reportResult(servers[0], False, "HTTP 500")
    clock.advance(10)
    assert servers[0].state is ServerState.EJECTED  # 20 s the second time
    clock.advance(10)
    assert servers[0].state is ServerState.UP
    assert [e["ejectFor"] for e in events("server_ejected")] == [10.0, 20.0]
    assert events("server_ejected")[0]["reason"] == "3 consecutive failures: HTTP 500"


def test_max_connections_queue_goes_to_the_first_server_free():
    clock = Clock()
    servers = [Server("a", "tcp:host=127.0.0.1:port=1"), Server("b", "tcp:host=127.0.0.1:port=2")]
    pool = Pool("p", "round_robin", RoundRobin(), servers, clock, maxConnections=1, queueTimeout=5.0)
    a = pool.pick(PickContext()).server
    b = pool.pick(PickContext()).server
    assert pool.pick(PickContext()) is None and pool.saturated()
    got = []
    pool.enqueue(PickContext(), (), got.append)
    pool.enqueue(PickContext(), (), got.append)
    pool.release(b)
    assert [d.server for d in got] == [b]
    pool.release(a)
    assert [d.server for d in got] == [b, a]
    assert not pool.saturated([a, b])  # nothing free for a request that tried both


def test_queue_timeout_answers_none():
    clock = Clock()
    pool = Pool("p", "round_robin", RoundRobin(), [Server("a", "tcp:host=127.0.0.1:port=1")], clock,
                maxConnections=1, queueTimeout=2.0)
    pool.pick(PickContext())
    got = []
    pool.enqueue(PickContext(), (), got.append)
    clock.advance(2)
    assert got == [None]


def test_slow_start_ramps_the_weight_up():
    clock = Clock()
    server = Server("a", "tcp:host=127.0.0.1:port=1", weight=10)
    pool = Pool("p", "round_robin", RoundRobin(), [server], clock, slowStart=10.0)
    pool.setHealth(server, ServerState.DOWN)
    pool.setHealth(server, ServerState.UP)
    assert server.weight == 1
    clock.advance(5)
    assert server.weight == 5
    clock.advance(5)
    assert server.weight == 10 and server.rampStarted is None
    pool.setWeight(server, 4)
    assert server.weight == 4 and server.configuredWeight == 4
