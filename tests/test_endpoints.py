"""
Tests for L{txlb.net.endpoints}: addresses as Twisted endpoint strings.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.protocol import Factory, Protocol

from txlb.net.endpoints import (
    EndpointCache,
    EndpointError,
    checkClient,
    checkServer,
    isUDP,
    parseUDPListen,
    sameSocket,
    serverAddress,
    udpTarget,
)


@pytest.mark.parametrize(
    "text",
    [
        "tcp:8080",
        "tcp:0",
        "tcp:65535",
        "tcp:8080:interface=127.0.0.1",
        "tcp:port=8080:interface=127.0.0.1:backlog=10",
        r"tcp:8080:interface=\:\:1",
        "tcp6:8080",
        "unix:/run/txlb.sock",
        "unix:/run/txlb.sock:mode=660",
    ],
)
def test_listening_endpoints(text):
    assert IStreamServerEndpoint.providedBy(checkServer(text))


@pytest.mark.parametrize(
    "text, detail",
    [
        ("tcp:abc", "'abc' is not a number"),
        ("tcp:-1", "port -1 is out of range 0-65535"),
        ("tcp:65536", "port 65536 is out of range 0-65535"),
        ("tcp:8080:bogus=1", "unknown parameter 'bogus'"),
        ("tcp:8080:interface=::1", "'interface' given twice"),
        ("bogus:8080", "unknown endpoint type 'bogus'"),
        ("tcp:8080:backlog=x", "'x' is not a number"),
    ],
)
def test_bad_listening_endpoints(text, detail):
    with pytest.raises(EndpointError) as info:
        checkServer(text)
    assert str(info.value).startswith(f"{text!r} is not a valid address ({detail}")
    assert str(info.value).endswith("expected a listening endpoint like tcp:8080:interface=127.0.0.1")


def test_ipv6_interface_hint():
    with pytest.raises(EndpointError) as info:
        checkServer("tcp:8080:interface=::")
    assert r"write the colons of an IPv6 address as \:, like interface=\:\:1" in str(info.value)


def test_a_bare_port_number_says_what_to_write():
    with pytest.raises(EndpointError) as info:
        checkServer("8080")
    assert str(info.value) == "'8080' is not a valid address; write tcp:8080 for TCP port 8080"


def test_endpoint_error_is_a_valueerror():
    assert issubclass(EndpointError, ValueError)


@pytest.mark.parametrize(
    "text",
    ["tcp:host=10.0.0.5:port=9001", "tcp:10.0.0.5:9001", "tcp:host=h:port=1:timeout=5", "unix:/run/app.sock"],
)
def test_client_endpoints(text):
    assert IStreamClientEndpoint.providedBy(checkClient(text))


@pytest.mark.parametrize(
    "text, detail",
    [
        ("tcp:host=h", "missing 'port'"),
        ("tcp:port=80", "missing 'host'"),
        ("tcp:host=h:port=0", "port 0 is out of range 1-65535"),
        ("tcp:host=h:port=65536", "port 65536 is out of range 1-65535"),
        ("tcp:host=h:port=x", "'x' is not a number"),
        ("tcp:host=h:port=1:colour=red", "unknown parameter 'colour'"),
    ],
)
def test_bad_client_endpoints(text, detail):
    with pytest.raises(EndpointError) as info:
        checkClient(text)
    assert str(info.value) == (
        f"{text!r} is not a valid address ({detail}); "
        "expected host:port or a client endpoint like tcp:host=H:port=P"
    )


@pytest.mark.parametrize(
    "address, endpoint",
    [
        ("127.0.0.1:9001", "tcp:host=127.0.0.1:port=9001"),
        ("localhost:1", "tcp:host=localhost:port=1"),
        ("db-1.example.com:65535", "tcp:host=db-1.example.com:port=65535"),
        ("[::1]:9001", r"tcp:host=\:\:1:port=9001"),
        ("[2001:db8::1]:80", r"tcp:host=2001\:db8\:\:1:port=80"),
        ("  10.0.0.1:80 ", "tcp:host=10.0.0.1:port=80"),
        ("tcp:host=10.0.0.5:port=9001", "tcp:host=10.0.0.5:port=9001"),
        ("unix:/run/app.sock", "unix:/run/app.sock"),
    ],
)
def test_server_address(address, endpoint):
    assert serverAddress(address) == endpoint


def test_an_ipv6_server_address_is_one_twisted_parses():
    endpoint = checkClient(serverAddress("[2001:db8::1]:8443"))
    assert isinstance(endpoint, TCP4ClientEndpoint)
    assert (endpoint._host, endpoint._port) == ("2001:db8::1", 8443)


@pytest.mark.parametrize(
    "address, message",
    [
        ("h:0", "port 0 is out of range (1-65535) in 'h:0'"),
        ("h:70000", "port 70000 is out of range (1-65535) in 'h:70000'"),
        ("::1:9001", "'::1:9001' is not a valid address; write an IPv6 address in brackets, like [::1]:9001"),
        ("2001:db8::1:80", "'2001:db8::1:80' is not a valid address; write an IPv6 address in brackets, like [::1]:9001"),
        ("h", "'h' is not a valid address (no port); expected host:port or a client endpoint like tcp:host=H:port=P"),
        ("", "'' is not a valid address (no port); expected host:port or a client endpoint like tcp:host=H:port=P"),
        ("h:http", "'h:http' is not a valid address (unknown endpoint type 'h'); "
                   "expected host:port or a client endpoint like tcp:host=H:port=P"),
    ],
)
def test_bad_server_addresses(address, message):
    with pytest.raises(EndpointError) as info:
        serverAddress(address)
    assert str(info.value) == message


_HOST = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True).filter(
    lambda h: h.split(":")[0] not in {"tcp", "ssl", "unix", "tls"}
)


@given(_HOST, st.integers(1, 65535))
def test_host_port_property(host, port):
    """Every C{host:port} becomes a TCP endpoint for that host and port."""
    endpoint = checkClient(serverAddress(f"{host}:{port}"))
    assert isinstance(endpoint, TCP4ClientEndpoint)
    assert (endpoint._host, endpoint._port) == (host, port)


@given(st.ip_addresses(v=6), st.integers(1, 65535))
def test_ipv6_host_port_property(address, port):
    endpoint = checkClient(serverAddress(f"[{address}]:{port}"))
    assert (endpoint._host, endpoint._port) == (str(address), port)


@given(st.text(max_size=20))
def test_server_address_raises_only_endpoint_error(text):
    try:
        result = serverAddress(text)
    except EndpointError:
        return
    assert IStreamClientEndpoint.providedBy(checkClient(result))


@given(st.text(max_size=20))
def test_check_server_raises_only_endpoint_error(text):
    try:
        checkServer(text)
    except EndpointError:
        pass


@pytest.mark.parametrize(
    "a, b",
    [
        ("tcp:8080", "tcp:8080"),
        ("tcp:8080", "tcp:port=8080"),
        ("tcp:8080", "tcp:8080:interface=127.0.0.1"),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=5"),
        ("tcp6:8080", "tcp:8080:interface=10.0.0.1"),
        ("tcp:8080:interface=0.0.0.0", "tcp:8080:interface=10.0.0.1"),
        ("unix:/run/a.sock", "unix:/run/a.sock:mode=600"),
    ],
)
def test_same_socket(a, b):
    assert sameSocket(a, b) and sameSocket(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("tcp:8080", "tcp:8081"),
        ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.2"),
        ("tcp:0", "tcp:0"),
        ("unix:/run/a.sock", "unix:/run/b.sock"),
        ("tcp:8080", "unix:/run/8080"),
    ],
)
def test_not_the_same_socket(a, b):
    assert not sameSocket(a, b) and not sameSocket(b, a)


def test_endpoint_cache_parses_once_per_address():
    reactor = MemoryReactorClock()
    cache = EndpointCache(reactor)
    first = cache.get("tcp:host=10.0.0.5:port=9001")
    assert cache.get("tcp:host=10.0.0.5:port=9001") is first
    other = cache.get("unix:/run/app.sock")
    assert isinstance(other, UNIXClientEndpoint) and other is not first


def test_endpoint_cache_connects_with_its_reactor():
    reactor = MemoryReactorClock()
    endpoint = EndpointCache(reactor).get(serverAddress("10.0.0.5:9001"))
    endpoint.connect(Factory.forProtocol(Protocol))
    ((host, port, _, _, _),) = reactor.tcpClients
    assert (host, port) == ("10.0.0.5", 9001)



# UDP addresses: Twisted has no UDP server endpoint, so txlb reads them.


@pytest.mark.parametrize("text, expected", [
    ("udp:53", (53, "")),
    ("udp:0", (0, "")),
    ("udp:port=5353", (5353, "")),
    ("udp:5353:interface=127.0.0.1", (5353, "127.0.0.1")),
    ("udp:port=5353:interface=127.0.0.1", (5353, "127.0.0.1")),
    ("udp:interface=127.0.0.1:port=5353", (5353, "127.0.0.1")),
    ("udp:5353:interface=\\:\\:1", (5353, "::1")),
    ("UDP:53", (53, "")),
])
def test_udp_listen_addresses(text, expected):
    assert isUDP(text)
    assert parseUDPListen(text) == expected


@pytest.mark.parametrize("text, why", [
    ("udp:", "'' is not a port"),
    ("udp:65536", "is not a port 0-65535"),
    ("udp:-1", "is not a port 0-65535"),
    ("udp:53:interfce=127.0.0.1", "unknown parameter 'interfce'"),
    ("udp:53:127.0.0.1", "unexpected '127.0.0.1'"),
    ("udp:53:port=54", "port given twice"),
    ("udp:interface=127.0.0.1", "missing port"),
    ("udp:53:interface=::1", "unexpected ''"),
    ("udp:53:interface=localhost", "is not an IP address"),
    ("udp:53\\", "lone"),
    ("tcp:53", "is not a UDP address"),
])
def test_bad_udp_listen_addresses(text, why):
    with pytest.raises(EndpointError) as info:
        parseUDPListen(text)
    assert why in str(info.value)


def test_udp_targets_are_literal_ip_addresses():
    assert udpTarget(serverAddress("10.0.0.5:53")) == ("10.0.0.5", 53)
    assert udpTarget(serverAddress("[::1]:5353")) == ("::1", 5353)
    for address in ("dns.example:53", "unix:/run/dns.sock"):
        with pytest.raises(EndpointError):
            udpTarget(serverAddress(address))


def test_udp_sockets_collide_as_tcp_ones_do():
    assert sameSocket("udp:53", "udp:53:interface=127.0.0.1")
    assert sameSocket("udp:port=53", "udp:53")
    assert not sameSocket("udp:53", "tcp:53")
    assert not sameSocket("udp:53:interface=127.0.0.1", "udp:53:interface=127.0.0.2")
    assert not sameSocket("udp:0", "udp:0")


# What txlb reads back from an endpoint string, checked against what
# Twisted's own parsers make of it (their private attributes: the oracle
# here, never in txlb itself).

from twisted.internet.endpoints import TCP6ClientEndpoint, serverFromString, clientFromString  # noqa: E402

from txlb.net.endpoints import connectParts, listenParts  # noqa: E402


@pytest.mark.parametrize("text", [
    "tcp:8080", "tcp:port=8080", "tcp:0:interface=127.0.0.1", "tcp:8080:backlog=7:interface=10.0.0.1",
    "tcp:port=8443:interface=\\:\\:1", "tcp6:8080", "tcp6:8080:interface=\\:\\:1", "tcp:9000:127.0.0.2",
])
def test_listen_parts_read_what_twisted_binds(text):
    endpoint = serverFromString(MemoryReactorClock(), text)
    assert listenParts(text) == ("tcp", endpoint._port, endpoint._interface, endpoint._backlog)


@pytest.mark.parametrize("text", ["unix:/run/a.sock", "unix:address=/run/b.sock:mode=600:backlog=9"])
def test_listen_parts_of_unix_sockets(text):
    endpoint = serverFromString(MemoryReactorClock(), text)
    assert listenParts(text) == ("unix", endpoint._address, endpoint._mode, endpoint._backlog)


@pytest.mark.parametrize("text", ["ssl:443:privateKey=k.pem", "udp:53", "systemd:domain=INET:index=0", "tcp:"])
def test_listen_parts_of_other_kinds_are_none(text):
    assert listenParts(text) is None


@pytest.mark.parametrize("text", [
    "tcp:host=10.0.0.5:port=9001", "tcp:10.0.0.5:9001", "tcp:example.com:80:timeout=3",
    "tcp:host=\\:\\:1:port=9001:timeout=2", "tcp:9001:host=127.0.0.1", "tcp:host=a:port=1:bindAddress=127.0.0.2",
])
def test_connect_parts_read_what_twisted_connects_to(text):
    endpoint = clientFromString(MemoryReactorClock(), text)
    assert isinstance(endpoint, (TCP4ClientEndpoint, TCP6ClientEndpoint))
    host, port, timeout, bind = connectParts(text)
    assert (host, port, timeout) == (endpoint._host, endpoint._port, endpoint._timeout)
    assert (bind is None) == (endpoint._bindAddress is None)


@pytest.mark.parametrize("text", ["unix:/run/a.sock", "ssl:host=a:port=1", "tcp:host=a"])
def test_connect_parts_of_other_kinds_are_none(text):
    assert connectParts(text) is None
