"""
ip_hash and consistent_hash: the hash ring's stability and movement bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import ROOT
from txlb.balance.schedulers.hashing import ConsistentHash, IPHash, stableHash
from txlb.interfaces import SchedulerOptionsError
from txlb.testing import FakePool

KEYS = [f"10.{i // 256 % 256}.{i % 256}.{i // 65536 + 1}" for i in range(10_000)]

names = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
    min_size=2,
    max_size=11,
    unique=True,
)


def owners(pool: FakePool, keys=KEYS) -> dict[str, str]:
    out = {}
    for key in keys:
        decision = pool.pick(key=key)
        out[key] = decision.server.name
        pool.release(decision)
    return out


def test_same_client_same_server_and_reason():
    pool = FakePool(IPHash(), ["a", "b", "c"])
    first = pool.pick(client="127.0.3.4")
    assert first.reason == "IP hash mapping"
    assert all(pool.pick(client="127.0.3.4").server is first.server for _ in range(20))


def test_ip_hash_ignores_hash_key_consistent_hash_uses_it():
    ip = FakePool(IPHash(), ["a", "b", "c", "d"])
    ch = FakePool(ConsistentHash(), ["a", "b", "c", "d"])
    assert {ip.pick(client="127.0.0.9", key=f"k{i}").server.name for i in range(50)} == {
        ip.pick(client="127.0.0.9").server.name
    }
    assert len({ch.pick(client="127.0.0.9", key=f"k{i}").server.name for i in range(50)}) > 1
    assert ch.pick(client="127.0.0.9").reason == "consistent hash mapping"


def test_spread_follows_weight():
    pool = FakePool(ConsistentHash(), ["a", ("b", 3)])
    counts = Counter(owners(pool).values())
    assert 0.65 < counts["b"] / len(KEYS) < 0.85


@settings(max_examples=30, deadline=None)
@given(names)
def test_adding_a_server_moves_only_keys_to_it(servers):
    """
    With N servers and one added, every key that moves goes to the new
    server, and about 1/(N+1) of 10 000 keys move.
    """
    *old, new = servers
    pool = FakePool(ConsistentHash(), old)
    before = owners(pool)
    pool.add(new)
    after = owners(pool)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == new for k in moved)
    share = 1 / (len(old) + 1)
    assert 0.5 * share < len(moved) / len(KEYS) < 1.6 * share


@settings(max_examples=30, deadline=None)
@given(names, st.data())
def test_removing_or_downing_a_server_moves_only_its_keys(servers, data):
    gone = data.draw(st.sampled_from(servers))
    pool = FakePool(ConsistentHash(), servers)
    before = owners(pool)
    pool.down(gone)
    after = owners(pool)
    for key in KEYS:
        if before[key] == gone:
            assert after[key] != gone
        else:
            assert after[key] == before[key]
    pool.up(gone)
    assert owners(pool) == before


def test_down_server_keys_go_to_the_next_on_the_ring_as_a_retry_does():
    """
    A down server's keys and a retry after that server failed land in the
    same place: the next server along the ring.
    """
    pool = FakePool(ConsistentHash(), ["a", "b", "c", "d"])
    retried = {}
    for key in KEYS[:2000]:
        first = pool.pick(key=key)
        pool.release(first)
        if first.server.name == "b":
            retry = pool.pick(key=key, exclude=["b"])
            assert retry.reason == "consistent hash mapping, next on the ring after a server already tried"
            retried[key] = retry.server.name
            pool.release(retry)
    assert retried
    pool.down("b")
    assert owners(pool, list(retried)) == retried
    assert pool.pick(key="x", exclude=["a", "c", "d"]) is None


def test_weight_growth_moves_keys_only_to_that_server():
    pool = FakePool(ConsistentHash(), ["a", "b", "c"])
    before = owners(pool)
    pool.setWeight("a", 2)
    after = owners(pool)
    assert {after[k] for k in KEYS if after[k] != before[k]} == {"a"}


def test_replicas_option():
    assert len(ConsistentHash({"replicas": 5}).ring) == 0
    scheduler = ConsistentHash({"replicas": 5})
    FakePool(scheduler, ["a", ("b", 2)])
    assert len(scheduler.ring) == 15
    with pytest.raises(SchedulerOptionsError, match="replicas must be an integer"):
        ConsistentHash({"replicas": "many"})
    with pytest.raises(SchedulerOptionsError, match="only the option 'replicas'"):
        IPHash({"replica": 5})


_CHILD = """
import json, sys
from txlb.balance.schedulers.hashing import ConsistentHash, stableHash
from txlb.testing import FakePool
pool = FakePool(ConsistentHash(), ["server-1", "server-2", "server-3"])
keys = [f"127.0.{i}.{i * 7 % 256}" for i in range(200)]
json.dump({"hashes": [stableHash(k) for k in keys],
           "owners": [pool.pick(key=k).server.name for k in keys]}, sys.stdout)
"""


def test_hashing_is_stable_across_processes():
    """
    Two processes with different string-hash seeds put every key on the
    same server, and the hash itself is a fixed function (a restarted or a
    second balancer must agree with the first).
    """
    results = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, check=True, cwd=ROOT
        ).stdout
        results.append(json.loads(out))
    assert results[0] == results[1]
    keys = [f"127.0.{i}.{i * 7 % 256}" for i in range(200)]
    assert results[0]["hashes"] == [stableHash(k) for k in keys]
    assert set(results[0]["owners"]) == {"server-1", "server-2", "server-3"}
    # Known values: changing the hash function would move every client of
    # every running balancer, so it must not happen unnoticed.
    assert stableHash("127.0.0.1") == 12668793064369133196
    assert stableHash("server-1#0") == 5749714222675377560
