# -*- test-case-name: tests.test_http_routing -*-
"""
Which pool a request goes to: C{[[services.routes]]} in order, first match
wins, the service's own pool otherwise.  Pure: built once from the config,
asked per request.
"""

from __future__ import annotations

import re
from fnmatch import translate
from typing import Mapping, Optional, Sequence

import attrs


@attrs.frozen
class Route:
    """
    One route.  Every condition given must hold; an absent one matches all.

    @ivar host: exact host or a C{*} glob (C{shop.*}, C{*.example.com}),
        compared without case and without the port.
    @ivar methods: upper-case method names.
    @ivar headers: lower-case header name to exact value.
    @ivar rules: the header rules of requests that take this route (its
        service's, then its own: a L{txlb.policy.headers.HeaderPolicy}),
        or L{None}.
    @ivar compress: the compression of their responses (a
        L{txlb.http.compress.Compression}), or L{None}.
    @ivar redirect: a L{txlb.policy.redirect.Redirect} answering every
        request that takes this route, which then has no C{pool}.
    @ivar admission: who may take it and how fast (its own C{allow},
        C{deny} and C{rate_limit}, else its service's: a
        L{txlb.policy.admission.Admission}), or L{None}.
    """

    pool: Optional[str]
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    methods: frozenset[bytes] = frozenset()
    headers: Mapping[bytes, bytes] = attrs.field(factory=dict)
    rules: object = None
    compress: object = None
    redirect: object = None
    admission: object = None
    _hostPattern: Optional[re.Pattern] = attrs.field(init=False, default=None)
    _pathPrefix: Optional[bytes] = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.host is not None:
            pattern = re.compile(translate(self.host.lower()).encode("latin-1"))
            object.__setattr__(self, "_hostPattern", pattern)
        if self.path_prefix is not None:
            object.__setattr__(self, "_pathPrefix", self.path_prefix.encode("latin-1"))

    def matches(self, host: bytes, path: bytes, method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if self._hostPattern is not None and not self._hostPattern.match(host):
            return False
        if self._pathPrefix is not None and not path.startswith(self._pathPrefix):
            return False
        if self.methods and method not in self.methods:
            return False
        for name, value in self.headers.items():
            if not any(n.lower() == name and v == value for n, v in headers):
                return False
        return True


def hostOf(value: Optional[bytes]) -> bytes:
    """The host part of a Host header, lower-cased, without the port."""
    if not value:
        return b""
    value = value.lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        return value[: end + 1] if end > 0 else value
    colon = value.rfind(b":")
    return value[:colon] if colon >= 0 else value


class Router:
    """
    The routes of one service, and what applies when none matches: the
    service's C{default} pool, header C{rules}, C{compress} and C{admission}.
    """

    def __init__(self, default: str, routes: Sequence[Route] = (), rules=None, compress=None,
                 admission=None) -> None:
        self.default = default
        self.routes = tuple(routes)
        self.rules = rules
        self.compress = compress
        self.admission = admission

    def route(self, host: Optional[bytes], target: bytes, method: bytes, headers) -> Optional[Route]:
        """The first route the request matches, or L{None}."""
        if not self.routes:
            return None
        hostname = hostOf(host)
        query = target.find(b"?")
        path = target if query < 0 else target[:query]
        for route in self.routes:
            if route.matches(hostname, path, method, headers):
                return route
        return None

    def pool(self, host: Optional[bytes], target: bytes, method: bytes, headers) -> Optional[str]:
        """The name of the pool the request goes to (L{None}: a redirect route)."""
        route = self.route(host, target, method, headers)
        return self.default if route is None else route.pool
