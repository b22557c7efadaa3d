# -*- test-case-name: tests.test_schedulers_hashing -*-
"""
Hashing schedulers: the same key always goes to the same server.

Both use a hash ring (consistent hashing, as HAProxy's C{lb_chash.c}):
each server owns C{replicas × weight} points on a ring of 64-bit numbers,
and a key belongs to the first point at or after its own hash.  So adding a
server to N moves only the keys that now belong to it, about 1/(N+1) of
them; removing one moves only its own keys; and the keys of a server that
is down or has already failed for this connection go to the next server on
the ring, while every other key stays where it was.

The hash is BLAKE2b, never Python's C{hash()}, whose value for a string
changes from one process to the next: a restarted balancer, or a second
one beside it, must send a client where the first one did.  Points are
derived from the server's I{name}, not its position in the config.
"""

from __future__ import annotations

from bisect import bisect_left
from hashlib import blake2b
from typing import Collection, Mapping, Optional, Sequence

from txlb.balance.schedulers._base import SchedulerBase, SchedulerFactory, intOption
from txlb.interfaces import Decision, PickContext

#: Points on the ring per unit of weight, unless C{options.replicas} says.
DEFAULT_REPLICAS = 100


def stableHash(text: str) -> int:
    """
    A 64-bit hash of C{text} that is the same in every process and on every
    machine.
    """
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """
    The ring itself, rebuilt when the eligible set changes.

    Every point of every server seen recently is kept, sorted, in a master
    ring of C{(point, name, vnode)}; a rebuild keeps the points of the
    eligible servers (the first C{replicas × weight} of each) in one pass,
    without hashing or sorting, which matters when a server of a large pool
    goes down and up.  Only a new name or a higher weight adds points and
    sorts the master again.  A server whose weight grows keeps its old
    points, so only keys to it move.
    """

    def __init__(self, replicas: int = DEFAULT_REPLICAS) -> None:
        self.replicas = replicas
        self._master: list[tuple[int, str, int]] = []
        self._known: dict[str, int] = {}
        self._points: list[int] = []
        self._owners: list = []
        self._servers: frozenset = frozenset()

    def rebuild(self, servers: Sequence) -> None:
        wanted = {server.name: self.replicas * server.weight for server in servers}
        if len(self._master) > 4 * sum(wanted.values()) + 10_000:
            # Mostly servers long gone: start again from the current ones.
            self._master = []
            self._known = {}
        added = []
        for name, count in wanted.items():
            known = self._known.get(name, 0)
            if count > known:
                added.extend(
                    (stableHash(f"{name}#{vnode}"), name, vnode) for vnode in range(known, count)
                )
                self._known[name] = count
        if added:
            self._master.extend(added)
            self._master.sort()
        byName = {server.name: server for server in servers}
        points = []
        owners = []
        for point, name, vnode in self._master:
            if vnode < wanted.get(name, 0):
                points.append(point)
                owners.append(byName[name])
        self._points = points
        self._owners = owners
        self._servers = frozenset(servers)

    def __len__(self) -> int:
        return len(self._points)

    def lookup(self, key: str, exclude: Collection):
        """
        The owner of C{key}, or when it is in C{exclude} the next server
        along the ring that is not; and whether that step was needed.
        C{(None, False)} when no server is left.
        """
        points = self._points
        if not points:
            return None, False
        index = bisect_left(points, stableHash(key))
        if index == len(points):
            index = 0
        owner = self._owners[index]
        if not exclude or owner not in exclude:
            return owner, False
        if self._servers.issubset(exclude):
            return None, False
        owners = self._owners
        size = len(owners)
        while owner in exclude:
            index = (index + 1) % size
            owner = owners[index]
        return owner, True


class _RingScheduler(SchedulerBase):
    name = ""
    mapping = ""

    def __init__(self, options: Mapping[str, object] = {}) -> None:
        replicas = intOption(self.name, options, "replicas", DEFAULT_REPLICAS, 1, 10_000)
        super().__init__(options)
        self.ring = HashRing(replicas)

    def setServers(self, servers: Sequence) -> None:
        super().setServers(servers)
        self.ring.rebuild(self.servers)

    def _key(self, context: PickContext) -> str:
        raise NotImplementedError()

    def pick(self, context: PickContext, exclude: Collection) -> Optional[Decision]:
        server, moved = self.ring.lookup(self._key(context), exclude)
        if server is None:
            return None
        if moved:
            return Decision(server, f"{self.mapping}, next on the ring after a server already tried")
        return Decision(server, self.mapping)


class IPHash(_RingScheduler):
    """
    Consistent hashing of the client's address, whatever the pool's
    C{hash_key}.
    """

    name = "ip_hash"
    mapping = "IP hash mapping"

    def _key(self, context: PickContext) -> str:
        return context.client


class ConsistentHash(_RingScheduler):
    """
    Consistent hashing of the pool's C{hash_key}: the client address, a
    header, a cookie, the path or a query parameter, as the proxy extracted
    it into L{PickContext.key}.
    """

    name = "consistent_hash"
    mapping = "consistent hash mapping"

    def _key(self, context: PickContext) -> str:
        return context.hashKey


ipHash = SchedulerFactory(
    "ip_hash", "the client address hashed onto a ring: a client keeps its server", IPHash
)
consistentHash = SchedulerFactory(
    "consistent_hash",
    "hash_key hashed onto a ring with virtual nodes in proportion to weight",
    ConsistentHash,
)
