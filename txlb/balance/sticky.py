# -*- test-case-name: tests.test_sticky -*-
"""
Sticky sessions: keeping a client on the server that holds its session.

Three modes, one per service (C{sticky.mode}):

  - C{cookie}: txlb's own cookie (C{LB_SERVER=server-2}) names the server.
    Nothing is stored: the client carries its affinity.
  - C{ip}: the client address is the key, kept in the session store.
  - C{key}: the application's own session id (C{cookie:SESSIONID} or
    C{header:X-Session}) is the key, kept in the session store; a response
    that hands out a session id pins it to the server that made it.

The proxies ask L{Sticky.affinity} once per request or connection, then
L{Sticky.choose} for each try: the pinned server while it is usable, else
L{None} and the scheduler picks.  When the answer comes, L{Sticky.answered}
records a new affinity (a C{Set-Cookie} line, or a write to the store) and
logs C{sticky_reassigned} when a pin moved.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Collection, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txlb.balance.hashkey import hashKeyOf
from txlb.balance.pool import Pool, Server, ServerState
from txlb.interfaces import Decision, ISessionStore

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import StickyConfig

_log = Logger(namespace="txlb.balance.sticky")

#: What a server name can look like (the config's rule); any other cookie
#: value is garbage, ignored.
_SERVER_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Session ids longer than this, or not plain printable ASCII, are stored
#: by their SHA-256.
_LONGEST_KEY = 128
_PLAIN = re.compile(r"[!-~]+")

#: Why a pinned server is not used, when that is no reason to re-pin.
FULL = "at max_connections"
NOT_IN_POOL = "not in pool"
CONNECT_FAILED = "connect failed"


class Affinity:
    """
    One request's (or TCP connection's) sticky state.

    @ivar key: the store key (C{ip} and C{key} modes), or L{None}.
    @ivar previous: the server it is pinned to, while that is still to be
        tried; L{None} when there is no pin (or it was given up).
    @ivar record: the server that answers becomes the pin.
    @ivar replace: when recording, overwrite a pin another balancer may
        have made meanwhile (a re-pin) rather than keep it (a new pin).
    @ivar moved: C{(previousServer, reason)} when a pin is being moved.
    @ivar pending: a Deferred while the store is still looking the key up.
    """

    __slots__ = ("key", "previous", "record", "replace", "moved", "pending")

    def __init__(self, key: Optional[str], previous: Optional[str], record: bool) -> None:
        self.key = key
        self.previous = previous
        self.record = record
        self.replace = False
        self.moved: Optional[tuple[str, str]] = None
        self.pending: Optional[Deferred] = None


def usable(pool: Pool, name: str, exclude: Collection[Server] = ()) -> tuple[Optional[Server], str]:
    """
    The server of C{pool} called C{name} when it may take this request,
    else L{None} and why not: its state (C{down}, C{ejected},
    C{draining}, ...), L{NOT_IN_POOL}, L{CONNECT_FAILED} or L{FULL}.
    """
    try:
        server = pool.server(name)
    except KeyError:
        return None, NOT_IN_POOL
    if server in exclude:
        return None, CONNECT_FAILED
    state = server.state
    if state is not ServerState.UP:
        return None, state.value
    if pool.maxConnections and server.active >= pool.maxConnections:
        return None, FULL
    return server, ""


def storeKey(prefix: str, value: str) -> str:
    """C{prefix + value}, with a long or unusual C{value} replaced by its digest."""
    if len(value) > _LONGEST_KEY or not _PLAIN.fullmatch(value):
        value = "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return prefix + value


class Sticky:
    """
    One service's sticky setting.

    @param store: where C{ip} and C{key} affinities live (unused, and may
        be L{None}, in C{cookie} mode).
    @param secure: the service is served over TLS: the cookie says
        C{Secure}.
    """

    def __init__(self, service: str, config: StickyConfig, store: Optional[ISessionStore] = None,
                 *, secure: bool = False) -> None:
        if config.mode != "cookie" and store is None:
            raise ValueError(f"sticky mode {config.mode!r} needs a session store")
        self.service = service
        self.mode = config.mode
        self.store = store
        self.reason = "sticky " + config.mode
        self.prefix = f"txlb:sticky:{service}:"
        self._cookie = config.cookie.encode("ascii")
        self._cookieAttributes = b"; Path=/; HttpOnly" + (b"; Secure" if secure else b"")
        self.keySpec = config.key
        if config.key is not None:
            kind, _, name = config.key.partition(":")
            self._learnCookie = name.encode("latin-1") + b"=" if kind == "cookie" else None
            self._learnHeader = name.lower().encode("latin-1") if kind == "header" else None

    # Finding the pin.

    def affinity(self, client: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> Affinity:
        """
        The affinity of a new request from C{client}.  With an asynchronous
        store its C{pending} may be a Deferred, after which C{previous} is
        known.
        """
        if self.mode == "cookie":
            name = self.cookieServer(headers)
            return Affinity(None, name, name is None)
        if self.mode == "ip":
            key = self.prefix + client
        else:
            value = hashKeyOf(self.keySpec, b"", headers)
            if not value:
                # No session yet: nothing to follow; the response may make one.
                return Affinity(None, None, False)
            key = storeKey(self.prefix, value)
        found = self.store.get(key)
        if isinstance(found, Deferred):
            affinity = Affinity(key, None, False)
            affinity.pending = found
            found.addCallback(self._found, affinity)
            return affinity
        return Affinity(key, found, found is None)

    @staticmethod
    def _found(name: Optional[str], affinity: Affinity) -> Optional[str]:
        affinity.pending = None
        affinity.previous = name
        affinity.record = name is None
        return name

    def cookieServer(self, headers: Sequence[tuple[bytes, bytes]]) -> Optional[str]:
        """
        The server named by txlb's cookie, or L{None} when there is none or
        its value cannot be a server name (garbage is ignored, never an
        error).
        """
        wanted = self._cookie
        for name, value in headers:
            if len(name) == 6 and name.lower() == b"cookie" and wanted in value:
                for part in value.split(b";"):
                    key, eq, server = part.strip().partition(b"=")
                    if eq and key == wanted:
                        server = server.strip()
                        if _SERVER_NAME.fullmatch(server):
                            return server.decode("ascii")
                        return None
        return None

    # Choosing a server.

    def choose(self, pool: Pool, affinity: Affinity, exclude: Collection[Server] = ()) -> Optional[Decision]:
        """
        The pinned server, counted in flight, when it may take this try;
        else L{None}: let the scheduler pick (and, unless the pinned
        server is only full for now, re-pin to whatever answers).
        """
        name = affinity.previous
        if name is None:
            return None
        server, why = usable(pool, name, exclude)
        if server is not None:
            return pool.take(server, self.reason)
        if why is not FULL:
            affinity.previous = None
            affinity.moved = (name, why)
            affinity.record = affinity.replace = True
        return None

    # The answer.

    def answered(self, affinity: Affinity, server: Server, client: str,
                 headers: Sequence[tuple[bytes, bytes]] = ()) -> Sequence[bytes]:
        """
        C{server} answers: record a new affinity.  Returns the header lines
        to add to the response (the cookie, in cookie mode).
        """
        extra: Sequence[bytes] = ()
        if affinity.record:
            affinity.record = False
            if affinity.moved is not None:
                previous, why = affinity.moved
                _log.info(
                    "sticky client {client} moved from {previousServer} to {selectedServer}: {reason}",
                    event="sticky_reassigned", service=self.service, mode=self.mode, client=client,
                    previousServer=previous, selectedServer=server.name, reason=why,
                )
            if self.mode == "cookie":
                extra = (self.cookieLine(server.name),)
            elif affinity.key is not None:
                self.store.set(affinity.key, server.name, affinity.replace)
                affinity.previous = server.name
        if self.mode == "key" and headers:
            self._learn(affinity, server, headers)
        return extra

    def cookieLine(self, server: str) -> bytes:
        return b"Set-Cookie: " + self._cookie + b"=" + server.encode("ascii") + self._cookieAttributes

    def _learn(self, affinity: Affinity, server: Server, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """A response handing out a session id pins it to the server that made it."""
        value = None
        if self._learnCookie is not None:
            prefix = self._learnCookie
            for name, v in headers:
                if len(name) == 10 and name.lower() == b"set-cookie" and v.startswith(prefix):
                    value = v[len(prefix):].partition(b";")[0].strip()
        else:
            wanted = self._learnHeader
            for name, v in headers:
                if name.lower() == wanted:
                    value = v.strip()
                    break
        if not value:
            return
        key = storeKey(self.prefix, value.decode("latin-1"))
        if key == affinity.key and affinity.previous == server.name:
            return  # the session it already follows, on its server
        self.store.set(key, server.name, True)
