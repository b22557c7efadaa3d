# -*- test-case-name: tests.test_proxyproto -*-
"""
The PROXY protocol (version 1, text, and version 2, binary): reading the
header a balancer in front of txlb writes at the start of each connection,
and writing one at the start of each backend connection.

Reading (C{accept_proxy}).  L{ProxyAcceptor} is the factory a service's
ports accept with, outside TLS (the header comes before the handshake).
Each connection starts with a L{_HeaderReader}, which feeds what arrives
to a L{HeaderParser} until the header is complete.  Then it builds the
service's own protocol with the header's source address -- so the
service's C{buildProtocol(addr)} sees the real client, and with it
events, C{X-Forwarded-For}, C{ip_hash} and C{sticky = ip} -- and hands it
the socket's transport itself, stepping out of the way: nothing of the
PROXY protocol stays on the path of later bytes, so splicing, txlb's read
loop and its direct writes work as on any connection.  The transport's
C{getPeer()} and C{getHost()} then answer the header's source and
destination (L{clientAddress} says the same for any transport), for
whatever later asks the transport who the client is.

Bytes that came in the same read as the end of the header belong to the
service: a protocol that provides L{txlb.interfaces.IEarlyBytes} (the TCP
balancer, which splices) is given them before its connection is made,
any other gets them as its first C{dataReceived}.

A connection from a source outside C{from}, one whose first bytes are
not a valid header, and one whose header does not arrive within the
timeout are closed, counted (C{txlb_refused_total{reason="proxy_header"}})
and logged (C{proxy_refused}).  One the client closes before its header
is complete (a balancer's TCP health check) is just gone.

Writing (C{proxy_protocol} on TCP services): L{headerV1} and L{headerV2}.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Iterable, NamedTuple, Optional, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from txlb.interfaces import IEarlyBytes
from txlb.net.connect import Deadlines

_log = Logger(namespace="txlb.net.proxyproto")

Address = Union[IPv4Address, IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The twelve bytes every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest version 1 header, its CRLF included (the protocol's own bound).
V1_MAX = 107
#: The longest version 2 header txlb reads: the 16-byte preamble and an
#: address block of at most this much (addresses and TLVs).  Balancers in
#: front add a few small TLVs (a VPC endpoint, a TLS version); 4 KiB is
#: far beyond them and keeps a connection's cost bounded.
V2_MAX_BLOCK = 4096
#: Seconds the whole header may take to arrive (C{accept_proxy.timeout}).
DEFAULT_TIMEOUT = 5.0

_V1_PREFIX = b"PROXY "
_V2_ADDRESS = {0x1: (12, socket.AF_INET, 4), 0x2: (36, socket.AF_INET6, 16)}


class HeaderError(ValueError):
    """The bytes are not a PROXY header txlb accepts; the message says why."""


class ProxyHeader(NamedTuple):
    """
    What a header says.  C{source} and C{destination} are L{None} for a
    version 1 C{UNKNOWN} and a version 2 C{LOCAL} header (or an address
    family other than IPv4 and IPv6): the connection is the balancer's
    own (a health check), and its socket's addresses stand.  (A named
    tuple: one is made per connection, so it must be cheap.)
    """

    version: int
    source: Optional[Address] = None
    destination: Optional[Address] = None


def _address(family: int, host: str, port: int) -> Address:
    if family == socket.AF_INET6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def _port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5) or (len(text) > 1 and text[:1] == b"0"):
        raise HeaderError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise HeaderError(f"port {port} out of range")
    return port


def parseV1(line: bytes) -> ProxyHeader:
    """
    A version 1 header, C{PROXY TCP4 SRC DST SPORT DPORT}, without its CRLF.
    """
    fields = line.split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise HeaderError("not a PROXY v1 header")
    proto = fields[1]
    if proto == b"UNKNOWN":
        return ProxyHeader(1)  # whatever follows is to be ignored
    if proto not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise HeaderError(f"bad PROXY v1 header {line[:60]!r}")
    # Addresses as the socket module writes a peer's: IPv4 only when
    # already canonical (four decimal parts, no leading zeros: what
    # inet_pton takes), IPv6 rewritten in its short form.
    try:
        src, dst = fields[2].decode("ascii"), fields[3].decode("ascii")
        if proto == b"TCP4":
            inet_pton(AF_INET, src)
            inet_pton(AF_INET, dst)
            return ProxyHeader(1, IPv4Address("TCP", src, _port(fields[4])), IPv4Address("TCP", dst, _port(fields[5])))
        src, dst = inet_ntop(AF_INET6, inet_pton(AF_INET6, src)), inet_ntop(AF_INET6, inet_pton(AF_INET6, dst))
    except (OSError, UnicodeDecodeError):
        raise HeaderError(f"bad {proto.decode()} address in {line[:60]!r}")
    return ProxyHeader(1, IPv6Address("TCP", src, _port(fields[4])), IPv6Address("TCP", dst, _port(fields[5])))


def parseV2(header: bytes) -> ProxyHeader:
    """
    A whole version 2 header: signature, version and command, family,
    length, address block.  TLVs after the addresses are skipped.
    """
    command, family, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    if command >> 4 != 2:
        raise HeaderError(f"PROXY v2 header of version {command >> 4}")
    if command & 0xF == 0:
        return ProxyHeader(2)  # LOCAL: the balancer's own connection
    if command & 0xF != 1:
        raise HeaderError(f"PROXY v2 command {command & 0xF} is neither LOCAL nor PROXY")
    entry = _V2_ADDRESS.get(family >> 4)
    if entry is None or family & 0xF not in (0, 1, 2):
        if family >> 4 in (0, 3) and family & 0xF in (0, 1, 2):
            return ProxyHeader(2)  # unspecified or a unix socket: no address to use
        raise HeaderError(f"PROXY v2 address family 0x{family:02x} unknown")
    size, af, n = entry
    if length < size:
        raise HeaderError(f"PROXY v2 address block of {length} bytes, {size} needed")
    block = header[16:16 + size]
    src = socket.inet_ntop(af, block[:n])
    dst = socket.inet_ntop(af, block[n:2 * n])
    sport, dport = struct.unpack("!HH", block[2 * n:2 * n + 4])
    return ProxyHeader(2, _address(af, src, sport), _address(af, dst, dport))


class HeaderParser:
    """
    Finds one PROXY header, v1 or v2, in bytes that arrive in pieces of
    any size (one byte at a time works).  A stream that cannot be a header
    is refused as soon as its first bytes show it, not once a whole
    header's worth has arrived.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> Optional[tuple[ProxyHeader, bytes]]:
        """
        @return: L{None} while the header is incomplete, then C{(header,
            the bytes that followed it)}.
        @raise HeaderError: the bytes are not a valid header.
        """
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == b"\r":
            return self._v2(buffer)
        return self._v1(buffer)

    def _v1(self, buffer: bytes) -> Optional[tuple[ProxyHeader, bytes]]:
        if not buffer.startswith(_V1_PREFIX[:len(buffer)]):
            raise HeaderError("no PROXY header")
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise HeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
            if b"\n" in buffer or b"\r" in buffer[:-1]:
                raise HeaderError("PROXY v1 header not ended by CRLF")
            return None
        return parseV1(buffer[:end]), buffer[end + 2:]

    def _v2(self, buffer: bytes) -> Optional[tuple[ProxyHeader, bytes]]:
        if not buffer.startswith(V2_SIGNATURE[:len(buffer)]):
            raise HeaderError("no PROXY header")
        if len(buffer) < 16:
            return None
        length = struct.unpack("!H", buffer[14:16])[0]
        if length > V2_MAX_BLOCK:
            raise HeaderError(f"PROXY v2 header of {length} bytes after its preamble, more than {V2_MAX_BLOCK}")
        if buffer[12] >> 4 != 2:
            raise HeaderError(f"PROXY v2 header of version {buffer[12] >> 4}")
        if len(buffer) < 16 + length:
            return None
        return parseV2(buffer[:16 + length]), buffer[16 + length:]


