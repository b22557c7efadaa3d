"""
Sticky sessions: the rules of L{txlb.balance.sticky} on their own, then the HTTP
and TCP proxies using them on a memory reactor, time on a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.balance.sessions import MemoryStore
from txlb.balance.sticky import CONNECT_FAILED, FULL, NOT_IN_POOL, Sticky, storeKey, usable
from txlb.config import StickyConfig
from txlb.interfaces import ISessionStore

from tests import test_http_frontend as httpHarness
from tests import test_tcp as tcpHarness

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def kinds(events, kind):
    return [e for e in events if e.get("event") == kind]


def pool(n=3, **kw):
    return Pool("p", "round_robin", RoundRobin(), [Server(f"s{i}", f"tcp:host=h{i}:port=1") for i in range(n)],
                Clock(), **kw)


# The rules.


def test_usable_says_why_a_pinned_server_is_not():
    p = pool(maxConnections=1)
    s0, s1, s2 = (p.server(n) for n in ("s0", "s1", "s2"))
    assert usable(p, "s0") == (s0, "")
    assert usable(p, "s9") == (None, NOT_IN_POOL)
    assert usable(p, "s0", [s0]) == (None, CONNECT_FAILED)
    p.setState(s1, ServerState.DOWN)
    assert usable(p, "s1") == (None, "down")
    p.drain(s2)
    assert usable(p, "s2") == (None, "drained")
    s0.active = 1
    assert usable(p, "s0") == (None, FULL)


def test_choose_counts_the_pinned_server_like_a_pick():
    p = pool()
    sticky = Sticky("web", StickyConfig("cookie"))
    affinity = sticky.affinity("1.2.3.4", [(b"Cookie", b"a=1; LB_SERVER=s2; b=2")])
    decision = sticky.choose(p, affinity)
    assert (decision.server.name, decision.reason) == ("s2", "sticky cookie")
    assert (p.server("s2").active, p.server("s2").total) == (1, 1)
    p.release(decision.server)
    assert p.server("s2").active == 0


@pytest.mark.parametrize("value", [
    b"", b"server-99", b"x" * 5000, b"../../etc/passwd", b"/s0", b"s0/..", b"%2e%2e", b"\"s0", b"s0 s1",
    "\u00e9t\u00e9".encode(), b"\x01\x7f\xff",
])
def test_a_cookie_naming_no_server_is_ignored(value):
    p = pool()
    sticky = Sticky("web", StickyConfig("cookie"))
    affinity = sticky.affinity("1.2.3.4", [(b"cookie", b"LB_SERVER=" + value)])
    assert sticky.choose(p, affinity) is None
    assert affinity.record and all(s.active == 0 for s in p)


def test_the_cookie_line():
    assert Sticky("web", StickyConfig("cookie")).cookieLine("s1") == b"Set-Cookie: LB_SERVER=s1; Path=/; HttpOnly"
    secure = Sticky("web", StickyConfig("cookie", cookie="SRV"), secure=True)
    assert secure.cookieLine("s1") == b"Set-Cookie: SRV=s1; Path=/; HttpOnly; Secure"


def test_store_keys_are_namespaced_and_bounded():
    assert storeKey("txlb:sticky:web:", "abc") == "txlb:sticky:web:abc"
    long = storeKey("txlb:sticky:web:", "a" * 5000)
    assert long.startswith("txlb:sticky:web:sha256:") and len(long) < 100
    assert storeKey("p:", "a b") != "p:a b"


def test_sticky_needs_a_store_unless_cookie():
    with pytest.raises(ValueError):
        Sticky("web", StickyConfig("ip"))


def test_a_down_pin_is_moved_and_the_move_logged(events):
    p = pool()
    store = MemoryStore(Clock(), 60)
    sticky = Sticky("web", StickyConfig("ip"), store)
    store.set("txlb:sticky:web:1.2.3.4", "s1")
    p.setState(p.server("s1"), ServerState.DOWN)
    affinity = sticky.affinity("1.2.3.4")
    assert affinity.previous == "s1"
    assert sticky.choose(p, affinity) is None
    decision = p.pick(None)
    assert sticky.answered(affinity, decision.server, "1.2.3.4") == ()
    assert store.get("txlb:sticky:web:1.2.3.4") == decision.server.name
    [moved] = kinds(events, "sticky_reassigned")
    assert (moved["client"], moved["previousServer"], moved["selectedServer"], moved["reason"]) == (
        "1.2.3.4", "s1", decision.server.name, "down")


# HTTP, on the proxy's memory-reactor harness.


def http(mode="cookie", servers=3, store=None, **settings):
    config = {"cookie": StickyConfig("cookie"), "ip": StickyConfig("ip"),
              "key": StickyConfig("key", key="cookie:SESSIONID"),
              "header": StickyConfig("key", key="header:X-Session")}[mode]
    if store is None and mode != "cookie":
        store = MemoryStore(Clock(), 60)
    h = httpHarness.Harness(servers=servers, **settings)
    h.service.sticky = Sticky("web", config, store, secure=h.service.proto == b"https")
    return h


def exchange(h, headers=b"", client="10.1.2.3", answer=OK):
    """One request on a new client connection: (server name, response head fields)."""
    frontend, transport = h.accept(client)
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    ex = frontend.exchanges[0]
    if ex.conn is None:
        h.answer()
    ex.conn.dataReceived(answer)
    status, fields = httpHarness.head(transport.value())
    assert status == b"HTTP/1.1 200 OK"
    return ex.server.name, fields


def test_cookie_mode_pins_with_a_cookie_then_follows_it(events):
    h = http()
    first, fields = exchange(h)
    assert fields[b"set-cookie"] == [b"LB_SERVER=" + first.encode() + b"; Path=/; HttpOnly"]
    cookie = b"Cookie: LB_SERVER=" + first.encode() + b"\r\n"
    for _ in range(15):
        server, fields = exchange(h, cookie)
        assert server == first and b"set-cookie" not in fields
    spread = {exchange(h)[0] for _ in range(3)}
    assert spread == {"s0", "s1", "s2"}
    assert not kinds(events, "sticky_reassigned")
    assert all(s.active == 0 for s in h.servers)


@pytest.mark.parametrize("value", [b"server-99", b"x" * 5000, b"../../a/b?c#d", b"", b"\xff\xfe;;=="])
def test_forged_cookies_get_normal_answers_and_a_real_cookie(value):
    h = http()
    server, fields = exchange(h, b"Cookie: LB_SERVER=" + value + b"\r\n")
    assert fields[b"set-cookie"] == [b"LB_SERVER=" + server.encode() + b"; Path=/; HttpOnly"]


def test_cookie_of_a_failed_server_moves_the_client_once(events):
    h = http()
    h.pool.setState(h.servers[1], ServerState.DOWN)
    server, fields = exchange(h, b"Cookie: LB_SERVER=s1\r\n", client="10.9.9.9")
    assert server != "s1"
    assert fields[b"set-cookie"] == [b"LB_SERVER=" + server.encode() + b"; Path=/; HttpOnly"]
    [moved] = kinds(events, "sticky_reassigned")
    assert (moved["client"], moved["previousServer"], moved["selectedServer"], moved["reason"]) == (
        "10.9.9.9", "s1", server, "down")
    for _ in range(5):
        assert exchange(h, b"Cookie: LB_SERVER=" + server.encode() + b"\r\n")[0] == server
    assert len(kinds(events, "sticky_reassigned")) == 1


@pytest.mark.parametrize("how, reason", [("eject", "ejected"), ("drain", "draining"), ("remove", NOT_IN_POOL)])
def test_ejected_draining_and_removed_pins_move(events, how, reason):
    h = http()
    s1 = h.servers[1]
    if how == "eject":
        h.pool.passive = (1, 30.0)
        h.pool.reportResult(s1, False, "HTTP 500")
    elif how == "drain":
        s1.active += 1  # something in flight: draining, not drained
        h.pool.drain(s1)
    else:
        h.pool.remove(s1)
    server, fields = exchange(h, b"Cookie: LB_SERVER=s1\r\n")
    assert server != "s1" and b"set-cookie" in fields
    assert kinds(events, "sticky_reassigned")[0]["reason"] == reason


def test_secure_cookie_over_tls():
    h = http(proto=b"https")
    _, fields = exchange(h)
    assert fields[b"set-cookie"][0].endswith(b"; Path=/; HttpOnly; Secure")


def test_a_pinned_server_that_refuses_is_replaced(events):
    h = http()
    frontend, transport = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: LB_SERVER=s2\r\n\r\n")
    assert h.reactor.tcpClients[-1][0] == "127.0.0.3"
    h.refuse()
    h.answer()
    ex = frontend.exchanges[0]
    ex.conn.dataReceived(OK)
    _, fields = httpHarness.head(transport.value())
    assert ex.server.name != "s2"
    assert fields[b"set-cookie"] == [b"LB_SERVER=" + ex.server.name.encode() + b"; Path=/; HttpOnly"]
    assert kinds(events, "sticky_reassigned")[0]["reason"] == CONNECT_FAILED


def test_a_full_pinned_server_lends_the_request_without_moving_the_pin():
    h = http()
    h.pool.maxConnections = 1
    h.servers[0].active = 1
    h.pool._full.add(h.servers[0])
    server, fields = exchange(h, b"Cookie: LB_SERVER=s0\r\n")
    assert server != "s0" and b"set-cookie" not in fields


def test_no_sticky_no_affinity():
    h = httpHarness.Harness()
    frontend, _ = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert frontend.exchanges[0].affinity is None


def test_ip_mode_keeps_each_address_on_one_server():
    h = http("ip")
    first = {f"10.0.0.{i}": exchange(h, client=f"10.0.0.{i}")[0] for i in range(6)}
    assert len(set(first.values())) == 3
    for _ in range(3):
        for client, server in first.items():
            name, fields = exchange(h, client=client)
            assert name == server and b"set-cookie" not in fields


def test_key_mode_learns_the_session_the_application_hands_out():
    h = http("key")
    server, _ = exchange(h, answer=b"HTTP/1.1 200 OK\r\nSet-Cookie: SESSIONID=abc123; Path=/\r\n"
                                   b"Content-Length: 2\r\n\r\nok")
    for _ in range(5):
        assert exchange(h, b"Cookie: theme=dark; SESSIONID=abc123\r\n")[0] == server
    # An id the balancer has not seen is pinned where it first lands.
    other = exchange(h, b"Cookie: SESSIONID=zzz\r\n")[0]
    assert all(exchange(h, b"Cookie: SESSIONID=zzz\r\n")[0] == other for _ in range(4))
    # Requests without a session are spread.
    assert {exchange(h)[0] for _ in range(3)} == {"s0", "s1", "s2"}


def test_key_mode_by_header():
    h = http("header")
    server, _ = exchange(h, answer=b"HTTP/1.1 200 OK\r\nX-Session: u-7\r\nContent-Length: 2\r\n\r\nok")
    assert all(exchange(h, b"X-Session: u-7\r\n")[0] == server for _ in range(5))


@implementer(ISessionStore)
class SlowStore:
    """A store whose lookups the test answers."""

    synchronous = False
    ttl = 60

    def __init__(self):
        self.lookups: list[tuple[str, Deferred]] = []
        self.pins: dict[str, str] = {}

    def get(self, key):
        d = Deferred()
        self.lookups.append((key, d))
        return d

    def set(self, key, server, replace=True):
        self.pins[key] = server

    def delete(self, key):
        self.pins.pop(key, None)


def test_an_asynchronous_lookup_dispatches_when_it_answers():
    store = SlowStore()
    h = http("header", store=store)
    frontend, transport = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nX-Session: u-1\r\nContent-Length: 4\r\n\r\nab")
    [(key, d)] = store.lookups
    assert key == "txlb:sticky:web:u-1"
    assert h.connects() == 0 and transport.producerState == "paused"
    frontend.dataReceived(b"cd")
    d.callback("s2")
    assert h.reactor.tcpClients[-1][0] == "127.0.0.3"
    backend, server = h.answer()
    assert server.value().endswith(b"\r\n\r\nabcd")
    backend.dataReceived(OK)
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert store.pins == {}  # followed, not re-pinned


def test_an_asynchronous_miss_pins_where_the_scheduler_sends_it():
    store = SlowStore()
    h = http("ip", store=store)
    frontend, transport = h.accept("10.7.7.7")
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    store.lookups[0][1].callback(None)
    backend, _ = h.answer()
    backend.dataReceived(OK)
    assert store.pins == {"txlb:sticky:web:10.7.7.7": "s0"}


def test_a_client_leaving_during_the_lookup_is_forgotten():
    store = SlowStore()
    h = http("ip", store=store)
    frontend, transport = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    frontend.connectionLost(None)
    store.lookups[0][1].callback("s1")
    assert h.connects() == 0 and all(s.active == 0 for s in h.servers)


# TCP, ip mode.


def test_tcp_ip_mode_sticks_and_moves_off_a_down_server(events):
    h = tcpHarness.Harness()
    store = MemoryStore(h.reactor, 60)
    h.factory.sticky = Sticky("db", StickyConfig("ip"), store)
    hosts = {}
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        h.accept(client)
        hosts[client] = h.pending()[0]
        h.answer()
    assert len(set(hosts.values())) == 3
    for client, host in hosts.items():
        h.accept(client)
        assert h.pending()[0] == host
        h.answer()
    h.pool.setState(h.servers[0], ServerState.DOWN)
    h.accept("10.0.0.1")
    moved = h.pending()[0]
    assert moved != "127.0.0.1"
    h.answer()
    h.accept("10.0.0.1")
    assert h.pending()[0] == moved
    [event] = kinds(events, "sticky_reassigned")
    assert (event["client"], event["previousServer"], event["reason"]) == ("10.0.0.1", "s0", "down")


def test_tcp_asynchronous_lookup():
    h = tcpHarness.Harness()
    store = SlowStore()
    h.factory.sticky = Sticky("db", StickyConfig("ip"), store)
    frontend, client = h.accept("10.0.0.5")
    assert not h.reactor.tcpClients and client.producerState == "paused"
    store.lookups[0][1].callback("s1")
    assert h.pending()[0] == "127.0.0.2"
    h.answer()
    assert client.producerState == "producing"
