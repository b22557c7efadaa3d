"""
txlb's built-in scheduling algorithms, registered as plugins like any
other.

Each is named here rather than generated from C{txlb.balance.schedulers.BUILTINS}:
twisted.plugin caches what this file declares and refreshes the cache only
when this file changes, so a new algorithm must change this file.
"""

from txlb.balance.schedulers.hashing import consistentHash, ipHash
from txlb.balance.schedulers.least import leastBandwidth, leastConnections, leastResponseTime
from txlb.balance.schedulers.randomized import powerOfTwo, randomPick
from txlb.balance.schedulers.rotation import roundRobin, weightedRoundRobin

__all__ = [
    "roundRobin",
    "weightedRoundRobin",
    "leastConnections",
    "leastResponseTime",
    "leastBandwidth",
    "ipHash",
    "consistentHash",
    "randomPick",
    "powerOfTwo",
]