# Writing.


def _family(source, destination) -> Optional[int]:
    """The family both addresses are in, or L{None} (one is not an IP address)."""
    if isinstance(source, IPv4Address) and isinstance(destination, IPv4Address):
        return socket.AF_INET
    if isinstance(source, IPv6Address) and isinstance(destination, IPv6Address):
        return socket.AF_INET6
    return None


def headerV1(source, destination) -> bytes:
    """
    A version 1 header naming C{source} (the client) and C{destination}
    (the address it connected to); C{PROXY UNKNOWN} when they are not both
    IPv4 or both IPv6 addresses (a client on a unix socket).
    """
    family = _family(source, destination)
    if family is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP4" if family == socket.AF_INET else "TCP6"
    src, dst = _plain(source.host), _plain(destination.host)
    return f"PROXY {proto} {src} {dst} {source.port} {destination.port}\r\n".encode("ascii")


def headerV2(source, destination) -> bytes:
    """
    A version 2 header (command PROXY, over a stream) naming C{source}
    and C{destination}; a LOCAL one when they are not both IPv4 or both
    IPv6 addresses.
    """
    family = _family(source, destination)
    if family is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    kind, size = (0x11, 12) if family == socket.AF_INET else (0x21, 36)
    return b"".join((
        V2_SIGNATURE,
        struct.pack("!BBH", 0x21, kind, size),
        socket.inet_pton(family, _plain(source.host)),
        socket.inet_pton(family, _plain(destination.host)),
        struct.pack("!HH", source.port, destination.port),
    ))


