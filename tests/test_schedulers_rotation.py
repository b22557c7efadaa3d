"""
Rotation schedulers: round robin and smooth weighted round robin.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import groupby

from hypothesis import given, settings
from hypothesis import strategies as st

from txlb.balance.schedulers.rotation import RoundRobin, WeightedRoundRobin
from txlb.testing import FakePool


def test_round_robin_ignores_weights():
    pool = FakePool(RoundRobin(), [("a", 5), "b", "c"])
    assert pool.sequence(6) == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_reason():
    pool = FakePool(RoundRobin(), ["a"])
    assert pool.pick().reason == "round robin"


def test_weighted_1_2_1_is_interleaved():
    pool = FakePool(WeightedRoundRobin(), ["a", ("b", 2), "c"])
    assert pool.sequence(8) == ["a", "b", "b", "c"] * 2


def test_weighted_is_smooth_not_bursty():
    """
    Weights 5, 1, 1 never give more than three a's in a row, at the end of
    a cycle included (nginx's smooth algorithm gives four there); a naive
    expansion gives five.
    """
    pool = FakePool(WeightedRoundRobin(), [("a", 5), "b", "c"])
    picks = "".join(pool.sequence(70))
    assert "aaaa" not in picks
    assert picks[:7] == "aaabaac"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=2, max_size=12))
def test_weighted_runs_are_short(weights):
    """
    No server gets a run of picks more than two longer than the shortest
    possible, M{ceil(w / (W - w))}.
    """
    pool = FakePool(WeightedRoundRobin(), [(f"s{i}", w) for i, w in enumerate(weights)])
    total = sum(weights)
    picks = pool.sequence(3 * total)
    for name, run in groupby(picks):
        weight = weights[int(name[1:])]
        assert len(list(run)) <= math.ceil(weight / (total - weight)) + 2


def test_weighted_reason_names_the_weight():
    pool = FakePool(WeightedRoundRobin(), [("a", 3)])
    assert pool.pick().reason == "weighted round robin (weight 3)"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=12), st.integers(1, 4))
def test_weighted_exact_shares_in_every_cycle(weights, cycles):
    """
    Each consecutive block of sum(weights) picks -- and so every window of
    that length -- holds each server exactly its weight.
    """
    pool = FakePool(WeightedRoundRobin(), [(f"s{i}", w) for i, w in enumerate(weights)])
    total = sum(weights)
    picks = pool.sequence(total * (cycles + 1))
    expected = {f"s{i}": w for i, w in enumerate(weights)}
    for start in range(len(picks) - total + 1):
        assert Counter(picks[start : start + total]) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=8), min_size=2, max_size=8), st.data())
def test_weighted_retry_skips_without_using_the_turn(weights, data):
    """
    A retry skips the servers already tried; the servers skipped keep their
    turn, so the shares of the cycle still hold.
    """
    pool = FakePool(WeightedRoundRobin(), [(f"s{i}", w) for i, w in enumerate(weights)])
    tried = data.draw(st.sampled_from([f"s{i}" for i in range(len(weights))]))
    retry = pool.pick(exclude=[tried])
    assert retry.server.name != tried
    pool.release(retry)
    total = sum(weights)
    rest = pool.sequence(total - 1)
    counts = Counter(rest + [retry.server.name])
    assert counts == {f"s{i}": w for i, w in enumerate(weights)}


def test_weighted_weight_change_and_zero_weight():
    pool = FakePool(WeightedRoundRobin(), ["a", "b"])
    pool.setWeight("a", 3)
    assert Counter(pool.sequence(8)) == {"a": 6, "b": 2}
    pool.setWeight("b", 0)
    assert set(pool.sequence(5)) == {"a"}


def test_weighted_all_tried():
    pool = FakePool(WeightedRoundRobin(), ["a", ("b", 2)])
    assert pool.pick(exclude=["a", "b"]) is None
    assert Counter(pool.sequence(3)) == {"a": 1, "b": 2}
