# -*- test-case-name: tests.test_config_transform -*-
"""
The records of an HTTP service's (and route's) rules about what requests
and responses look like: C{headers}, C{redirect} and C{compress}.  Read by
L{txlb.config._transform}; compiled for the proxy by
L{txlb.policy.headers}, L{txlb.policy.redirect} and L{txlb.http.compress}.
"""

from __future__ import annotations

from typing import Optional

import attrs


@attrs.frozen
class HeaderOps:
    """
    One side's C{set}, C{add} and C{remove}: names as written, values as
    written (their C{${...}} variables already checked).
    """

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@attrs.frozen
class HeaderRules:
    """A C{headers = { request = ..., response = ... }} table."""

    request: Optional[HeaderOps] = None
    response: Optional[HeaderOps] = None


@attrs.frozen
class RedirectConfig:
    """A route's C{redirect}: what it changes in the URL, and the status."""

    status: int = 302
    scheme: Optional[str] = None
    host: Optional[str] = None
    path_prefix: Optional[str] = None


@attrs.frozen
class CompressConfig:
    """A C{compress} table: which media types, from which size, zlib's level."""

    types: tuple[str, ...]
    min_size: int = 1024
    level: int = 6
