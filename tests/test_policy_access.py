"""
C{allow} and C{deny} (L{txlb.policy.access}), and the config keys of
traffic admission (L{txlb.config._admission}): networks of both families,
deny before allow, the config's problems with their key paths and lines,
and refusals at a TCP service's and a UDP service's accept, before any
backend is touched.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from txlb.config import ConfigError, parse
from txlb.observe.metrics import Metrics
from txlb.policy.access import CACHE_SIZE, AccessList, NetworkSet, clientAddress, parseNetwork
from txlb.policy.ratelimit import ConnectionLimits, parseRate
from txlb.tap import summary

from tests.test_reload import Running
from tests.test_tcp import Harness as TCPHarness
from tests.test_udp import Harness as UDPHarness


# Networks.


def test_networks_and_single_addresses():
    assert str(parseNetwork("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parseNetwork("192.0.2.7")) == "192.0.2.7/32"
    assert str(parseNetwork("2001:db8::/32")) == "2001:db8::/32"
    assert str(parseNetwork("::1")) == "::1/128"


@pytest.mark.parametrize("text, message", [
    ("10.1.2.3/8", "did you mean '10.0.0.0/8'?"),
    ("10.0.0.0/33", "is not a network"),
    ("example.com", "is not a network"),
    ("2001:db8::1/32", "did you mean '2001:db8::/32'?"),
    ("", "is not a network"),
])
def test_bad_networks(text, message):
    with pytest.raises(ValueError) as info:
        parseNetwork(text)
    assert message in str(info.value)


def test_a_network_set_matches_as_ipaddress_does():
    """Against ipaddress's own membership test, on random networks and addresses of both families."""
    rng = random.Random(19)
    nets = []
    for _ in range(60):
        if rng.random() < 0.5:
            n = rng.randrange(0, 33)
            nets.append(ipaddress.ip_network((rng.getrandbits(32) >> (32 - n) << (32 - n) if n else 0, n)))
        else:
            n = rng.randrange(0, 129)
            nets.append(ipaddress.ip_network((rng.getrandbits(128) >> (128 - n) << (128 - n) if n else 0, n)))
    matcher = NetworkSet(nets)
    probes = [ipaddress.ip_address(rng.getrandbits(32)) for _ in range(500)]
    probes += [ipaddress.ip_address(rng.getrandbits(128)) for _ in range(500)]
    probes += [net.network_address for net in nets] + [net.broadcast_address for net in nets]
    for address in probes:
        assert matcher.contains(address) == any(address in net for net in nets), address


def test_client_addresses():
    assert clientAddress("::ffff:192.0.2.7") == ipaddress.ip_address("192.0.2.7")
    assert int(clientAddress("fe80::1%eth0")) == int(ipaddress.ip_address("fe80::1"))
    assert AccessList(["fe80::/10"]).allows("fe80::1%eth0")
    assert clientAddress("/run/txlb.sock") is None


# Allow and deny.


def test_deny_is_checked_before_allow():
    access = AccessList(["10.0.0.0/8", "192.0.2.7"], ["10.9.0.0/16"])
    assert access.allows("10.1.2.3")
    assert not access.allows("10.9.1.1")
    assert access.allows("192.0.2.7")
    assert not access.allows("192.0.2.8")
    assert not access.allows("2001:db8::1")


def test_without_allow_everyone_not_denied_comes_in():
    access = AccessList(None, ["2001:db8::/32", "127.0.0.3"])
    assert access.allows("127.0.0.2")
    assert not access.allows("127.0.0.3")
    assert not access.allows("2001:db8:1::5")
    assert access.allows("2001:db9::1")
    assert not access.allows("::ffff:127.0.0.3")  # a dual-stack socket's view of 127.0.0.3


def test_a_client_that_is_no_address_is_in_no_network():
    assert AccessList(None, ["10.0.0.0/8"]).allows("unix")
    assert not AccessList(["10.0.0.0/8"]).allows("unix")


def test_answers_are_cached_and_the_cache_is_bounded():
    access = AccessList(["10.0.0.0/8"])
    for i in range(CACHE_SIZE * 2 + 10):
        access.allows(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}")
    assert len(access._cache) <= CACHE_SIZE
    assert access.allows("10.0.0.1") and not access.allows("11.0.0.1")


# The config.


POOL = '[pools.p]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'


def service(protocol: str, extra: str) -> str:
    listen = "udp:5353" if protocol == "udp" else "tcp:8080"
    return (f'\n[[services]]\nname = "s"\nprotocol = "{protocol}"\nlisten = "{listen}"\npool = "p"\n'
            f'{extra}')


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(text, "t.toml")
    return [(p.line, p.path, p.message) for p in info.value.problems]


