"""
random and power_of_two.
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from txlb.balance.schedulers.randomized import PowerOfTwo, Random
from txlb.testing import FakePool


def test_random_follows_weights():
    pool = FakePool(Random(random=random.Random(1)), ["a", ("b", 3)])
    counts = pool.distribution(8000)
    assert 0.70 < counts["b"] / 8000 < 0.80
    assert pool.pick().reason == "random pick"


def test_random_is_reproducible_with_a_seeded_generator():
    def run():
        return FakePool(Random(random=random.Random(42)), ["a", "b", "c"]).sequence(50)

    assert run() == run()
    assert len(set(run())) == 3


def test_random_retry_never_returns_a_tried_server():
    pool = FakePool(Random(random=random.Random(3)), [("a", 100), "b", "c"])
    for _ in range(200):
        decision = pool.pick(exclude=["a"])
        assert decision.server.name in {"b", "c"}
        pool.release(decision)
    assert pool.pick(exclude=["a", "b", "c"]) is None


def test_power_of_two_reason_and_choice():
    pool = FakePool(PowerOfTwo(random=random.Random(5)), ["a", "b"])
    pool.setActive("a", 7)
    pool.setActive("b", 3)
    decision = pool.pick()
    assert decision.server.name == "b"
    assert decision.reason == "fewer active connections of two random picks (3 vs 7)"


def test_power_of_two_single_and_exclude():
    pool = FakePool(PowerOfTwo(random=random.Random(5)), ["a", "b", "c"])
    assert pool.pick(exclude=["a", "b"]).server.name == "c"
    assert pool.pick(exclude=["a", "b", "c"]) is None
    pool.down("a")
    pool.down("b")
    assert pool.pick().reason == "the only server left"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 100), min_size=3, max_size=30),
    st.integers(0, 2**32),
)
def test_power_of_two_never_picks_the_unique_busiest(loads, seed):
    busiest = max(loads)
    if loads.count(busiest) != 1:
        loads[loads.index(busiest)] += 1  # make it unique
        busiest = max(loads)
    pool = FakePool(PowerOfTwo(random=random.Random(seed)), [f"s{i}" for i in range(len(loads))])
    for server, load in zip(pool.servers, loads):
        pool.setActive(server, load)
    for _ in range(20):
        decision = pool.pick()
        assert decision.server.name != f"s{loads.index(busiest)}"
        pool.release(decision)


def test_power_of_two_balances_held_connections():
    """
    Two choices keep the spread of 3000 held connections over 30 servers
    tight (one random choice would leave some with twice the average).
    """
    pool = FakePool(PowerOfTwo(random=random.Random(11)), [f"s{i}" for i in range(30)])
    counts = Counter(pool.hold(3000))
    assert max(counts.values()) - min(counts.values()) <= 12
