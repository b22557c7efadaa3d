# -*- test-case-name: tests.test_policy_redirect -*-
"""
Redirect routes: a route with C{redirect} answers every request it takes
with a redirection of its own, and no backend is asked.

The new URL keeps what the operator did not change: the rest of the path
after the route's C{path_prefix} (behind the redirect's own
C{path_prefix}, when it has one) and the query string.  With a C{scheme}
or a C{host} the C{Location} is an absolute URL (the request's own
C{Host} where only the scheme changes); with neither it is a path, so
that nothing the client sent in C{Host} is reflected.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from txlb.http.headers import responseHead

#: The statuses a redirect may answer with, and the default (HAProxy's
#: C{http-request redirect} and nginx's C{rewrite ... redirect} say 302).
STATUSES = (301, 302, 307, 308)
DEFAULT_STATUS = 302


class Redirect:
    """
    One route's redirection, compiled.

    @param matched: the route's own C{path_prefix} (what is cut from the
        path before C{pathPrefix} goes in front), or L{None}.
    """

    def __init__(self, status: int = DEFAULT_STATUS, scheme: Optional[str] = None, host: Optional[str] = None,
                 pathPrefix: Optional[str] = None, matched: Optional[str] = None) -> None:
        self.status = status
        self.scheme = scheme.encode("ascii") if scheme else None
        self.host = host.encode("ascii") if host else None
        self.pathPrefix = pathPrefix.encode("ascii") if pathPrefix is not None else None
        self.cut = len(matched.encode("latin-1")) if matched else 0
        self.absolute = scheme is not None or host is not None

    @classmethod
    def fromConfig(cls, config, matched: Optional[str]) -> Optional["Redirect"]:
        """From a route's L{txlb.config.RedirectConfig} (or L{None}) and its C{path_prefix}."""
        if config is None:
            return None
        return cls(config.status, config.scheme, config.host, config.path_prefix, matched)

    def location(self, proto: bytes, host: Optional[bytes], target: bytes) -> bytes:
        """
        Where a request for C{target} (path and query, as received) made
        to C{host} (its C{Host}, or L{None}) over C{proto} is sent.
        """
        query = target.find(b"?")
        path, rest = (target, b"") if query < 0 else (target[:query], target[query:])
        if self.pathPrefix is not None:
            path = self.pathPrefix + path[self.cut:]
        if self.absolute:
            where = self.host or host
            if where:
                return (self.scheme or proto) + b"://" + where + path + rest
        # A path alone: never one a client reads as another host ("//x").
        return b"/" + path.lstrip(b"/") + rest

    def answer(self, proto: bytes, host: Optional[bytes], target: bytes, method: bytes, *, requestId: str,
               close: bool, keepAliveHeader: bool, rules=None, values: Sequence[bytes] = ()) -> bytes:
        """
        The whole response: the status, C{Location}, and a small JSON body
        naming the new URL and the request id (as txlb's own answers do);
        none for HEAD.
        """
        location = self.location(proto, host, target)
        body = json.dumps({"location": location.decode("latin-1"), "requestId": requestId}).encode() + b"\n"
        head = responseHead(
            self.status, b"", [(b"Location", location), (b"Content-Type", b"application/json")],
            requestId=requestId, framing=b"Content-Length: %d" % len(body), close=close,
            keepAliveHeader=keepAliveHeader, rules=rules, values=values,
        )
        return head if method == b"HEAD" else head + body
