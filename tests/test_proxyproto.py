"""
The PROXY protocol: the header parser, the writers, the reader in front of
a service's protocol (on StringTransport, with a Clock), the TCP
balancer's bytes ahead of the client's stream, and the config keys.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support import tcpPair
from txlb.balance.pool import Pool, Server
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import ConfigError, parse
from txlb.interfaces import IEarlyBytes
from txlb.net import splice
from txlb.net.endpoints import EndpointCache
from txlb.net.proxyproto import (
    V1_MAX,
    V2_MAX_BLOCK,
    V2_SIGNATURE,
    HeaderError,
    HeaderParser,
    ProxyAcceptor,
    ProxyHeader,
    clientAddress,
    headerV1,
    headerV2,
    networks,
    parseV1,
    trusts,
)
from txlb.tap import summary
from txlb.tcp import TCPBalancerFactory


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(block)) + block


def v2tcp4(src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=443, tlvs=b"") -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(0x21, 0x11, block + tlvs)


def feedAll(data: bytes, step: int = 0):
    """Feed C{data} whole (step 0) or C{step} bytes at a time; the first non-None result."""
    parser = HeaderParser()
    if not step:
        return parser.feed(data)
    for i in range(0, len(data), step):
        found = parser.feed(data[i:i + step])
        if found is not None:
            return found
    return None


# The parser.


@pytest.mark.parametrize("step", [0, 1, 3])
def test_v1_tcp4_whole_and_in_pieces(step):
    header, rest = feedAll(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nGET / HTTP/1.1\r\n", step)
    assert header == ProxyHeader(1, IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "198.51.100.1", 443))
    if step == 0:
        assert rest == b"GET / HTTP/1.1\r\n"


def test_v1_byte_at_a_time_keeps_what_follows_in_the_last_byte():
    parser = HeaderParser()
    data = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"
    for byte in data[:-1]:
        assert parser.feed(bytes([byte])) is None
    header, rest = parser.feed(b"\nxyz")
    assert header.source.host == "10.0.0.1" and rest == b"xyz"


def test_v1_tcp6_and_unknown():
    assert parseV1(b"PROXY TCP6 2001:DB8:0:0::7 ::1 1 2").source.host == "2001:db8::7"  # written short
    header = parseV1(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443")
    assert header.source == IPv6Address("TCP", "2001:db8::7", 40000)
    assert header.destination == IPv6Address("TCP", "2001:db8::1", 443)
    assert parseV1(b"PROXY UNKNOWN") == ProxyHeader(1)
    assert parseV1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2") == ProxyHeader(1)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000",            # a field missing
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443 9",      # one too many
    b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 443",      # IPv6 in TCP4
    b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 443",         # IPv4 in TCP6
    b"PROXY TCP4 192.0.2.300 198.51.100.1 40000 443",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 443",        # port out of range
    b"PROXY TCP4 192.0.2.7 198.51.100.1 040 443",          # leading zero
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443",
    b"PROXY TCP4  192.0.2.7 198.51.100.1 1 443",           # two spaces
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 443",
    b"PROXY tcp4 192.0.2.7 198.51.100.1 1 443",
])
def test_v1_malformed(line):
    with pytest.raises(HeaderError):
        feedAll(line + b"\r\n")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"G", b"\x16\x03\x01", b"PROXX", b"\r\n\r\n\x01"])
def test_not_a_header_is_refused_from_its_first_bytes(data):
    with pytest.raises(HeaderError):
        HeaderParser().feed(data)


def test_v1_longer_than_its_bound_is_refused():
    parser = HeaderParser()
    line = b"PROXY TCP4 " + b"1" * (V1_MAX - 11)
    with pytest.raises(HeaderError, match="longer than"):
        parser.feed(line)
    # The longest valid one (UNKNOWN with IPv6 fields at their widest) fits.
    longest = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == V1_MAX
    assert HeaderParser().feed(longest + b"x") == (ProxyHeader(1), b"x")


def test_v1_bare_lf_is_refused():
    with pytest.raises(HeaderError, match="CRLF"):
        HeaderParser().feed(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\n")


@pytest.mark.parametrize("step", [0, 1, 5])
def test_v2_tcp4_with_tlvs_skipped(step):
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x03abc"  # ALPN, NOOP
    header, rest = feedAll(v2tcp4(tlvs=tlvs) + b"after", step)
    assert header == ProxyHeader(2, IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "198.51.100.1", 443))
    if step == 0:
        assert rest == b"after"


def test_v2_byte_at_a_time_then_the_rest():
    parser = HeaderParser()
    data = v2tcp4()
    for byte in data[:-1]:
        assert parser.feed(bytes([byte])) is None
    header, rest = parser.feed(data[-1:] + b"more")
    assert header.source.host == "192.0.2.7" and rest == b"more"


def test_v2_tcp6():
    src, dst = socket.inet_pton(socket.AF_INET6, "2001:db8::7"), socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    header, rest = HeaderParser().feed(v2(0x21, 0x21, src + dst + struct.pack("!HH", 5, 6)))
    assert header == ProxyHeader(2, IPv6Address("TCP", "2001:db8::7", 5), IPv6Address("TCP", "2001:db8::1", 6))


def test_v2_local_unspec_and_unix_carry_no_address():
    assert HeaderParser().feed(v2(0x20, 0x00, b""))[0] == ProxyHeader(2)
    assert HeaderParser().feed(v2(0x20, 0x11, b"\x00" * 12))[0] == ProxyHeader(2)  # LOCAL: addresses ignored
    assert HeaderParser().feed(v2(0x21, 0x00, b""))[0] == ProxyHeader(2)
    assert HeaderParser().feed(v2(0x21, 0x31, b"\x00" * 216))[0] == ProxyHeader(2)


@pytest.mark.parametrize("data, message", [
    (v2(0x11, 0x11, b"\x00" * 12), "version 1"),
    (v2(0x22, 0x11, b"\x00" * 12), "command 2"),
    (v2(0x21, 0x41, b"\x00" * 12), "family"),
    (v2(0x21, 0x13, b"\x00" * 12), "family"),
    (v2(0x21, 0x11, b"\x00" * 8), "12 needed"),
    (v2(0x21, 0x21, b"\x00" * 12), "36 needed"),
])
def test_v2_malformed(data, message):
    with pytest.raises(HeaderError, match=message):
        HeaderParser().feed(data)


def test_v2_oversize_is_refused_before_it_arrives():
    parser = HeaderParser()
    with pytest.raises(HeaderError, match="more than"):
        parser.feed(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_BLOCK + 1))
    noop = V2_MAX_BLOCK - 12 - 3  # the largest that fits: addresses, then one NOOP TLV
    header, rest = HeaderParser().feed(v2tcp4(tlvs=b"\x04" + struct.pack("!H", noop) + b"\x00" * noop) + b"!")
    assert header.source.host == "192.0.2.7" and rest == b"!"


# The writers.


def test_headers_written():
    src, dst = IPv4Address("TCP", "192.0.2.7", 40000), IPv4Address("TCP", "198.51.100.1", 443)
    assert headerV1(src, dst) == b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
    assert headerV2(src, dst) == v2tcp4()
    six = IPv6Address("TCP", "2001:db8::7", 1), IPv6Address("TCP", "::1", 2)
    assert headerV1(*six) == b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n"
    unix = UNIXAddress(b"/run/x.sock"), UNIXAddress(b"/run/x.sock")
    assert headerV1(*unix) == b"PROXY UNKNOWN\r\n"
    assert headerV2(*unix) == v2(0x20, 0x00, b"")


ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
# As the socket module writes a peer's IPv6 address (and txlb the header's).
ipv6 = st.builds(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16, "big")), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@given(st.one_of(st.tuples(st.just(IPv4Address), ipv4, ipv4), st.tuples(st.just(IPv6Address), ipv6, ipv6)),
       ports, ports, st.sampled_from([headerV1, headerV2]), st.integers(1, 40), st.binary(max_size=20))
def test_what_is_written_is_read_back_in_any_pieces(addresses, sport, dport, writer, step, after):
    kind, s, d = addresses
    src, dst = kind("TCP", s, sport), kind("TCP", d, dport)
    data = writer(src, dst) + after
    parser = HeaderParser()
    found = None
    for i in range(0, len(data), step):
        found = parser.feed(data[i:i + step])
        if found is not None:
            break
    header, rest = found
    assert (header.source, header.destination) == (src, dst)
    assert rest + data[i + step:] == after


# Trusted sources.


def test_trusts():
    nets = networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.9"])
    assert trusts(nets, IPv4Address("TCP", "10.1.2.3", 1))
    assert trusts(nets, IPv4Address("TCP", "192.0.2.9", 1))
    assert not trusts(nets, IPv4Address("TCP", "192.0.2.10", 1))
    assert trusts(nets, IPv6Address("TCP", "2001:db8::5", 1))
    assert trusts(nets, IPv6Address("TCP", "::ffff:10.0.0.1", 1))  # IPv4 on an IPv6 socket
    assert not trusts(nets, IPv6Address("TCP", "::1", 1))
    assert trusts(nets, UNIXAddress(b"/run/x.sock"))  # no address to check: local
    assert trusts((), IPv4Address("TCP", "203.0.113.1", 1))


# The reader in front of a service's protocol.


class Recorder(Protocol):
    def __init__(self, addr) -> None:
        self.addr = addr
        self.data = b""
        self.peerAtStart = None

    def connectionMade(self) -> None:
        self.peerAtStart = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@implementer(IEarlyBytes)
class EarlyRecorder(Recorder):
    early = None
    madeAfterEarly = None

    def earlyBytes(self, data: bytes) -> None:
        self.early = data

    def connectionMade(self) -> None:
        super().connectionMade()
        self.madeAfterEarly = self.early


class Wrapped(Factory):
    def __init__(self, protocol=Recorder) -> None:
        self.built = []
        self.protocolClass = protocol

    def buildProtocol(self, addr):
        p = self.protocolClass(addr)
        p.factory = self
        self.built.append(p)
        return p


class Refusals:
    def __init__(self) -> None:
        self.counted = []

    def refused(self, service: str, reason: str) -> None:
        self.counted.append((service, reason))


BALANCER = IPv4Address("TCP", "10.9.9.9", 51000)


def accept(trusted=(), timeout=5.0, protocol=Recorder, peer=BALANCER):
    clock, metrics, wrapped = Clock(), Refusals(), Wrapped(protocol)
    acceptor = ProxyAcceptor(wrapped, "web", clock, trusted=networks(trusted), timeout=timeout, metrics=metrics)
    reader = acceptor.buildProtocol(peer)
    transport = None
    if reader is not None:
        transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.9.9.1", 8080))
        transport.protocol = reader
        reader.makeConnection(transport)
    return acceptor, reader, transport, clock, metrics, wrapped


def test_the_service_protocol_is_built_with_the_header_source_and_gets_the_transport(events):
    acceptor, reader, transport, clock, metrics, wrapped = accept(trusted=["10.0.0.0/8"])
    assert wrapped.built == []
    reader.dataReceived(b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 8080\r\nGET / HTTP/1.1\r\n")
    (inner,) = wrapped.built
    assert inner.addr == IPv4Address("TCP", "192.0.2.7", 40000)
    assert inner.transport is transport and transport.protocol is inner
    assert inner.peerAtStart == IPv4Address("TCP", "192.0.2.7", 40000)
    assert clientAddress(transport) == transport.getPeer() == IPv4Address("TCP", "192.0.2.7", 40000)
    assert transport.getHost() == IPv4Address("TCP", "10.9.9.1", 8080)
    assert inner.data == b"GET / HTTP/1.1\r\n"
    assert len(acceptor.deadlines) == 0 and metrics.counted == []
    clock.advance(10)  # the header timeout is off
    assert not transport.disconnecting and metrics.counted == []


def test_header_one_byte_at_a_time():
    acceptor, reader, transport, clock, metrics, wrapped = accept()
    data = v2tcp4() + b"x"
    for byte in data:
        transport.protocol.dataReceived(bytes([byte]))  # the service's protocol, once the header is read
    (inner,) = wrapped.built
    assert inner.addr.host == "192.0.2.7" and inner.data == b"x"


def test_local_header_keeps_the_socket_peer():
    acceptor, reader, transport, clock, metrics, wrapped = accept()
    reader.dataReceived(v2(0x20, 0x00, b""))
    (inner,) = wrapped.built
    assert inner.addr == BALANCER and transport.getPeer() == BALANCER and inner.data == b""


def test_early_bytes_go_before_the_connection_to_a_protocol_that_takes_them():
    acceptor, reader, transport, clock, metrics, wrapped = accept(protocol=EarlyRecorder)
    reader.dataReceived(b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 8080\r\nhello")
    (inner,) = wrapped.built
    assert inner.madeAfterEarly == b"hello" and inner.data == b""


def test_untrusted_source_is_closed_counted_and_logged(events):
    acceptor, reader, transport, clock, metrics, wrapped = accept(trusted=["10.0.0.0/8"],
                                                                  peer=IPv4Address("TCP", "192.0.2.1", 5))
    assert reader is None  # the port closes the socket without reading
    assert metrics.counted == [("web", "proxy_header")]
    (event,) = [e for e in events if e.get("event") == "proxy_refused"]
    assert event["service"] == "web" and event["peer"] == "192.0.2.1" and "from" in event["reason"]


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4\r\n", v2(0x21, 0x11, b"\x00")])
def test_malformed_header_is_closed_and_counted(data, events):
    acceptor, reader, transport, clock, metrics, wrapped = accept()
    reader.dataReceived(data)
    assert transport.disconnecting and wrapped.built == []
    assert metrics.counted == [("web", "proxy_header")]
    assert len(acceptor.deadlines) == 0
    assert [e["event"] for e in events if e.get("event") == "proxy_refused"] == ["proxy_refused"]


def test_header_that_does_not_arrive_in_time_is_closed_and_counted():
    acceptor, reader, transport, clock, metrics, wrapped = accept(timeout=2.0)
    reader.dataReceived(b"PROXY TCP4 ")
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and wrapped.built == []
    assert metrics.counted == [("web", "proxy_header")]


def test_client_gone_before_its_header_is_not_counted():
    acceptor, reader, transport, clock, metrics, wrapped = accept()
    reader.dataReceived(b"PRO")
    reader.connectionLost(None)
    clock.advance(10)
    assert len(acceptor.deadlines) == 0 and metrics.counted == []


def test_acceptor_starts_and_stops_what_it_wraps():
    wrapped = Wrapped()
    acceptor = ProxyAcceptor(wrapped, "web", Clock())
    acceptor.doStart()
    assert wrapped.numPorts == 1
    acceptor.doStop()
    assert wrapped.numPorts == 0


# The TCP balancer: bytes ahead of the client's stream.


class Harness:
    def __init__(self, proxyProtocol=None) -> None:
        self.reactor = MemoryReactorClock()
        self.server = Server("s1", "tcp:host=127.0.0.1:port=9001")
        self.pool = Pool("p", "round_robin", RoundRobin(), [self.server], self.reactor)
        self.factory = TCPBalancerFactory("svc", self.pool, EndpointCache(self.reactor), self.reactor,
                                          proxyProtocol=proxyProtocol)
        self.acceptor = ProxyAcceptor(self.factory, "svc", self.reactor)

    def accept(self, data: bytes):
        reader = self.acceptor.buildProtocol(BALANCER)
        transport = StringTransport(peerAddress=BALANCER, hostAddress=IPv4Address("TCP", "10.9.9.1", 6432))
        reader.makeConnection(transport)
        reader.dataReceived(data)
        return transport.protocol, transport

    def answer(self):
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        backend.makeConnection(transport)
        return backend, transport


def test_frontend_takes_early_bytes():
    h = Harness()
    frontend, client = h.accept(b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 6432\r\nhello")
    assert verifyObject(IEarlyBytes, frontend)
    assert frontend.client == "192.0.2.7"
    backend, server = h.answer()
    assert server.value() == b"hello"
    frontend.dataReceived(b" world")
    assert server.value() == b"hello world"
    assert frontend.bytesIn == 11 and h.server.bytesIn == 11


@pytest.mark.parametrize("version, header", [
    ("v1", b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 6432\r\n"),
    ("v2", v2tcp4("192.0.2.7", "10.9.9.1", 40000, 6432)),
])
def test_proxy_header_out_names_the_client_learnt_from_the_header_in(version, header):
    h = Harness(version)
    frontend, client = h.accept(b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 6432\r\nhello")
    backend, server = h.answer()
    assert server.value() == header + b"hello"
    assert frontend.bytesIn == 5  # our header is not the client's


def test_proxy_header_out_without_a_header_in():
    reactor = MemoryReactorClock()
    pool = Pool("p", "round_robin", RoundRobin(), [Server("s1", "tcp:host=127.0.0.1:port=9001")], reactor)
    factory = TCPBalancerFactory("svc", pool, EndpointCache(reactor), reactor, proxyProtocol="v1")
    client = IPv4Address("TCP", "10.1.2.3", 5555)
    frontend = factory.buildProtocol(client)
    frontend.makeConnection(StringTransport(peerAddress=client, hostAddress=IPv4Address("TCP", "10.9.9.1", 6432)))
    host, port, f, timeout, bind = reactor.tcpClients[-1]
    transport = StringTransport()
    f.buildProtocol(None).makeConnection(transport)
    assert transport.value() == b"PROXY TCP4 10.1.2.3 10.9.9.1 5555 6432\r\n"


# Splicing: the first bytes go through the pipe ahead of the client's.


class Watching:
    def __init__(self) -> None:
        self.readers: set = set()

    def addReader(self, s) -> None:
        self.readers.add(s)

    def removeReader(self, s) -> None:
        self.readers.discard(s)


@pytest.mark.skipif(not splice.available, reason="no os.splice on this platform")
@pytest.mark.parametrize("size", [10, 300_000])
def test_splice_sends_the_first_bytes_before_the_client_stream(size):
    client, txlbClient = tcpPair()
    txlbServer, server = tcpPair()
    pool = splice.PipePool(size=4096)  # smaller than the first bytes: they go in several fills
    pair = splice.SplicePair(Watching(), txlbClient, txlbServer, lambda up, down: None, lambda error: None, pool=pool)
    first = bytes(range(256)) * (size // 256 + 1)
    pair.start(first)
    client.sendall(b"|from the client")
    server.setblocking(False)
    got = b""
    for _ in range(2000):
        if len(got) >= len(first) + 16:
            break
        ready, _, _ = select.select([pair.loop], [], [], 1.0)
        if ready:
            pair.loop.doRead()
        try:
            got += server.recv(1 << 20)
        except BlockingIOError:
            pass
    assert got == first + b"|from the client"
    for s in (client, server):
        s.close()
    pair.close(None)
    pool.clear()


# The config keys.


POOL = '[pools.api]\nservers = [{ name = "s1", address = "127.0.0.1:9001" }]\n'


def service(extra: str, protocol: str = "tcp", listen: str = "tcp:8080") -> str:
    return POOL + f'[[services]]\nname = "web"\nprotocol = "{protocol}"\nlisten = "{listen}"\npool = "api"\n{extra}'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, "txlb.toml")
    return info.value.lines()


def test_accept_proxy_forms():
    assert parse(service("accept_proxy = true\n")).services[0].accept_proxy.trusted == ()
    assert parse(service("accept_proxy = false\n")).services[0].accept_proxy is None
    accept = parse(service('accept_proxy = { from = ["10.0.0.0/8", "2001:db8::1"], timeout = "2s" }\n',
                           "http")).services[0].accept_proxy
    assert accept.trusted == ("10.0.0.0/8", "2001:db8::1") and accept.timeout == 2.0
    assert parse(service("accept_proxy = {}\n")).services[0].accept_proxy.timeout == 5.0


def test_accept_proxy_problems():
    assert problems(service('accept_proxy = { from = ["10.0.0.1/8", "nope"], timeout = "0" }\n')) == [
        "txlb.toml:8: services[0].accept_proxy.from[0]: '10.0.0.1/8' has host bits set: "
        "write 10.0.0.0/8 (or 10.0.0.1 for one address)",
        "txlb.toml:8: services[0].accept_proxy.from[1]: 'nope' is not an IP network like 10.0.0.0/8 "
        "or an address like 10.0.0.5",
        "txlb.toml:8: services[0].accept_proxy.timeout: must be longer than 0",
    ]
    assert "is empty" in problems(service("accept_proxy = { from = [] }\n"))[0]
    assert "must be true, false or a table" in problems(service('accept_proxy = "yes"\n'))[0]
    (line,) = problems(POOL + '[[services]]\nname = "d"\nprotocol = "udp"\nlisten = "udp:5353"\npool = "api"\n'
                       "accept_proxy = true\n")
    assert "services[0].accept_proxy: does not apply to UDP services" in line


def test_proxy_protocol_key():
    assert parse(service('proxy_protocol = "v1"\n')).services[0].proxy_protocol == "v1"
    assert parse(service("")).services[0].proxy_protocol is None
    assert problems(service('proxy_protocol = "v3"\n')) == [
        "txlb.toml:8: services[0].proxy_protocol: must be one of 'v1', 'v2', not 'v3'"]
    (line,) = problems(service('proxy_protocol = "v2"\n', "http"))
    assert "services[0].proxy_protocol: applies to TCP services only" in line


@pytest.mark.parametrize("listen", ["haproxy:tcp:8080", "HAPROXY:tcp:8080:interface=127.0.0.1"])
def test_the_haproxy_prefix_is_refused_pointing_to_accept_proxy(listen):
    (line,) = problems(service("", listen=listen))
    assert line.startswith("txlb.toml:6: services[0].listen: ")
    assert "haproxy: prefix is not supported" in line and "accept_proxy" in line
    assert repr(listen.partition(":")[2]) in line


def test_check_summary_shows_both():
    config = parse(service('accept_proxy = { from = ["10.0.0.0/8"] }\nproxy_protocol = "v2"\n'))
    assert summary(config)[:3] == [
        "service web (tcp) on tcp:8080 -> pool api",
        "  PROXY header (v1 or v2) read first from 10.0.0.0/8, within 5s",
        "  PROXY v2 header sent first to each backend connection",
    ]
    assert summary(parse(service("accept_proxy = true\n")))[1] == \
        "  PROXY header (v1 or v2) read first from any source, within 5s"


def test_one_timer_for_every_header_being_read():
    acceptor, reader, transport, clock, metrics, wrapped = accept(timeout=2.0)
    others = []
    for _ in range(3):
        r = acceptor.buildProtocol(BALANCER)
        t = StringTransport(peerAddress=BALANCER)
        r.makeConnection(t)
        others.append(t)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(2.0)
    assert transport.disconnecting and all(t.disconnecting for t in others)
    assert metrics.counted == [("web", "proxy_header")] * 4


def test_under_tls_the_service_protocol_hears_the_header_client(tmp_path):
    """The reader sits outside TLS; TLS asks the transport beneath it, which answers the header's client."""
    import trustme
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from txlb.net.tls import ServerTLS

    cert = trustme.CA().issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "site.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "site.pem"))
    options = ServerTLS([(str(tmp_path / "site.pem"), str(tmp_path / "site.key"))])
    wrapped = Wrapped()
    acceptor = ProxyAcceptor(TLSMemoryBIOFactory(options, False, wrapped), "web", Clock())
    reader = acceptor.buildProtocol(BALANCER)
    transport = StringTransport(peerAddress=BALANCER, hostAddress=IPv4Address("TCP", "10.9.9.1", 8443))
    reader.makeConnection(transport)
    reader.dataReceived(b"PROXY TCP4 192.0.2.7 10.9.9.1 40000 8443\r\n")
    (inner,) = wrapped.built
    assert inner.addr.host == "192.0.2.7"
    assert inner.transport is not transport  # TLS is between them
    assert clientAddress(inner.transport) == inner.peerAtStart == IPv4Address("TCP", "192.0.2.7", 40000)
    assert inner.transport.getHost() == IPv4Address("TCP", "10.9.9.1", 8443)