def _plain(host: str) -> str:
    """An IPv6 host without its zone (C{fe80::1%eth0}), which the header has no room for."""
    return host.partition("%")[0]


#: The writers by C{proxy_protocol} value.
WRITERS = {"v1": headerV1, "v2": headerV2}


# Reading connections.


def clientAddress(transport):
    """
    The client of a connection: the source address of its PROXY header
    when the service reads one (C{accept_proxy}), else the socket's peer.
    The same as C{transport.getPeer()} -- L{ProxyAcceptor} makes the two
    agree, under TLS too -- spelt out for code that wants to say what it
    means.
    """
    return transport.getPeer()


def trusts(networks: tuple[Network, ...], peer) -> bool:
    """
    Whether a connection from C{peer} (a Twisted address) may send a PROXY
    header: any may when C{networks} is empty; a connection with no IP
    address (a unix socket, only local processes reach it) always may.
    """
    if not networks:
        return True
    host = getattr(peer, "host", None)
    if not isinstance(peer, (IPv4Address, IPv6Address)) or host is None:
        return True
    try:
        ip = ipaddress.ip_address(_plain(host))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip.version == n.version and ip in n for n in networks)


def networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """C{from}'s networks, already checked by the config reader."""
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)


class ProxyAcceptor(Factory):
    """
    What a service with C{accept_proxy} listens with: each connection
    reads its PROXY header, then becomes a connection of C{wrapped} (the
    service's factory, or TLS in front of it) whose client is the one the
    header names.

    @param trusted: the networks that may connect (C{from}); empty: any.
    @param timeout: seconds for the header to arrive (0: no limit).
    @param metrics: a L{txlb.observe.metrics.Metrics} to count refusals in, or L{None}.
    """

    noisy = False

    def __init__(self, wrapped: Factory, service: str, clock, *, trusted: tuple[Network, ...] = (),
                 timeout: float = DEFAULT_TIMEOUT, metrics=None) -> None:
        self.wrapped = wrapped
        self.service = service
        self.clock = clock
        self.trusted = trusted
        self.timeout = timeout
        self.metrics = metrics
        #: The header timeouts of every connection being read: one timer.
        self.deadlines = Deadlines(clock)

    def startFactory(self) -> None:
        self.wrapped.doStart()

    def stopFactory(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr) -> Optional["_HeaderReader"]:
        if not trusts(self.trusted, addr):
            # Closed by the port at once: not a byte is read from it.
            self.refused(addr, "source not in accept_proxy.from")
            return None
        return _HeaderReader(self, addr)

    def refused(self, addr, why: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(self.service, "proxy_header")
        _log.info(
            "service {service}: connection from {peer} refused: {reason}",
            event="proxy_refused", service=self.service, peer=getattr(addr, "host", str(addr)), reason=why,
        )


class _HeaderReader(Protocol):
    """A connection until its PROXY header is read (see the module)."""

    _waiting = False

    def __init__(self, acceptor: ProxyAcceptor, addr) -> None:
        self.acceptor = acceptor
        self.addr = addr
        self.parser = HeaderParser()

    def connectionMade(self) -> None:
        timeout = self.acceptor.timeout
        if timeout:
            self._waiting = True
            self.acceptor.deadlines.add(self, timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._waiting = False
        self._refuse(f"no PROXY header within {self.acceptor.timeout:g}s")

    def _refuse(self, why: str) -> None:
        self.acceptor.refused(self.addr, why)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # refused already
        try:
            found = parser.feed(data)
        except HeaderError as e:
            self._cancel()
            self._refuse(str(e))
            return
        if found is not None:
            self._cancel()
            self._handOff(*found)

    def _cancel(self) -> None:
        if self._waiting:
            self._waiting = False
            self.acceptor.deadlines.discard(self)
        self.parser = None

    def _handOff(self, header: ProxyHeader, rest: bytes) -> None:
        transport = self.transport
        addr = self.addr
        if header.source is not None:
            source, destination = header.source, header.destination
            # The transport's own methods, shadowed on this one instance:
            # whoever asks it (TLS passes the question down) hears the
            # header's addresses.
            transport.getPeer = lambda: source
            transport.getHost = lambda: destination
            addr = source
        protocol = self.acceptor.wrapped.buildProtocol(addr)
        self.transport = None
        if protocol is None:
            transport.loseConnection()
            return
        transport.protocol = protocol
        early = IEarlyBytes(protocol, None) if rest else None
        if early is not None:
            early.earlyBytes(rest)
        protocol.makeConnection(transport)
        if rest and early is None and not transport.disconnecting:
            protocol.dataReceived(rest)

    def connectionLost(self, reason=None) -> None:
        # Before the header (a hand-off gives the transport to another
        # protocol, which hears of its end instead).
        self._cancel()
