"""
The response cache: its policy and store as pure functions and objects
(RFC 9111 as a shared cache), then the proxy's cache path on a memory
reactor, time on its clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from txlb.cache import (
    MAX_DELTA,
    MISS,
    Entry,
    ResponseCache,
    cacheControl,
    deltaSeconds,
    freshnessLifetime,
    requestPolicy,
    selectingValues,
    storable,
    storedResponse,
    varyNames,
)
from txlb.config import CacheConfig
from tests.test_http_frontend import Harness, head

# The policy.


def test_cache_control_directives():
    cc = cacheControl([(b"Cache-Control", b'Max-Age=60, no-cache="Set-Cookie, X", private'),
                       (b"cache-control", b"max-age=5, s-maxage=\"7\"")])
    assert cc == {b"max-age": b"60", b"no-cache": b"Set-Cookie, X", b"private": None, b"s-maxage": b"7"}


@given(st.dictionaries(st.sampled_from([b"max-age", b"s-maxage", b"public", b"no-store", b"x-thing"]),
                       st.one_of(st.none(), st.integers(0, 10**6).map(lambda n: b"%d" % n)), min_size=1),
       st.booleans())
def test_cache_control_round_trips(directives, quoted):
    parts = []
    for name, value in directives.items():
        if value is None:
            parts.append(name)
        else:
            parts.append(name + b"=" + (b'"%s"' % value if quoted else value))
    assert cacheControl([(b"Cache-Control", b" , ".join(parts))]) == directives


@given(st.integers(0, 10**40))
def test_delta_seconds_is_capped(n):
    assert deltaSeconds(b"%d" % n) == min(n, MAX_DELTA)


@pytest.mark.parametrize("value", [None, b"", b"-1", b"1.5", b"1e3", b" 5", b"0x10", "٣".encode()])
def test_delta_seconds_refuses_what_is_not_one(value):
    assert deltaSeconds(value) is None


def test_freshness_prefers_s_maxage_then_max_age_then_expires():
    headers = [(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"Expires", b"Sun, 06 Nov 1994 08:50:37 GMT")]
    assert freshnessLifetime({b"s-maxage": b"5", b"max-age": b"9"}, headers, None, 0) == 5
    assert freshnessLifetime({b"max-age": b"9"}, headers, None, 0) == 9
    date = 784111777.0
    assert freshnessLifetime({}, headers, date, 0) == 60
    assert freshnessLifetime({}, [(b"Expires", b"0")], None, 0) == 0  # invalid: already stale
    assert freshnessLifetime({b"max-age": b"soon"}, [], None, 0) == 0
    assert freshnessLifetime({}, [], None, 0) is None


def fresh(*extra):
    return [(b"Cache-Control", b"max-age=60"), *extra]


@pytest.mark.parametrize(
    "status, headers, requestCC, authorized, expected",
    [
        (200, fresh(), {}, False, True),
        (404, fresh(), {}, False, True),
        (302, fresh(), {}, False, False),
        (206, fresh(), {}, False, False),
        (500, fresh(), {}, False, False),
        (200, [], {}, False, False),  # no explicit freshness: never stored
        (200, [(b"ETag", b'"a"')], {}, False, False),
        (200, [(b"Cache-Control", b"max-age=60, no-store")], {}, False, False),
        (200, [(b"Cache-Control", b"max-age=60, private")], {}, False, False),
        (200, [(b"Cache-Control", b'max-age=60, private="X-User"')], {}, False, False),
        (200, fresh((b"Set-Cookie", b"a=b")), {}, False, False),
        (200, fresh((b"Vary", b"Accept, *")), {}, False, False),
        (200, fresh((b"Vary", b"Accept")), {}, False, True),
        (200, fresh(), {b"no-store": None}, False, False),
        (200, fresh(), {}, True, False),
        (200, [(b"Cache-Control", b"max-age=60, public")], {}, True, True),
        (200, [(b"Cache-Control", b"s-maxage=60")], {}, True, True),
        (200, [(b"Cache-Control", b"max-age=60, must-revalidate")], {}, True, True),
        (200, [(b"Cache-Control", b"max-age=0")], {}, False, False),
        (200, [(b"Cache-Control", b"max-age=0"), (b"ETag", b'"a"')], {}, False, True),
        (200, [(b"Cache-Control", b"no-cache"), (b"Last-Modified", b"Sun, 06 Nov 1994 08:49:37 GMT")],
         {}, False, True),
        (200, [(b"Expires", b"Sun, 06 Nov 2094 08:49:37 GMT")], {}, False, True),
    ],
)
def test_storable(status, headers, requestCC, authorized, expected):
    cc = cacheControl(headers)
    assert storable(status, cc, headers, requestCC, authorized, 0.0) is expected


def test_request_policy():
    get = requestPolicy(b"GET", [], False)
    assert (get.lookup, get.store, get.revalidate) == (True, True, False)
    assert not requestPolicy(b"POST", [], True).lookup
    assert not requestPolicy(b"GET", [], True).lookup  # a GET with a body
    head = requestPolicy(b"HEAD", [], False)
    assert head.lookup and not head.store
    auth = requestPolicy(b"GET", [(b"Authorization", b"Basic x")], False)
    assert (auth.lookup, auth.store, auth.authorized) == (False, True, True)
    assert requestPolicy(b"GET", [(b"Cache-Control", b"no-cache")], False).revalidate
    assert requestPolicy(b"GET", [(b"Pragma", b"no-cache")], False).revalidate
    assert not requestPolicy(b"GET", [(b"Pragma", b"no-cache"), (b"Cache-Control", b"max-age=5")], False).revalidate
    assert requestPolicy(b"GET", [(b"Cache-Control", b"max-age=5")], False).maxAge == 5
    nostore = requestPolicy(b"GET", [(b"Cache-Control", b"no-store")], False)
    assert not nostore.lookup and not nostore.store
    assert not requestPolicy(b"GET", [(b"Range", b"bytes=0-1")], False).lookup
    assert requestPolicy(b"GET", [(b"If-None-Match", b'"a"')], False).conditional


def test_vary():
    assert varyNames([(b"Vary", b"Accept-Encoding, accept"), (b"vary", b"X-A")]) == (b"accept", b"accept-encoding",
                                                                                     b"x-a")
    assert varyNames([(b"Vary", b"*")]) is None
    names = (b"accept-encoding", b"x-a")
    assert selectingValues([(b"Accept-Encoding", b"gzip, br")], names) == (b"gzip,br", None)
    assert selectingValues([(b"accept-encoding", b"gzip,br")], names) == (b"gzip,br", None)


def test_age_follows_rfc_9111_4_2_3():
    entry = Entry((b"h", b"/"), 200, b"OK", [(b"Age", b"10"), (b"Cache-Control", b"max-age=60")], b"x",
                  requestTime=100.0, responseTime=102.0)
    assert entry.age(102.0) == 12  # Age + response delay
    assert entry.age(150.0) == 60
    assert entry.fresh(147.0) and not entry.fresh(150.0)


# The store.


def entry(path: bytes, size: int, headers=(), now: float = 0.0) -> Entry:
    return Entry((b"h", path), 200, b"OK", [(b"Cache-Control", b"max-age=60"), *headers], b"x" * size, now, now)


def test_store_is_lru_by_bytes():
    clock = Clock()
    one = entry(b"/1", 1000).size
    cache = ResponseCache(3 * one, 10_000, clock)
    for p in (b"/1", b"/2", b"/3"):
        assert cache.store(entry(p, 1000), [])
    assert cache.lookup((b"h", b"/1"), [])  # now the most recently used
    cache.store(entry(b"/4", 1000), [])
    assert cache.lookup((b"h", b"/2"), []) is None
    assert {p for p in (b"/1", b"/3", b"/4") if cache.lookup((b"h", p), [])} == {b"/1", b"/3", b"/4"}
    assert cache.size == 3 * one


def test_store_refuses_what_is_too_large():
    cache = ResponseCache(10_000, 100, Clock())
    assert not cache.store(entry(b"/", 101), [])
    assert cache.store(entry(b"/", 100), [])
    assert not ResponseCache(300, 1000, Clock()).store(entry(b"/", 100), [])  # with its headers, over max_size


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3000)), max_size=60), st.integers(500, 8000))
def test_store_never_exceeds_max_size(ops, maxSize):
    cache = ResponseCache(maxSize, 2000, Clock())
    for path, size in ops:
        cache.store(entry(b"/%d" % path, size), [])
        assert cache.size <= maxSize
        assert cache.size == sum(e.size for e in cache._lru.values())
        assert all(len(e.body) <= 2000 for e in cache._lru.values())


def test_vary_keeps_variants_apart():
    cache = ResponseCache(10**6, 10**5, Clock())
    vary = [(b"Vary", b"Accept-Encoding")]
    gz = entry(b"/", 1, vary)
    plain = entry(b"/", 2, vary)
    cache.store(gz, [(b"Accept-Encoding", b"gzip")])
    cache.store(plain, [])
    assert cache.lookup((b"h", b"/"), [(b"accept-encoding", b"gzip")]) is gz
    assert cache.lookup((b"h", b"/"), []) is plain
    assert cache.lookup((b"h", b"/"), [(b"Accept-Encoding", b"br")]) is None
    # A response varying otherwise replaces them all.
    other = entry(b"/", 3, [(b"Vary", b"Accept")])
    cache.store(other, [(b"Accept", b"text/html")])
    assert cache.lookup((b"h", b"/"), [(b"accept-encoding", b"gzip")]) is None
    assert len(cache) == 1


def test_purge():
    cache = ResponseCache(10**6, 10**5, Clock())
    for p in (b"/a/1", b"/a/2?x", b"/b"):
        cache.store(entry(p, 1), [])
    assert cache.purge(b"/a/") == 2
    assert len(cache) == 1
    assert cache.purge() == 1
    assert (len(cache), cache.size) == (0, 0)


def test_collapse_waits_are_bounded_and_woken():
    clock = Clock()
    cache = ResponseCache(10**6, 10**5, clock)
    woken = []
    lead = cache.consult(b"GET", b"h", b"/", [], False, wake=lambda: woken.append(0), timeout=5)
    assert lead.result == MISS and lead.fill is not None and lead.waiting is None
    waits = [cache.consult(b"GET", b"h", b"/", [], False, wake=lambda i=i: woken.append(i), timeout=5)
             for i in (1, 2)]
    assert all(w.waiting is not None and w.fill is None for w in waits)
    clock.advance(5)
    assert woken == [1, 2]  # the bound
    third = cache.consult(b"GET", b"h", b"/", [], False, wake=lambda: woken.append(3), timeout=5)
    # The leader's flight is as old as the timeout: this one leads anew.
    assert third.waiting is None


def test_stored_response_answers_a_conditional_request():
    e = entry(b"/", 5, [(b"ETag", b'W/"v1"')])
    status, data = storedResponse(e, 3.0, b"GET", [(b"If-None-Match", b'"x", "v1"')], requestId="r",
                                  close=False, keepAliveHeader=False)
    assert status == 304 and b"Content-Length" not in data and b"ETag: W/\"v1\"" in data
    status, data = storedResponse(e, 3.0, b"HEAD", [], requestId="r", close=False, keepAliveHeader=False)
    assert status == 200 and data.endswith(b"Content-Length: 5\r\n\r\n") and b"Age: 3\r\n" in data


# The proxy's cache path.


def cached(**settings) -> Harness:
    settings.setdefault("cacheConfig", CacheConfig(max_size=1024 * 1024, max_object=64 * 1024))
    h = Harness(servers=1, **settings)
    # Memory transports do not close: keep idle backend connections for
    # as long as these tests move the clock.
    h.connections.idleTimeout = 3600.0
    return h


def ask(h: Harness, request: bytes = b"GET /r HTTP/1.1\r\nHost: a\r\n\r\n"):
    frontend, client = h.accept()
    frontend.dataReceived(request)
    return frontend, client


FRESH = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\nhello"


def test_miss_then_hit_with_age(events):
    h = cached()
    _, first = ask(h)
    backend, _ = h.answer()
    backend.dataReceived(FRESH)
    status, fields = head(first.value())
    assert status == b"HTTP/1.1 200 OK" and fields[b"x-cache"] == [b"MISS"]
    h.reactor.advance(7)
    _, second = ask(h)
    assert h.connects() == 1 and h.servers[0].total == 1
    status, fields = head(second.value())
    assert status == b"HTTP/1.1 200 OK"
    assert (fields[b"x-cache"], fields[b"age"], fields[b"content-length"]) == ([b"HIT"], [b"7"], [b"5"])
    assert second.value().endswith(b"\r\n\r\nhello")
    assert [e["cache"] for e in events if e.get("event") == "request"] == ["MISS", "HIT"]
    # HEAD is answered from the stored GET.
    _, third = ask(h, b"HEAD /r HTTP/1.1\r\nHost: a\r\n\r\n")
    assert third.value().endswith(b"Content-Length: 5\r\n\r\n")
    assert h.servers[0].total == 1


def test_hit_expires_and_is_revalidated_with_the_stored_validators():
    h = cached()
    _, first = ask(h)
    backend, server = h.answer()
    backend.dataReceived(FRESH)
    h.reactor.advance(61)
    _, second = ask(h)
    line, fields = head(server.value().split(b"\r\n\r\n")[1] + b"\r\n\r\n")
    assert fields[b"if-none-match"] == [b'"v1"']
    backend.dataReceived(b"HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=30\r\nETag: \"v1\"\r\n\r\n")
    status, answer = head(second.value())
    assert status == b"HTTP/1.1 200 OK"
    assert (answer[b"x-cache"], answer[b"cache-control"], answer[b"age"]) == ([b"STALE"], [b"max-age=30"], [b"0"])
    assert second.value().endswith(b"\r\n\r\nhello")
    h.reactor.advance(10)
    _, third = ask(h)
    assert head(third.value())[1][b"x-cache"] == [b"HIT"] and h.servers[0].total == 2


def test_no_cache_request_reaches_the_backend_and_a_304_refreshes():
    h = cached()
    _, first = ask(h)
    backend, server = h.answer()
    backend.dataReceived(FRESH)
    _, second = ask(h, b"GET /r HTTP/1.1\r\nHost: a\r\nCache-Control: no-cache\r\n\r\n")
    assert h.servers[0].total == 2
    assert b'If-None-Match: "v1"' in server.value().split(b"\r\n\r\n", 2)[1]
    backend.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
    assert second.value().endswith(b"\r\n\r\nhello") and b"X-Cache: STALE" in second.value()


def test_a_client_conditional_gets_the_backends_304():
    h = cached()
    ask(h)
    backend, server = h.answer()
    backend.dataReceived(FRESH)
    _, second = ask(h, b'GET /r HTTP/1.1\r\nHost: a\r\nCache-Control: no-cache\r\nIf-None-Match: "v1"\r\n\r\n')
    backend.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n")
    assert head(second.value())[0] == b"HTTP/1.1 304 Not Modified"
    # And a fresh hit answers a client's conditional itself.
    _, third = ask(h, b'GET /r HTTP/1.1\r\nHost: a\r\nIf-None-Match: "v1"\r\n\r\n')
    assert head(third.value())[0] == b"HTTP/1.1 304 Not Modified" and h.servers[0].total == 2


def test_vary_variants_are_separate():
    h = cached()
    vary = (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: Accept-Encoding\r\n"
            b"Content-Length: %d\r\n\r\n%s")
    _, gz = ask(h, b"GET /v HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, _ = h.answer()
    backend.dataReceived(vary % (2, b"gz"))
    _, plain = ask(h, b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.servers[0].total == 2
    backend.dataReceived(vary % (5, b"plain"))
    _, again = ask(h, b"GET /v HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    assert again.value().endswith(b"\r\n\r\ngz") and b"X-Cache: HIT" in again.value()
    _, again = ask(h, b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
    assert again.value().endswith(b"\r\n\r\nplain") and b"X-Cache: HIT" in again.value()
    assert h.servers[0].total == 2


def test_fifty_concurrent_misses_make_one_backend_request(events):
    h = cached()
    clients = [ask(h)[1] for _ in range(50)]
    assert h.connects() == 1
    backend, server = h.answer()
    assert server.value().count(b"GET /r") == 1
    backend.dataReceived(FRESH)
    assert all(c.value().endswith(b"\r\n\r\nhello") for c in clients)
    results = [head(c.value())[1][b"x-cache"][0] for c in clients]
    assert results.count(b"MISS") == 1 and results.count(b"HIT") == 49
    assert h.servers[0].total == 1 and h.service.cache.waiting() == 0


def test_collapsed_requests_each_go_to_the_backend_when_nothing_was_stored():
    h = cached()
    clients = [ask(h)[1] for _ in range(3)]
    assert h.connects() == 1
    backend, _ = h.answer()
    private = b"HTTP/1.1 200 OK\r\nCache-Control: private, max-age=60\r\nContent-Length: 1\r\n\r\nx"
    backend.dataReceived(private)
    assert h.connects() == 3  # woken by the head: the others went on their own
    for i in (1, 2):
        other, _ = h.answer(i)
        other.dataReceived(private)
    assert all(c.value().endswith(b"\r\n\r\nx") for c in clients)
    assert h.servers[0].total == 3 and len(h.service.cache) == 0


def test_collapsed_wait_is_bounded_by_the_backend_timeout():
    h = cached(backendTimeout=4.0)
    ask(h)
    _, waiting = ask(h)
    assert h.connects() == 1
    h.reactor.advance(4.0)
    # The leader timed out (504) and the waiter went on its own.
    assert h.connects() == 2


def test_a_waiter_whose_client_leaves_stops_waiting():
    h = cached()
    ask(h)
    frontend, _ = ask(h)
    assert h.service.cache.waiting() == 1
    frontend.connectionLost(None)
    assert h.service.cache.waiting() == 0


def test_large_responses_stream_through_uncached():
    h = cached(cacheConfig=CacheConfig(max_size=4 * 1024 * 1024, max_object=1024 * 1024))
    _, client = ask(h)
    backend, server = h.answer()
    size = 2 * 1024 * 1024
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    for _ in range(size // len(piece)):
        backend.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
    assert h.service.cache.size == 0  # nothing kept while it streams
    backend.dataReceived(b"0\r\n\r\n")
    assert client.value().count(piece) == size // len(piece)
    assert len(h.service.cache) == 0
    # Known too large from its Content-Length: not even begun.
    _, again = ask(h)
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: %d\r\n\r\n" % size)
    assert again.value().count(b"X-Cache: MISS") == 1


def test_not_stored_without_freshness_nor_for_post_nor_authorization():
    h = cached()
    ask(h, b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, _ = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    _, client = ask(h, b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert b"X-Cache: MISS" in client.value()
    _, client = ask(h, b"POST /plain HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert b"X-Cache: BYPASS" in client.value()
    ask(h, b"GET /fresh HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(FRESH)
    _, client = ask(h, b"GET /fresh HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\n\r\n")
    backend.dataReceived(FRESH)
    assert b"X-Cache: BYPASS" in client.value()
    _, client = ask(h, b"GET /fresh?new HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(FRESH)
    assert b"X-Cache: MISS" in client.value()
    assert h.servers[0].total == 6


def test_an_unsafe_method_invalidates_the_target():
    h = cached()
    ask(h)
    backend, _ = h.answer()
    backend.dataReceived(FRESH)
    assert len(h.service.cache) == 1
    ask(h, b"DELETE /r HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert len(h.service.cache) == 0


def test_only_if_cached_without_a_stored_response_is_504():
    h = cached()
    _, client = ask(h, b"GET /r HTTP/1.1\r\nHost: a\r\nCache-Control: only-if-cached\r\n\r\n")
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout" and h.connects() == 0


def test_a_service_without_cache_adds_nothing():
    h = Harness(servers=1)
    _, client = ask(h)
    backend, _ = h.answer()
    backend.dataReceived(FRESH + b"")
    assert b"X-Cache" not in client.value() and h.service.cache is None


def test_reload_keeps_the_store_and_applies_new_bounds():
    h = cached()
    ask(h)
    backend, _ = h.answer()
    backend.dataReceived(FRESH)
    cache = h.service.cache
    h.service.update(cacheConfig=CacheConfig(max_size=1024 * 1024, max_object=2))
    assert h.service.cache is cache and len(cache) == 0
    h.service.update(cacheConfig=None)
    assert h.service.cache is None


def test_a_waiter_goes_on_when_a_reload_removes_the_cache():
    h = cached()
    ask(h)
    _, waiting = ask(h)
    cache = h.service.cache
    h.service.update(cacheConfig=None)
    backend, _ = h.answer(0)
    backend.dataReceived(FRESH)
    assert h.connects() == 2  # woken by the first's end, then on its own
    other, _ = h.answer(1)
    other.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert waiting.value().endswith(b"\r\n\r\nx") and cache.waiting() == 0


def test_a_client_certificate_counts_as_an_authorization_for_storing():
    certified = requestPolicy(b"GET", [], False, certified=True)
    assert (certified.lookup, certified.store, certified.authorized) == (True, True, True)
    vary = [(b"Vary", b"Accept-Encoding, X-Client-Cert-Subject")]
    assert not storable(200, cacheControl([(b"Cache-Control", b"public, max-age=60")]), vary, {}, False, 0.0)


def test_responses_to_a_certified_client_are_stored_only_when_shared():
    """
    A verified client certificate is an authorization: what the backend
    answered that client is kept only when it says it may be shared, and
    never when it varies on the certificate (which the client's request
    does not carry).  Shared answers serve certified clients too.
    """
    import trustme
    from cryptography import x509
    from twisted.internet.address import IPv4Address

    from tests.test_http_frontend import TLSTransport

    alice = x509.load_pem_x509_certificate(
        trustme.CA().issue_cert("alice@example.com", common_name="alice").cert_chain_pems[0].bytes())
    h = cached(clientCerts=True)

    def askAsAlice(path: bytes):
        address = IPv4Address("TCP", "10.1.2.3", 5555)
        frontend = h.factory.buildProtocol(address)
        client = TLSTransport(alice, peerAddress=address)
        frontend.makeConnection(client)
        frontend.handshakeCompleted()
        frontend.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        return client

    askAsAlice(b"/mine")
    backend, _ = h.answer()
    backend.dataReceived(FRESH)
    askAsAlice(b"/varies")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nVary: X-Client-Cert-Subject\r\n"
                         b"Content-Length: 1\r\n\r\nx")
    assert len(h.service.cache) == 0
    askAsAlice(b"/shared")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=60\r\nContent-Length: 1\r\n\r\nx")
    assert len(h.service.cache) == 1
    assert b"X-Cache: HIT" in askAsAlice(b"/shared").value()
    assert h.servers[0].total == 3