def test_the_config_reads_allow_deny_and_rate_limit():
    config = parse(POOL + service("http", 'allow = ["10.0.0.0/8", "::1"]\ndeny = "10.9.0.0/16"\n'
                                          'rate_limit = { rate = "100/s", burst = 200, key = "header:X-Api-Key" }\n'
                                          '[[services.routes]]\npath_prefix = "/a"\npool = "p"\n'
                                          'rate_limit = { rate = "5/m" }\n'))
    [svc] = config.services
    assert svc.access.allow == ("10.0.0.0/8", "::1/128") and svc.access.deny == ("10.9.0.0/16",)
    assert (svc.rate_limit.rate.perSecond, svc.rate_limit.burst, svc.rate_limit.key, svc.rate_limit.store) == (
        100.0, 200, "header:X-Api-Key", "memory")
    assert svc.routes[0].rate_limit.burst == 5  # one unit's worth by default
    assert svc.routes[0].access is None
    lines = summary(config)
    assert "  access: deny 10.9.0.0/16; allow only 10.0.0.0/8, ::1/128" in lines
    assert "  rate_limit: 100/s, burst 200, by header:X-Api-Key, per process (memory)" in lines
    assert "  routes[0] rate_limit: 5/m, burst 5, by ip, per process (memory)" in lines


def test_tcp_limits_and_udp_access():
    config = parse(POOL + service("tcp", 'allow = "127.0.0.0/8"\n'
                                         'limits = { max_connections_per_client = 3, connection_rate = "10/s" }\n'))
    [svc] = config.services
    assert svc.limits.max_connections_per_client == 3 and svc.limits.connection_rate.perSecond == 10.0
    assert "  at most 3 connections per client" in summary(config)
    [udp] = parse(POOL + service("udp", 'deny = ["10.0.0.0/8"]\n')).services
    assert udp.access.deny == ("10.0.0.0/8",) and udp.access.allow is None


@pytest.mark.parametrize("protocol, extra, expected", [
    ("http", 'allow = ["10.0.0.0/8", "10.1.2.3/8"]\n',
     [(9, "services[0].allow[1]", "'10.1.2.3/8' has bits set past its prefix length: did you mean '10.0.0.0/8'?")]),
    ("http", 'deny = "nowhere"\n',
     [(9, "services[0].deny", "'nowhere' is not a network (write it like \"10.0.0.0/8\", \"2001:db8::/32\" "
                              "or a single address)")]),
    ("http", 'allow = []\n',
     [(9, "services[0].allow", 'must be a network or a non-empty array of them, like ["10.0.0.0/8", "192.0.2.7"]')]),
    ("http", 'rate_limit = { rate = "100/d" }\n',
     [(9, "services[0].rate_limit.rate", "'100/d' is not a rate (write it like \"100/s\", \"600/m\" or \"10/h\")")]),
    ("http", 'rate_limit = { rate = 100 }\n',
     [(9, "services[0].rate_limit.rate", 'must be a string like "100/s", not an integer')]),
    ("http", 'rate_limit = { rate = "1/s", key = "query:k" }\n',
     [(9, "services[0].rate_limit.key", "'query:k' is not a key (\"ip\", \"header:NAME\" or \"cookie:NAME\")")]),
    ("http", 'rate_limit = { rate = "1/s", burst = 0 }\n',
     [(9, "services[0].rate_limit.burst", "must be between 1 and 1000000000, not 0")]),
    ("http", 'rate_limit = { rate = "1/s", store = "redis" }\n',
     [(9, "services[0].rate_limit.store", 'is "redis", but [sessions] has no redis address: add '
                                          '[sessions] redis = "tcp:host=127.0.0.1:port=6379"')]),
    ("http", 'rate_limit = { rate = "1/s", timeout = "10ms" }\n',
     [(9, "services[0].rate_limit.timeout", 'is how long to wait for Redis: it applies to store = "redis" only')]),
    ("http", 'rate_limit = { rate = "1/s", brust = 3 }\n',
     [(9, "services[0].rate_limit.brust", "unknown key (did you mean 'burst'?)")]),
    ("http", 'limits = { max_connections_per_client = 3 }\n',
     [(9, "services[0].limits.max_connections_per_client", 'applies to TCP services only (protocol = "tcp")')]),
    ("tcp", 'rate_limit = { rate = "1/s" }\n',
     [(9, "services[0].rate_limit", 'applies to HTTP services only (protocol = "http")')]),
    ("tcp", 'limits = { connection_rate = "fast" }\n',
     [(9, "services[0].limits.connection_rate", "'fast' is not a rate (write it like \"100/s\", \"600/m\" or "
                                                "\"10/h\")")]),
    ("tcp", 'limits = { max_body = "1MiB" }\n',
     [(9, "services[0].limits.max_body", 'applies to HTTP services; a TCP service has '
                                         '"max_connections_per_client" and "connection_rate"')]),
    ("udp", 'rate_limit = { rate = "1/s" }\n',
     [(9, "services[0].rate_limit", 'applies to HTTP services only (protocol = "http")')]),
])
def test_config_problems_name_the_key_and_line(protocol, extra, expected):
    assert problems(POOL + service(protocol, extra)) == expected


