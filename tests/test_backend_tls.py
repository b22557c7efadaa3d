"""
HTTP/1.1 pools over TLS, and what a reload that changes how a pool's
servers are reached does to the connections already open.

TLS here is real: the pool's connection and a pyOpenSSL server (txlb's own
L{ServerTLS}, with trustme certificates) shake hands in memory through
Twisted's I/O pump; clients and backends are on a memory reactor.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trustme
from h2.events import RequestReceived
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from tests.h2support import H2Peer, h2Connection
from tests.test_http_frontend import OK, Harness, head
from tests.test_reload import BASE, Running
from txlb.config import BackendTLSConfig
from txlb.net.tls import ServerTLS

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def files(ca, tmp_path):
    """A server certificate for C{localhost}, a client certificate, the CA, and another CA."""
    for name, issued in [("localhost", ca.issue_cert("localhost")), ("client", ca.issue_cert("txlb-client"))]:
        issued.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return tmp_path


class Answering(Protocol):
    """A backend that answers L{OK} to every request head it reads."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        while b"\r\n\r\n" in self.received:
            _, _, self.received = self.received.partition(b"\r\n\r\n")
            self.transport.write(OK)


def tlsServer(h: Harness, files, clientCerts: bool = False, maxVersion=None) -> TLSMemoryBIOFactory:
    """A TLS server for C{localhost}; with C{clientCerts}, it requires one signed by the CA."""
    entry = SimpleNamespace(cert=str(files / "localhost.pem"), key=str(files / "localhost.key"),
                            client_ca=str(files / "ca.pem") if clientCerts else None,
                            client_auth="required" if clientCerts else None)
    creator = ServerTLS([entry], service="backend")
    if maxVersion is not None:
        creator.default.set_max_proto_version(maxVersion)
    return TLSMemoryBIOFactory(creator, False, Factory.forProtocol(Answering), clock=h.reactor)


def handshake(h: Harness, server: TLSMemoryBIOFactory, index: int = -1) -> None:
    """
    Connect the backend connection asked for last to C{server} and move
    the bytes both ways until neither side has more to say.
    """
    host, port, factory, _, _ = h.reactor.tcpClients[index]
    factory._wrappedFactory._clock = h.reactor  # TLS's small writes leave at the end of the reactor's turn
    client = factory.buildProtocol(IPv4Address("TCP", host, port))
    backend = server.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5000))
    pump = iosim.connect(backend, iosim.makeFakeServer(backend), client, iosim.makeFakeClient(client))
    for _ in range(20):  # a handshake and an exchange settle in a few rounds
        h.reactor.advance(0)
        if not pump.flush() and not h.reactor.getDelayedCalls():
            break


def tlsHarness(files, servers: int = 1, retries: int = 0, **tls) -> Harness:
    h = Harness(servers=servers, retries=retries)
    h.pool.tls = BackendTLSConfig(**{"ca": str(files / "ca.pem"), "server_name": "localhost", **tls})
    return h


def failed(client, events) -> str:
    """The client got a 502: why the connect failed, as logged."""
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    [why] = [e["why"] for e in events if e.get("event") == "connect_failed"]
    return why


# HTTP/1.1 over TLS: what failed is named.


def test_a_request_over_verified_tls_is_answered(files):
    h = tlsHarness(files)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files))
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"


def test_a_server_certificate_from_another_ca_fails_the_connect_saying_so(files, events):
    h = tlsHarness(files, ca=str(files / "other-ca.pem"))
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files))
    why = failed(client, events)
    assert why == "TLS with s0 failed: certificate verify failed"
    assert h.servers[0].consecutiveFailures == 1  # counted as a failed connect (passive ejection)


def test_a_server_certificate_for_another_name_says_which_name_it_lacked(files, events):
    h = tlsHarness(files, server_name="api.internal")
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files))
    assert failed(client, events) == "TLS with s0 failed: the server's certificate is not for api.internal"


@pytest.mark.parametrize("version, alert", [(SSL.TLS1_3_VERSION, "tlsv13 alert certificate required"),
                                            (SSL.TLS1_2_VERSION, "alert handshake failure")])
