"""
Least connections, least response time and least bandwidth.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from txlb.balance.pool import BANDWIDTH_TAU
from txlb.balance.schedulers.least import LeastBandwidth, LeastConnections, LeastResponseTime
from txlb.testing import FakePool

# least_connections


def test_least_connections_picks_fewest_with_reason():
    pool = FakePool(LeastConnections(), ["a", "b", "c"])
    pool.setActive("a", 50)
    pool.setActive("b", 45)
    pool.setActive("c", 60)
    decision = pool.pick()
    assert decision.server.name == "b"
    assert decision.reason == "fewest active connections (45)"


def test_least_connections_ties_in_rotation():
    """
    Short connections (each released before the next) spread over equal
    servers instead of all going to the first.
    """
    pool = FakePool(LeastConnections(), ["a", "b", "c"])
    assert pool.sequence(6) == ["a", "b", "c", "a", "b", "c"]


def test_least_connections_held_spread_evenly():
    pool = FakePool(LeastConnections(), ["a", "b", "c"])
    assert Counter(pool.hold(6)) == {"a": 2, "b": 2, "c": 2}


def test_least_connections_follows_releases():
    pool = FakePool(LeastConnections(), ["a", "b"])
    pool.hold(4)
    pool.release("a")
    pool.release("a")
    assert [pool.pick().server.name for _ in range(2)] == ["a", "a"]
    assert pool.pick().server.name in {"a", "b"}


def test_least_connections_exclude_goes_to_next_bucket():
    pool = FakePool(LeastConnections(), ["a", "b", "c"])
    pool.setActive("b", 3)
    pool.setActive("c", 7)
    decision = pool.pick(exclude=["a"])
    assert (decision.server.name, decision.reason) == ("b", "fewest active connections (3)")
    pool.release(decision)
    assert pool.pick(exclude=["a", "b"]).server.name == "c"


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=2, max_value=8),
    st.lists(
        st.tuples(
            st.sampled_from(["pick", "release", "set", "down", "up", "exclude"]),
            st.integers(0, 7),
            st.integers(0, 20),
        ),
        max_size=80,
    ),
)
def test_least_connections_never_picks_a_busier_server(count, operations):
    """
    Whatever the history of picks, releases, load changes and health
    changes, the server picked never has more in flight than another
    eligible server that was not excluded.
    """
    pool = FakePool(LeastConnections(), [f"s{i}" for i in range(count)])
    servers = pool.servers
    down: set = set()
    for op, index, value in operations:
        server = servers[index % count]
        if op == "release" and server.active:
            pool.release(server)
        elif op == "set":
            pool.setActive(server, value)
        elif op == "down":
            pool.down(server)
            down.add(server)
        elif op == "up":
            pool.up(server)
            down.discard(server)
        elif op in ("pick", "exclude"):
            exclude = [server] if op == "exclude" else []
            candidates = [s for s in servers if s not in down and s not in exclude]
            before = {s: s.active for s in candidates}
            decision = pool.pick(exclude=exclude)
            if not candidates:
                assert decision is None
                continue
            assert decision.server in candidates
            assert before[decision.server] == min(before.values())


# least_response_time


def test_least_response_time_seed_example():
    """
    40 connections at 180 ms, 55 at 90 ms, 20 at 300 ms: the 90 ms server,
    whose (active + 1) × time is lowest (5.04 against 7.38 and 6.3).
    """
    pool = FakePool(LeastResponseTime(), ["slow", "fast", "slowest"])
    for name, active, seconds in (("slow", 40, 0.180), ("fast", 55, 0.090), ("slowest", 20, 0.300)):
        pool.observeResponseTime(name, seconds)
        pool.setActive(name, active)
    decision = pool.pick()
    assert decision.server.name == "fast"
    assert decision.reason.startswith("best balance of active connections and response time")
    assert "55 active, 90 ms" in decision.reason


def test_least_response_time_tries_unmeasured_servers():
    pool = FakePool(LeastResponseTime(), ["a", "b", "c"])
    pool.observeResponseTime("a", 0.001)
    pool.observeResponseTime("b", 0.002)
    decision = pool.pick()
    assert decision.server.name == "c"
    assert decision.reason == "not measured yet: trying it"
    # c is now waiting for its first answer: the measured ones come first.
    assert pool.pick().server.name == "a"


def test_least_response_time_follows_new_samples():
    pool = FakePool(LeastResponseTime(), ["a", "b"])
    pool.observeResponseTime("a", 0.010)
    pool.observeResponseTime("b", 0.020)
    assert pool.sequence(3) == ["a", "a", "a"]
    for _ in range(10):
        pool.observeResponseTime("a", 0.100)
    assert pool.sequence(3) == ["b", "b", "b"]


def test_least_response_time_exclude():
    pool = FakePool(LeastResponseTime(), ["a", "b"])
    pool.observeResponseTime("a", 0.010)
    pool.observeResponseTime("b", 0.020)
    assert pool.pick(exclude=["a"]).server.name == "b"
    assert pool.pick(exclude=["a", "b"]) is None
    assert pool.pick().server.name == "a"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 30), st.floats(0.001, 1.0)),
        min_size=1,
        max_size=60,
    )
)
def test_least_response_time_is_the_minimum(updates):
    """
    Against a full scan: after any sequence of load and response-time
    changes, the pick has the lowest score.
    """
    pool = FakePool(LeastResponseTime(), [f"s{i}" for i in range(6)])
    servers = pool.servers
    for index, active, seconds in updates:
        pool.observeResponseTime(servers[index], seconds)
        pool.setActive(servers[index], active)
        best = pool.pick().server
        pool.release(best)
        measured = [s for s in servers if s.responseTime > 0]
        unmeasured = [s for s in servers if s.responseTime == 0 and s.active == 0]
        if unmeasured:
            assert best in unmeasured
        else:
            score = lambda s: (s.active + 1) * s.responseTime  # noqa: E731
            assert score(best) == min(score(s) for s in measured)


# least_bandwidth


def test_least_bandwidth_picks_the_quietest():
    pool = FakePool(LeastBandwidth(), ["a", "b", "c"])
    pool.transfer("a", 1_000_000)
    pool.transfer("b", 10_000)
    pool.transfer("c", 500_000)
    decision = pool.pick()
    assert (decision.server.name, decision.reason) == ("b", "lowest recent bandwidth")


def test_least_bandwidth_idle_servers_first_spread_by_connections():
    pool = FakePool(LeastBandwidth(), ["a", "b", "c"])
    pool.transfer("a", 10)
    assert Counter(pool.hold(4)) == {"b": 2, "c": 2}
    assert pool.pick().reason.startswith("no traffic yet")


def test_least_bandwidth_old_bursts_decay():
    """
    A big burst long ago weighs less than a small flow now: the ranking is
    the rate at the present moment, although the scheduler has no clock.
    """
    pool = FakePool(LeastBandwidth(), ["a", "b"])
    pool.transfer("a", 100_000_000)
    pool.advance(20 * BANDWIDTH_TAU)
    pool.transfer("b", 100_000)
    assert pool.bandwidth("a") < pool.bandwidth("b")
    assert pool.pick().server.name == "a"
    pool.transfer("a", 10_000_000)
    assert pool.pick().server.name == "b"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 10**7), st.floats(0.0, 10.0)),
        min_size=1,
        max_size=50,
    )
)
def test_least_bandwidth_agrees_with_a_scan(events):
    pool = FakePool(LeastBandwidth(), [f"s{i}" for i in range(5)])
    servers = pool.servers
    pool.advance(1.7e9)  # a wall-clock-like epoch must not overflow anything
    for index, count, wait in events:
        pool.advance(wait)
        pool.transfer(servers[index], count)
        best = pool.pick().server
        pool.release(best)
        rates = [pool.bandwidth(s) for s in servers]
        assert pool.bandwidth(best) <= min(rates) * (1 + 1e-6) + 1e-9


def test_least_schedulers_at_scale_stay_consistent():
    """
    A long random run over 200 servers: the incremental structures agree
    with a full scan at every pick.
    """
    rng = random.Random(7)
    pool = FakePool(LeastConnections(), [f"s{i}" for i in range(200)])
    held = []
    for _ in range(5000):
        if held and rng.random() < 0.5:
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            lowest = min(s.active for s in pool.servers)
            decision = pool.pick()
            assert decision.server.active - 1 == lowest
            held.append(decision)