def test_a_route_limit_in_redis_needs_the_sessions_address_too():
    text = POOL + service("http", '[[services.routes]]\npath_prefix = "/a"\npool = "p"\n'
                                  'rate_limit = { rate = "1/s", store = "redis", timeout = "2s" }\n')
    assert problems(text) == [
        (12, "services[0].routes[0].rate_limit.timeout",
         "must be at most 1s: every request waits this long when Redis stalls"),
        (12, "services[0].routes[0].rate_limit.store", 'is "redis", but [sessions] has no redis address: add '
                                                       '[sessions] redis = "tcp:host=127.0.0.1:port=6379"'),
    ]
    fixed = text.replace('"2s"', '"20ms"') + '[sessions]\nredis = "tcp:host=127.0.0.1:port=6379"\n'
    [svc] = parse(fixed).services
    assert svc.routes[0].rate_limit.timeout == 0.02


# TCP: refused at accept, before any server is picked.


def tcpHarness(**limits):
    h = TCPHarness()
    h.factory.metrics = Metrics({"p": h.pool}, h.reactor)
    return h


def test_a_denied_tcp_client_is_closed_at_accept(events):
    h = tcpHarness()
    h.factory.access = AccessList(["10.0.0.0/8"])
    frontend, client = h.accept("192.0.2.1")
    assert client.disconnecting and not h.reactor.tcpClients
    assert h.servers[0].active == h.servers[1].active == 0
    frontend.connectionLost(Failure(ConnectionDone()))
    [event] = [e for e in events if e.get("event") == "connection"]
    assert event["refused"] == "deny" and event["selectedServer"] is None
    assert h.factory.metrics.refusals == {("svc", "deny"): 1}
    allowed, transport = h.accept("10.1.1.1")
    assert not transport.disconnecting and len(h.reactor.tcpClients) == 1


def test_max_connections_per_client_counts_open_connections():
    h = tcpHarness()
    h.factory.connectionLimits = ConnectionLimits(h.reactor, maxPerClient=2)
    (a, _), (b, _) = h.accept("10.0.0.1"), h.accept("10.0.0.1")
    c, third = h.accept("10.0.0.1")
    assert third.disconnecting and c.refused == "max_connections_per_client"
    other, otherTransport = h.accept("10.0.0.2")
    assert not otherTransport.disconnecting
    c.connectionLost(Failure(ConnectionDone()))
    assert h.factory.perClient == {"10.0.0.1": 2, "10.0.0.2": 1}
    a.connectionLost(Failure(ConnectionDone()))
    assert h.factory.perClient == {"10.0.0.1": 1, "10.0.0.2": 1}
    d, fourth = h.accept("10.0.0.1")
    assert not fourth.disconnecting
    for f in (b, d, other):
        f.connectionLost(Failure(ConnectionDone()))
    assert h.factory.perClient == {}
    assert h.factory.metrics.refusals == {("svc", "max_connections_per_client"): 1}


def test_connection_rate_per_client():
    h = tcpHarness()
    h.factory.connectionLimits = ConnectionLimits(h.reactor, rate=parseRate("2/s"))
    results = [h.accept("10.0.0.1")[1].disconnecting for _ in range(5)]
    assert results == [False, False, True, True, True]
    assert not h.accept("10.0.0.2")[1].disconnecting
    h.reactor.advance(0.5)
    assert not h.accept("10.0.0.1")[1].disconnecting
    assert h.factory.metrics.refusals == {("svc", "connection_rate"): 3}


# UDP: a datagram from a refused client starts no flow.


def test_a_denied_udp_client_starts_no_flow():
    h = UDPHarness(metrics=True)
    h.balancer.access = AccessList(None, ["192.0.2.0/24"])
    h.send(b"q", ("192.0.2.1", 4000))
    h.send(b"q", ("192.0.2.1", 4000))
    assert h.sockets == [] and not h.balancer.open
    h.send(b"q", ("198.51.100.1", 4000))
    assert len(h.sockets) == 1
    assert h.metrics.refusals == {("dns", "deny"): 2}


# Reloads.


TCP = """
[pools.db]
servers = [{ name = "db-1", address = "127.0.0.1:9001" }]

[[services]]
name = "db"
protocol = "tcp"
listen = "tcp:6432:interface=127.0.0.1"
pool = "db"
"""


def test_a_reload_applies_a_tcp_services_rules_to_new_connections(tmp_path):
    running = Running(tmp_path, TCP + 'deny = ["127.0.0.5"]\nlimits = { connection_rate = "1/m" }\n')

    def connect(port: int):
        address = IPv4Address("TCP", "127.0.0.5", 4000)
        protocol = running.reactor.listening[port].buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    running.connect = connect
    try:
        factory = running.service.balancers["db"].factory
        _, refused = running.connect(6432)
        assert refused.disconnecting
        limits = factory.connectionLimits
        result = running.reload(TCP + 'deny = ["127.0.0.9"]\nlimits = { connection_rate = "1/m" }\n')
        assert result.ok and "service db: access changed" in result.changes
        assert factory.connectionLimits is limits  # unchanged: its buckets are kept
        _, first = running.connect(6432)
        _, second = running.connect(6432)
        assert not first.disconnecting and second.disconnecting  # one a minute
        result = running.reload(TCP)
        assert result.ok and factory.access is None and factory.connectionLimits is None
        _, third = running.connect(6432)
        assert not third.disconnecting
    finally:
        running.service.stopService()
