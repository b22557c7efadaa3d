"""
Pool and server bookkeeping: the scheduler's view follows every change, and
counts stay exact.
"""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock

from txlb.interfaces import PickContext
from txlb.pool import BANDWIDTH_TAU, Pool, Server, ServerState
from txlb.schedulers.rotation import RoundRobin


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
