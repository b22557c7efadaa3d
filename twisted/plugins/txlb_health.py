"""
txlb's built-in health-check kinds, registered as plugins like any other.

Each is named here rather than generated from C{txlb.health.BUILTINS}:
twisted.plugin caches what this file declares and refreshes the cache only
when this file changes, so a new kind must change this file.
"""

from txlb.health._checks import httpCheck, tcpCheck
from txlb.health._grpc import grpcCheck

__all__ = ["grpcCheck", "httpCheck", "tcpCheck"]