def test_a_server_that_wants_a_client_certificate_it_was_not_given(files, events, version, alert):
    # TLS 1.2: the server ends the handshake.  TLS 1.3: the client's side
    # is done before the server judges the certificate, so its alert comes
    # after the request is sent: still a failed connect, never answered.
    h = tlsHarness(files)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files, clientCerts=True, maxVersion=version))
    why = failed(client, events)
    assert why.startswith("TLS with s0 failed: ") and alert in why


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
def test_a_client_certificate_the_server_does_not_trust(ca, files, events, version):
    stranger = trustme.CA().issue_cert("txlb-client")
    stranger.private_key_pem.write_to_path(str(files / "stranger.key"))
    stranger.cert_chain_pems[0].write_to_path(str(files / "stranger.pem"))
    h = tlsHarness(files, cert=str(files / "stranger.pem"), key=str(files / "stranger.key"))
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files, clientCerts=True, maxVersion=version))
    assert failed(client, events) == "TLS with s0 failed: tlsv1 alert unknown ca"


def test_the_client_certificate_is_given_when_the_pool_has_one(files):
    h = tlsHarness(files, cert=str(files / "client.pem"), key=str(files / "client.key"))
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files, clientCerts=True))
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"


def test_a_failed_handshake_tries_the_next_server(files, events):
    h = tlsHarness(files, servers=2, retries=1)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    handshake(h, tlsServer(h, files, clientCerts=True))  # s0 wants a client certificate
    assert client.value() == b"" and h.connects() == 2
    handshake(h, tlsServer(h, files))
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"
    [event] = [e for e in events if e.get("event") == "connect_failed"]
    assert event["server"] == "s0" and "certificate required" in event["why"]


def test_a_refused_connect_says_only_why(events):
    h = Harness(servers=1, retries=0)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    h.refuse()
    assert failed(client, events) == "Connection was refused by other side"


def test_a_connect_that_times_out_says_after_how_long(events):
    h = Harness(servers=1, retries=0)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    h.reactor.advance(2.0)
    assert failed(client, events) == "timed out after 2s"


# A reload that changes how a pool's servers are reached.


def served(h: Harness, frontend, client, backend=None):
    """A request through C{frontend}, answered on C{backend} or on the connection it makes."""
    before = h.connects()
    frontend.dataReceived(GET)
    if backend is None or h.connects() > before:
        backend, transport = h.answer()
    backend.dataReceived(OK)
    return backend


def test_retiring_closes_idle_connections_and_the_next_request_makes_a_new_one():
    h = Harness(servers=1)
    frontend, client = h.accept()
    first = served(h, frontend, client)
    assert h.connects() == 1 and not first.transport.disconnecting
    h.connections.retire(h.pool)
    assert first.transport.disconnecting
    first.connectionLost(Failure(Exception("closed")))
    served(h, frontend, client)
    assert h.connects() == 2


def test_a_busy_connection_finishes_its_request_then_closes():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    backend, transport = h.answer()
    h.connections.retire(h.pool)
    backend.dataReceived(OK)
    assert client.value().count(b"200 OK") == 1
    assert transport.disconnecting  # not kept for the next request
    served(h, frontend, client)
    assert h.connects() == 2


def test_a_connection_asked_for_before_the_reload_serves_its_request_only():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(GET)  # connecting...
    h.connections.retire(h.pool)
    backend, transport = h.answer()  # ...made after the reload
    backend.dataReceived(OK)
    assert client.value().count(b"200 OK") == 1 and transport.disconnecting


def test_other_servers_keep_their_connections():
    h = Harness(servers=1)
    frontend, client = h.accept()
    first = served(h, frontend, client)
    h.connections.retire([h.other.server("q0")])
    served(h, frontend, client, first)
    assert h.connects() == 1 and not first.transport.disconnecting


class H2Server(H2Peer):
    """The server of one h2 connection, answering 200 to each request once told to."""

    def __init__(self, backend, transport) -> None:
        conn = h2Connection(client=False)
        conn.initiate_connection()
        super().__init__(backend, transport, conn)
        self.answered: set[int] = set()
        self.flush()

    def answer(self) -> None:
        self.flush()
        for event in self.of(RequestReceived):
            if event.stream_id not in self.answered:
                self.answered.add(event.stream_id)
                self.conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-length", b"0")],
                                       end_stream=True)
        self.flush()


def h2Served(h: Harness, index: int = -1) -> H2Server:
    backend, transport = h.answer(index)
    return H2Server(backend, transport)


