# -*- test-case-name: tests.test_cache -*-
"""
Response caching for HTTP services: RFC 9111 as a shared cache, in memory.

Three parts, none of which does I/O:

 - the policy: pure functions over header lists that say whether a request
   may be answered from the store (L{requestPolicy}), whether a response
   may be stored (L{storable}), how long it stays fresh
   (L{freshnessLifetime}) and how old it is (L{Entry.age});
 - the store (L{ResponseCache}): entries by C{(host, target)} and, under
   C{Vary}, by the request's selecting header values; least recently used
   first out, bounded by bytes (C{max_size}), no entry larger than
   C{max_object};
 - the stampede collapse: concurrent misses for one key wait for the first
   one's response (bounded by a timeout) instead of each reaching a
   backend.

The HTTP proxy (L{txlb.http.frontend}) consults the store with
L{ResponseCache.consult}, tees a backend response into a L{Fill} as it
streams it to the client, and writes stored responses with
L{storedResponse}.  Only explicitly fresh responses are stored: a response
without C{s-maxage}, C{max-age} or C{Expires} is never stored, however
cacheable its status is (no heuristic freshness).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from email.utils import mktime_tz, parsedate_tz
from typing import Callable, Iterable, Optional, Sequence

from txlb.http.headers import CLIENT_CERT, HOP_BY_HOP, responseHead

Headers = Sequence[tuple[bytes, bytes]]
Key = tuple[bytes, bytes]

#: RFC 9110 15.1: statuses "heuristically cacheable", i.e. storable without
#: an explicit say-so in the status itself.  206 is left out: txlb does not
#: combine partial responses, and Range requests are not cached at all.
CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: Methods answered from the store (HEAD from a stored GET).
_LOOKUP = frozenset({b"GET", b"HEAD"})
#: Methods whose successful response invalidates what is stored for the
#: target (RFC 9111 4.4).
_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: Request headers that make a GET something the store cannot answer.
_BYPASS_HEADERS = frozenset({b"range", b"if-match", b"if-unmodified-since", b"if-range"})
#: RFC 9111 1.2.2: a delta-seconds too large for us is this.
MAX_DELTA = 2**31
#: What an entry costs beyond its body and header bytes (the objects).
ENTRY_OVERHEAD = 256
#: Headers a 304 must not change in a stored response (RFC 9111 3.2).
_KEEP_ON_UPDATE = HOP_BY_HOP | {b"content-length", b"x-request-id", b"x-cache"}
#: What a 304 made from a stored response carries (RFC 9110 15.4.5).
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)

HIT = "HIT"
MISS = "MISS"
STALE = "STALE"
BYPASS = "BYPASS"

_DIRECTIVE = re.compile(rb'([^,=\s]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"?|[^,\s]*))?')
_ESCAPE = re.compile(rb"\\(.)")


# The policy.


def cacheControl(headers: Headers, name: bytes = b"cache-control") -> dict[bytes, Optional[bytes]]:
    """
    The directives of every C{Cache-Control} field of C{headers}: lower-case
    names to their argument (unquoted) or L{None}.  When a directive appears
    twice, the first wins (RFC 9111 4.2.1).
    """
    out: dict[bytes, Optional[bytes]] = {}
    for n, value in headers:
        if n.lower() != name:
            continue
        for m in _DIRECTIVE.finditer(value):
            directive, argument = m.group(1).lower(), m.group(2)
            if argument is not None and argument[:1] == b'"':
                argument = _ESCAPE.sub(rb"\1", argument[1:-1] if argument[-1:] == b'"' and len(argument) > 1
                                       else argument[1:])
            out.setdefault(directive, argument)
    return out


def deltaSeconds(value: Optional[bytes]) -> Optional[int]:
    """
    A C{delta-seconds} argument (RFC 9111 1.2.2), capped at L{MAX_DELTA};
    L{None} when it is missing or not a plain non-negative integer.
    """
    if not value or not value.isdigit():
        return None
    if len(value) > 10:
        return MAX_DELTA
    return min(int(value), MAX_DELTA)


def parseDate(value: Optional[bytes]) -> Optional[float]:
    """An HTTP-date as POSIX seconds, or L{None} when it is not one."""
    if value is None:
        return None
    try:
        parsed = parsedate_tz(value.decode("latin-1"))
        return None if parsed is None else float(mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError):
        return None


def firstValue(headers: Headers, name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def varyNames(headers: Headers) -> Optional[tuple[bytes, ...]]:
    """
    The request headers a response varies on (lower-case, sorted), or
    L{None} for C{Vary: *}, which no request can match.
    """
    names: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"vary":
            for part in v.split(b","):
                part = part.strip().lower()
                if part == b"*":
                    return None
                if part:
                    names.add(part)
    return tuple(sorted(names))


def selectingValues(headers: Headers, names: tuple[bytes, ...]) -> tuple[Optional[bytes], ...]:
    """
    What a request says for each of C{names}: its fields combined, each list
    member stripped (so C{"gzip, br"} and C{"gzip,br"} match), L{None} when
    absent (RFC 9111 4.1).
    """
    if not names:
        return ()
    found: dict[bytes, list[bytes]] = {}
    for n, v in headers:
        lower = n.lower()
        if lower in names:
            found.setdefault(lower, []).extend(p.strip() for p in v.split(b","))
    return tuple(b",".join(p for p in found[n] if p) if n in found else None for n in names)


def freshnessLifetime(cc: dict, headers: Headers, date: Optional[float], responseTime: float) -> Optional[float]:
    """
    RFC 9111 4.2.1 for a shared cache: C{s-maxage}, else C{max-age}, else
    C{Expires} minus C{Date}; L{None} when the response says none of them
    (an invalid value counts as said, and as already stale).
    """
    if b"s-maxage" in cc:
        return float(deltaSeconds(cc[b"s-maxage"]) or 0)
    if b"max-age" in cc:
        return float(deltaSeconds(cc[b"max-age"]) or 0)
    expires = firstValue(headers, b"expires")
    if expires is None:
        return None
    when = parseDate(expires)
    if when is None:
        return 0.0
    return max(0.0, when - (date if date is not None else responseTime))


def storable(status: int, cc: dict, headers: Headers, requestCC: dict, authorized: bool,
             responseTime: float) -> bool:
    """
    May a shared cache store this response to a GET (RFC 9111 3, 3.5)?
    Only with a cacheable-by-default status, explicit freshness (or
    C{no-cache} and a validator to revalidate with), and none of
    C{no-store}, C{private}, C{Set-Cookie}, C{Vary: *} or a C{Vary} on
    C{X-Client-Cert-*} (which txlb sets, so the client's request cannot
    select by them); a request with C{Authorization} (or a client
    certificate) only when the response says C{public}, C{s-maxage} or
    C{must-revalidate}.
    """
    if status not in CACHEABLE_STATUS:
        return False
    if b"no-store" in cc or b"private" in cc or b"no-store" in requestCC:
        return False
    if authorized and not (b"public" in cc or b"s-maxage" in cc or b"must-revalidate" in cc):
        return False
    validator = False
    for n, _ in headers:
        n = n.lower()
        if n == b"set-cookie":
            return False
        if n == b"etag" or n == b"last-modified":
            validator = True
    vary = varyNames(headers)
    if vary is None or not CLIENT_CERT.isdisjoint(vary):
        return False
    lifetime = freshnessLifetime(cc, headers, parseDate(firstValue(headers, b"date")), responseTime)
    if b"no-cache" in cc:
        return validator
    if lifetime is None:
        return False
    return lifetime > 0 or validator


class RequestPolicy:
    """
    What a request allows the cache to do (L{requestPolicy}).

    @ivar lookup: it may be answered from the store.
    @ivar store: its response may be stored (not for C{no-store}, nor for
        methods other than GET).
    @ivar authorized: it carries C{Authorization} (it is then never
        answered from the store), or came with a verified TLS client
        certificate: its response is stored only as L{storable} says.
    @ivar revalidate: C{no-cache} (or C{Pragma: no-cache}): go to the
        backend, with the stored validators.
    @ivar maxAge: the oldest stored response it accepts, or L{None}.
    @ivar conditional: it has its own C{If-None-Match}/C{If-Modified-Since}.
    """

    __slots__ = ("lookup", "store", "authorized", "revalidate", "maxAge", "onlyIfCached", "conditional", "cc")

    def __init__(self) -> None:
        self.lookup = self.store = self.authorized = self.revalidate = False
        self.onlyIfCached = self.conditional = False
        self.maxAge: Optional[int] = None
        self.cc: dict = {}


def requestPolicy(method: bytes, headers: Headers, hasBody: bool, certified: bool = False) -> RequestPolicy:
    """
    Read what C{method} and C{headers} allow (RFC 9111 5.2.1).
    C{certified}: the client proved who it is with a TLS certificate, so
    that its response, like one to C{Authorization}, is stored only when
    it says it may be shared (RFC 9111 3.5); what is stored (shared
    answers) may answer it.
    """
    policy = _requestPolicy(method, headers, hasBody)
    if certified:
        policy.authorized = True
    return policy


def _requestPolicy(method: bytes, headers: Headers, hasBody: bool) -> RequestPolicy:
    policy = RequestPolicy()
    if method not in _LOOKUP or hasBody:
        return policy
    pragma = False
    for n, v in headers:
        n = n.lower()
        if n == b"authorization":
            policy.authorized = True
        elif n in _BYPASS_HEADERS or n == b"upgrade":
            return policy
        elif n == b"if-none-match" or n == b"if-modified-since":
            policy.conditional = True
        elif n == b"pragma" and b"no-cache" in v.lower():
            pragma = True
    cc = policy.cc = cacheControl(headers)
    if b"no-store" in cc:
        return policy
    policy.store = method == b"GET"
    if policy.authorized:
        return policy
    policy.lookup = True
    policy.revalidate = b"no-cache" in cc or (pragma and b"cache-control" not in _names(headers))
    if b"max-age" in cc:
        policy.maxAge = deltaSeconds(cc[b"max-age"])
        if policy.maxAge is None:
            policy.maxAge = 0
    policy.onlyIfCached = b"only-if-cached" in cc
    return policy


def _names(headers: Headers) -> set[bytes]:
    return {n.lower() for n, _ in headers}


# The store.


class Entry:
    """
    One stored response: its head, its whole body, and what its age and
    freshness are computed from (RFC 9111 4.2.3).
    """

    __slots__ = ("key", "secondary", "vary", "status", "reason", "headers", "body", "requestTime",
                 "responseTime", "date", "ageValue", "lifetime", "noCache", "etag", "lastModified", "size")

    def __init__(self, key: Key, status: int, reason: bytes, headers: list, body: bytes,
                 requestTime: float, responseTime: float) -> None:
        self.key = key
        self.status = status
        self.reason = reason
        self.body = body
        self.vary: tuple[bytes, ...] = ()
        self.secondary: tuple = ()
        self.refresh(headers, requestTime, responseTime)

    def refresh(self, headers: list, requestTime: float, responseTime: float) -> None:
        """New header fields (from the response or a 304's update) and times."""
        self.headers = headers
        self.requestTime = requestTime
        self.responseTime = responseTime
        cc = cacheControl(headers)
        self.date = parseDate(firstValue(headers, b"date"))
        self.ageValue = deltaSeconds(firstValue(headers, b"age")) or 0
        self.lifetime = freshnessLifetime(cc, headers, self.date, responseTime) or 0.0
        self.noCache = b"no-cache" in cc
        self.etag = firstValue(headers, b"etag")
        self.lastModified = firstValue(headers, b"last-modified")
        self.size = (len(self.body) + sum(len(n) + len(v) + 4 for n, v in headers) + len(self.key[0])
                     + len(self.key[1]) + ENTRY_OVERHEAD)

    def age(self, now: float) -> float:
        """RFC 9111 4.2.3 C{current_age}."""
        apparent = max(0.0, self.responseTime - self.date) if self.date is not None else 0.0
        corrected = self.ageValue + (self.responseTime - self.requestTime)
        return max(apparent, corrected) + (now - self.responseTime)

    def fresh(self, now: float) -> bool:
        return not self.noCache and self.lifetime > self.age(now)

    def validators(self) -> list[tuple[bytes, bytes]]:
        """The conditional request headers that revalidate this entry."""
        out = []
        if self.etag is not None:
            out.append((b"If-None-Match", self.etag))
        if self.lastModified is not None:
            out.append((b"If-Modified-Since", self.lastModified))
        return out


class Plan:
    """
    What L{ResponseCache.consult} decided for one request.

    @ivar result: C{HIT}, C{MISS}, C{STALE} or C{BYPASS} (what C{X-Cache}
        and the request event say).
    @ivar entry: the stored response to serve (C{HIT}).
    @ivar fill: where the backend's response goes, when it may be stored.
    @ivar waiting: the request waits for another one's response; the
        C{wake} callable given to L{ResponseCache.consult} is called once,
        when that response is in (or not), or after the timeout.
    @ivar validators: headers to add to the request to the backend.
    """

    __slots__ = ("result", "key", "entry", "fill", "waiting", "validators", "onlyIfCached")

    def __init__(self, result: str, key: Key) -> None:
        self.result = result
        self.key = key
        self.entry: Optional[Entry] = None
        self.fill: Optional[Fill] = None
        self.waiting: Optional[_Waiter] = None
        self.validators: list = []
        #: C{only-if-cached} and nothing usable stored: answer 504.
        self.onlyIfCached = False


class _Waiter:
    __slots__ = ("wake", "timer")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.timer = None


class _Flight:
    """The one backend request for a key, and who waits for it."""

    __slots__ = ("started", "waiters")

    def __init__(self, started: float) -> None:
        self.started = started
        self.waiters: list[_Waiter] = []


class ResponseCache:
    """
    The store of one HTTP service.

    @param maxSize: bytes the entries may take in all (bodies, headers and
        a fixed overhead each); the least recently used go first.
    @param maxObject: the largest body stored; larger responses stream
        through and are not kept.
    @param clock: an C{IReactorTime}: ages, and the bounded wait of
        collapsed requests.
    """

    def __init__(self, maxSize: int, maxObject: int, clock) -> None:
        self.maxSize = maxSize
        self.maxObject = maxObject
        self.clock = clock
        self.size = 0
        self._lru: OrderedDict[tuple, Entry] = OrderedDict()
        #: The C{Vary} names of each key's stored variants.
        self._vary: dict[Key, tuple[bytes, ...]] = {}
        self._variants: dict[Key, set[tuple]] = {}
        self._flights: dict[Key, _Flight] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def configure(self, maxSize: int, maxObject: int) -> None:
        """New bounds (a reload): entries beyond them go now."""
        self.maxSize, self.maxObject = maxSize, maxObject
        for entry in [e for e in self._lru.values() if len(e.body) > maxObject]:
            self._remove(entry)
        self._evict()

    # Entries.

    def lookup(self, key: Key, headers: Headers) -> Optional[Entry]:
        """The stored response for C{key} that matches C{headers}' variant."""
        names = self._vary.get(key)
        if names is None:
            return None
        entry = self._lru.get((key, selectingValues(headers, names)))
        if entry is not None:
            self._lru.move_to_end((key, entry.secondary))
        return entry

    def store(self, entry: Entry, requestHeaders: Headers) -> bool:
        """
        Keep C{entry}, the response to a request with C{requestHeaders};
        false when it is too large.  It replaces the variant it matches, and
        every variant of its key when its C{Vary} differs from theirs.
        """
        names = varyNames(entry.headers)
        if names is None or len(entry.body) > self.maxObject or entry.size > self.maxSize:
            return False
        key = entry.key
        if self._vary.get(key, names) != names:
            self.remove(key)
        entry.vary = names
        entry.secondary = selectingValues(requestHeaders, names)
        old = self._lru.pop((key, entry.secondary), None)
        if old is not None:
            self.size -= old.size
        self._vary[key] = names
        self._variants.setdefault(key, set()).add(entry.secondary)
        self._lru[(key, entry.secondary)] = entry
        self.size += entry.size
        self._evict()
        return True

    def resized(self, entry: Entry, before: int) -> None:
        """C{entry}'s headers changed (a 304's update) from C{before} bytes."""
        if self._lru.get((entry.key, entry.secondary)) is entry:
            self.size += entry.size - before
            self._evict()

    def _evict(self) -> None:
        while self.size > self.maxSize and self._lru:
            self._remove(next(iter(self._lru.values())))

    def _remove(self, entry: Entry) -> None:
        if self._lru.pop((entry.key, entry.secondary), None) is None:
            return
        self.size -= entry.size
        variants = self._variants.get(entry.key)
        if variants is not None:
            variants.discard(entry.secondary)
            if not variants:
                del self._variants[entry.key]
                self._vary.pop(entry.key, None)

    def remove(self, key: Key) -> int:
        """Forget every variant stored for C{key}; how many there were."""
        variants = self._variants.pop(key, set())
        self._vary.pop(key, None)
        for secondary in variants:
            entry = self._lru.pop((key, secondary), None)
            if entry is not None:
                self.size -= entry.size
        return len(variants)

    def purge(self, prefix: Optional[bytes] = None) -> int:
        """
        Forget every entry, or those whose target (path and query) starts
        with C{prefix}; how many were removed.
        """
        if not prefix:
            count = len(self._lru)
            self._lru.clear()
            self._vary.clear()
            self._variants.clear()
            self.size = 0
            return count
        return sum(self.remove(key) for key in [k for k in self._variants if k[1].startswith(prefix)])

    # Requests.

    def consult(self, method: bytes, host: Optional[bytes], target: bytes, headers: Headers, hasBody: bool,
                *, collapse: bool = True, wake: Optional[Callable[[], None]] = None,
                timeout: float = 30.0, certified: bool = False) -> Plan:
        """
        Decide how to answer one request.  A miss that may C{collapse}
        behind another request for the same key already at a backend
        waits for it: C{wake} is called when that one's response is in, or
        after C{timeout} seconds; the caller then consults again, with
        C{collapse} false.  C{certified}: see L{requestPolicy}.
        """
        policy = requestPolicy(method, headers, hasBody, certified)
        key = ((host or b"").lower(), target)
        now = self.clock.seconds()
        if not policy.lookup:
            plan = Plan(BYPASS, key)
            if policy.store:
                plan.fill = Fill(self, key, headers, policy, now, None, False)
            return plan
        entry = self.lookup(key, headers)
        if entry is not None and not policy.revalidate and entry.fresh(now) and (
                policy.maxAge is None or entry.age(now) <= policy.maxAge):
            plan = Plan(HIT, key)
            plan.entry = entry
            return plan
        plan = Plan(STALE if entry is not None else MISS, key)
        if policy.onlyIfCached:
            plan.onlyIfCached = True
            return plan
        if method != b"GET":
            return plan  # HEAD: forwarded, never stored
        lead = collapse and not policy.revalidate and not policy.conditional and wake is not None
        if lead:
            flight = self._flights.get(key)
            if flight is not None and now - flight.started < timeout:
                plan.waiting = self._wait(key, flight, wake, timeout)
                return plan
            self._flights[key] = _Flight(now)
        if entry is not None and not policy.conditional:
            plan.validators = entry.validators()
        plan.fill = Fill(self, key, headers, policy, now, entry, lead)
        return plan

    def _wait(self, key: Key, flight: _Flight, wake: Callable[[], None], timeout: float) -> _Waiter:
        waiter = _Waiter(wake)
        waiter.timer = self.clock.callLater(timeout, self._timedOut, key, waiter)
        flight.waiters.append(waiter)
        return waiter

    def _timedOut(self, key: Key, waiter: _Waiter) -> None:
        waiter.timer = None
        self.cancel(key, waiter)
        waiter.wake()

    def cancel(self, key: Key, waiter: _Waiter) -> None:
        """A waiting request is gone (its client left)."""
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        flight = self._flights.get(key)
        if flight is not None and waiter in flight.waiters:
            flight.waiters.remove(waiter)

    def landed(self, key: Key) -> None:
        """The leading request for C{key} is answered: wake who waits."""
        flight = self._flights.pop(key, None)
        if flight is None:
            return
        for waiter in flight.waiters:
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
            waiter.wake()

    def waiting(self) -> int:
        """Requests waiting for another's response, for tests and stats."""
        return sum(len(f.waiters) for f in self._flights.values())


class Fill:
    """
    A backend response on its way into the store: told the head, each body
    piece and the end by the exchange streaming it to the client.  The body
    is kept only while it stays within C{max_object}: past that the fill
    gives up, and the rest streams through.
    """

    storing = False

    def __init__(self, cache: ResponseCache, key: Key, requestHeaders: Headers, policy: RequestPolicy,
                 requestTime: float, stale: Optional[Entry], leading: bool) -> None:
        self.cache = cache
        self.key = key
        self.requestHeaders = requestHeaders
        self.policy = policy
        self.requestTime = requestTime
        self.stale = stale
        self.leading = leading
        self.size = 0

    def head(self, status: int, reason: bytes, headers: list, now: float) -> Optional[Entry]:
        """
        The response head.  Returns the stored entry when this was the
        cache's own revalidation and the backend said 304: it is refreshed,
        and the client gets it instead of the 304.
        """
        stale = self.stale
        if status == 304 and stale is not None:
            if not self.policy.conditional or (stale.etag is not None
                                               and firstValue(headers, b"etag") == stale.etag):
                self._update(stale, headers, now)
            self._done()
            return None if self.policy.conditional else stale
        cc = cacheControl(headers)
        if storable(status, cc, headers, self.policy.cc, self.policy.authorized, now):
            length = firstValue(headers, b"content-length")
            if length is None or not length.isdigit() or int(length) <= self.cache.maxObject:
                self.status, self.reason, self.headers = status, reason, headers
                self.responseTime = now
                self.body: list[bytes] = []
                self.storing = True
                return None
        elif stale is not None and status < 500:
            self.cache.remove(self.key)  # the backend no longer lets it be kept
        self._done()
        return None

    def add(self, data: bytes) -> bool:
        """A piece of the body; false when the fill gave up (too large)."""
        self.size += len(data)
        if self.size > self.cache.maxObject:
            self.abandon()
            return False
        self.body.append(data)
        return True

    def end(self) -> None:
        """The whole body is in: store it, then wake who waits for it."""
        if self.storing:
            self.storing = False
            entry = Entry(self.key, self.status, self.reason, self.headers, b"".join(self.body),
                          self.requestTime, self.responseTime)
            self.body = []
            self.cache.store(entry, self.requestHeaders)
        self._done()

    def abandon(self) -> None:
        """No (whole) response to store: the backend failed, or it is too large."""
        self.storing = False
        self.body = []
        self._done()

    def _done(self) -> None:
        if self.leading:
            self.leading = False
            self.cache.landed(self.key)

    def _update(self, entry: Entry, headers: Headers, now: float) -> None:
        """RFC 9111 3.2 and 4.3.4: freshen C{entry} with a 304's fields."""
        names = {n.lower() for n, _ in headers} - _KEEP_ON_UPDATE
        before = entry.size
        kept = [(n, v) for n, v in entry.headers if n.lower() not in names]
        kept.extend((n, v) for n, v in headers if n.lower() in names)
        entry.refresh(kept, self.requestTime, now)
        cc = cacheControl(kept)
        if b"no-store" in cc or b"private" in cc:
            self.cache.remove(entry.key)
        else:
            self.cache.resized(entry, before)


# Serving.


def _notModified(entry: Entry, headers: Headers) -> bool:
    """Does the request's own condition hold for C{entry} (RFC 9110 13.1.2, 13.1.3)?"""
    inm = None
    ims = None
    for n, v in headers:
        n = n.lower()
        if n == b"if-none-match":
            inm = v if inm is None else inm + b"," + v
        elif n == b"if-modified-since":
            ims = v
    if inm is not None:
        if entry.etag is None:
            return False
        if inm.strip() == b"*":
            return True
        mine = entry.etag.removeprefix(b"W/")
        return any(t.strip().removeprefix(b"W/") == mine for t in inm.split(b","))
    if ims is not None and entry.lastModified is not None and entry.status == 200:
        since, modified = parseDate(ims), parseDate(entry.lastModified)
        return since is not None and modified is not None and modified <= since
    return False


def storedResponse(entry: Entry, now: float, method: bytes, requestHeaders: Headers, *, requestId: str,
                   close: bool, keepAliveHeader: bool, result: str = HIT,
                   extra: Iterable[bytes] = (), rules=None, values: Sequence[bytes] = ()) -> tuple[int, bytes]:
    """
    C{(status, bytes)} of the answer to a request from a stored response:
    its head with a current C{Age} and C{X-Cache}, and its body (none for
    HEAD, nor for the 304 of a request whose own condition holds).  The
    response header C{rules} apply as to any response (the entry holds the
    backend's head as it came, or as compression rewrote it).
    """
    extra = [b"Age: %d" % int(entry.age(now)), b"X-Cache: " + result.encode("ascii"), *extra]
    headers = [(n, v) for n, v in entry.headers if n.lower() not in (b"age", b"x-cache")]
    if _notModified(entry, requestHeaders):
        headers = [(n, v) for n, v in headers if n.lower() in _NOT_MODIFIED_FIELDS]
        return 304, responseHead(304, b"Not Modified", headers, requestId=requestId, framing=None,
                                 close=close, keepAliveHeader=keepAliveHeader, extra=extra, rules=rules,
                                 values=values)
    status = entry.status
    framing = None if status == 204 else b"Content-Length: %d" % len(entry.body)
    head = responseHead(status, entry.reason, headers, requestId=requestId, framing=framing, close=close,
                        keepAliveHeader=keepAliveHeader, extra=extra, rules=rules, values=values)
    if method == b"HEAD" or status == 204:
        return status, head
    return status, head + entry.body