def test_an_http2_connection_drains_at_a_reload_and_closes_when_its_streams_end():
    h = Harness(servers=1)
    h.pool.protocol = "h2"
    first, firstClient = h.accept()
    first.dataReceived(GET)
    old = h2Served(h)
    old.flush()
    [conn] = h.connections.h2.connections(h.servers[0])
    h.connections.retire(h.pool)
    assert conn.draining and h.connections.h2.connections(h.servers[0]) == []
    # A new request: a new connection, not a stream on the draining one.
    second, secondClient = h.accept("10.1.2.4")
    second.dataReceived(GET)
    assert h.connects() == 2
    assert not conn.transport.disconnecting  # its stream is still in hand
    old.answer()
    assert firstClient.value().startswith(b"HTTP/1.1 200 OK")
    assert conn.transport.disconnecting
    new = h2Served(h)
    new.answer()
    assert secondClient.value().startswith(b"HTTP/1.1 200 OK")


def test_an_idle_http2_connection_closes_at_once():
    h = Harness(servers=1)
    h.pool.protocol = "h2"
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    server = h2Served(h)
    server.answer()
    [conn] = h.connections.h2.connections(h.servers[0])
    assert not conn.streams and not conn.transport.disconnecting
    h.connections.retire(h.pool)
    assert conn.transport.disconnecting


def test_an_http2_connection_being_made_at_the_reload_serves_its_waiters_then_drains():
    h = Harness(servers=1)
    h.pool.protocol = "h2"
    frontend, client = h.accept()
    frontend.dataReceived(GET)
    h.connections.retire(h.pool)
    server = h2Served(h)
    server.answer()
    assert client.value().startswith(b"HTTP/1.1 200 OK")
    assert h.connections.h2.connections(h.servers[0]) == []
    [(backend, transport)] = h.backends
    assert transport.disconnecting


# The reload itself (TxlbService on a memory reactor).


def idleConnection(running: Running):
    """A request through the running service, answered: its backend connection, now idle."""
    protocol, transport = running.connect(8080)
    protocol.dataReceived(GET)
    host, port, factory, _, _ = running.reactor.tcpClients[-1]
    backend, toBackend = factory.buildProtocol(IPv4Address("TCP", host, port)), StringTransport()
    backend.makeConnection(toBackend)
    backend.dataReceived(OK)
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    return toBackend


@pytest.mark.parametrize("change", [
    lambda text: text.replace('algorithm = "round_robin"', 'algorithm = "round_robin"\ntls = { verify = false }'),
    lambda text: text.replace('algorithm = "round_robin"', 'algorithm = "round_robin"\nprotocol = "h2"'),
    lambda text: text.replace("127.0.0.1:9001", "127.0.0.1:9011").replace("127.0.0.1:9002", "127.0.0.1:9012"),
])
def test_a_reload_that_changes_how_servers_are_reached_closes_their_idle_connections(tmp_path, change):
    running = Running(tmp_path, BASE)
    try:
        idle = idleConnection(running)
        assert not idle.disconnecting
        assert running.reload(change(BASE)).ok
        assert idle.disconnecting
    finally:
        running.service.stopService()


def test_a_reload_that_changes_nothing_of_the_kind_keeps_them(tmp_path):
    running = Running(tmp_path, BASE)
    try:
        idle = idleConnection(running)
        assert running.reload(BASE.replace('algorithm = "round_robin"', 'algorithm = "least_connections"')).ok
        assert not idle.disconnecting
    finally:
        running.service.stopService()


def test_a_tcp_check_over_the_pools_tls_passes_only_once_the_handshake_is_done():
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import directlyProvides

    from txlb.health._checks import _Connected

    done: Deferred = Deferred()
    check = _Connected(done, tls=False)  # the check has no TLS options: the pool's TLS wraps it
    transport = StringTransport()
    directlyProvides(transport, ISSLTransport)
    check.makeConnection(transport)
    assert not done.called
    check.handshakeCompleted()
    assert done.result.ok and done.result.detail == "TLS handshake completed"



class Closing(Protocol):
    """A backend that hangs up on the first request without a word (no TLS close_notify either)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()


def test_a_server_that_hangs_up_right_after_the_handshake_may_want_a_client_certificate(files, events):
    h = tlsHarness(files)
    server = tlsServer(h, files)
    server.wrappedFactory = Factory.forProtocol(Closing)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    handshake(h, server)
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    assert not [e for e in events if e.get("event") == "connect_failed"]  # it may have read the POST
    [request] = [e for e in events if e.get("event") == "request"]
    assert "s0 closed the connection right after the TLS handshake (does it want a client certificate?" in str(
        request)
