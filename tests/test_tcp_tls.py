"""
TCP services whose pool has C{tls} (L{txlb.tcp}): a server is connected
once the handshake is done, and a failed handshake is a failed connect,
named.  TLS is real, both ends in memory (trustme certificates, txlb's own
L{ServerTLS} as the server), the client and the sockets on a memory reactor.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from OpenSSL import SSL

from tests.test_backend_tls import ca, files, handshake, tlsServer  # noqa: F401 (fixtures)
from tests.test_tcp import Harness
from txlb.config import BackendTLSConfig


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def tlsHarness(files, servers: int = 1, retries: int = 0, **tls) -> Harness:
    h = Harness(servers=servers, retries=retries)
    h.pool.tls = BackendTLSConfig(**{"ca": str(files / "ca.pem"), "server_name": "localhost", **tls})
    return h


def echoing(h: Harness, files, **kwargs):
    server = tlsServer(h, files, **kwargs)
    server.wrappedFactory = Factory.forProtocol(Echo)
    return server


def connection(events) -> dict:
    [event] = [e for e in events if e.get("event") == "connection"]
    return event


def failures(events) -> list[str]:
    return [e["why"] for e in events if e.get("event") == "connect_failed"]


def settle(h: Harness, pump) -> None:
    for _ in range(20):  # a handshake and an exchange settle in a few rounds
        h.reactor.advance(0)
        if not pump.flush() and not h.reactor.getDelayedCalls():
            break


def connectTLS(h: Harness, server):
    """Connect the last connect asked for to C{server} in memory, the handshake done: the pump."""
    host, port, factory, _, _ = h.reactor.tcpClients[-1]
    factory._wrappedFactory._clock = h.reactor
    client = factory.buildProtocol(IPv4Address("TCP", host, port))
    accepted = server.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5000))
    pump = iosim.connect(accepted, iosim.makeFakeServer(accepted), client, iosim.makeFakeClient(client))
    settle(h, pump)
    return pump


def test_bytes_go_over_tls_once_the_handshake_is_done(files, events):
    h = tlsHarness(files)
    frontend, client = h.accept()
    frontend.early = b"hello "  # bytes that came before the connect: first on the server's stream
    pump = connectTLS(h, echoing(h, files))
    assert frontend.serverConnected and client.producerState == "producing"
    frontend.dataReceived(b"ping")
    settle(h, pump)
    assert client.value() == b"hello ping"
    assert frontend.bytesIn == 10 and frontend.bytesOut == 10
    assert not frontend.spliced  # the bytes are encrypted here: never spliced
    assert h.servers[0].consecutiveFailures == 0 and failures(events) == []


def test_the_server_is_connected_only_once_the_handshake_is_done(files):
    h = tlsHarness(files)
    frontend, client = h.accept()
    host, factory = h.pending()
    backend = factory.buildProtocol(IPv4Address("TCP", host, 9000))
    backend.makeConnection(StringTransport())  # TCP is up, the handshake has not begun
    assert not frontend.serverConnected and frontend.backend is None
    assert client.producerState == "paused"
    assert h.servers[0].active == 1


def test_a_server_certificate_from_another_ca_is_a_failed_connect_and_the_next_server_is_tried(files, events):
    h = tlsHarness(files, servers=2, retries=1, ca=str(files / "other-ca.pem"))
    frontend, client = h.accept()
    handshake(h, echoing(h, files))
    assert failures(events) == ["TLS with s0 failed: certificate verify failed"]
    assert h.servers[0].consecutiveFailures == 1 and h.servers[0].active == 0
    assert len(h.reactor.tcpClients) == 2  # s1 now
    handshake(h, echoing(h, files))
    assert failures(events) == ["TLS with s0 failed: certificate verify failed",
                                "TLS with s1 failed: certificate verify failed"]
    client.loseConnection()
    frontend.connectionLost(None)
    event = connection(events)
    assert event["error"] == "connect failed to s0, s1" and event["selectedServer"] is None


def test_a_server_certificate_for_another_name_says_which_name_it_lacked(files, events):
    h = tlsHarness(files, server_name="api.internal")
    frontend, client = h.accept()
    handshake(h, echoing(h, files))
    assert failures(events) == ["TLS with s0 failed: the server's certificate is not for api.internal"]
    assert not frontend.serverConnected


class HangUp(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


def handshaking(h):
    """The backend connection asked for last, connected over TCP, its TLS handshake not begun."""
    host, factory = h.pending()
    backend = factory.buildProtocol(IPv4Address("TCP", host, 9000))
    transport = StringTransport()
    backend.makeConnection(transport)
    return backend, transport


def test_a_server_that_hangs_up_during_the_handshake(files, events):
    h = tlsHarness(files)
    frontend, client = h.accept()
    backend, transport = handshaking(h)
    backend.connectionLost(None)
    assert failures(events) == ["s0 closed the connection during the TLS handshake"]
    assert h.servers[0].failures == 1


def test_a_handshake_that_does_not_finish_times_out_as_a_connect(files, events):
    h = tlsHarness(files)
    frontend, client = h.accept()
    backend, transport = handshaking(h)
    h.reactor.advance(2.0)
    assert transport.disconnecting  # aborted: its connectionLost follows
    backend.connectionLost(None)
    assert failures(events) == ["timed out after 2s"]
    assert h.servers[0].failures == 1 and h.servers[0].active == 0


def test_a_client_leaving_during_the_handshake_is_not_the_servers_fault(files, events):
    h = tlsHarness(files)
    frontend, client = h.accept()
    backend, transport = handshaking(h)
    frontend.connectionLost(None)
    backend.connectionLost(None)
    assert failures(events) == [] and h.servers[0].failures == 0 and h.servers[0].active == 0
    assert connection(events)["selectedServer"] is None


def test_a_tls13_server_refusing_the_missing_client_certificate_is_named(files, events):
    # TLS 1.3: the client's side of the handshake is done before the
    # server judges its certificate; the alert ends the connection.
    h = tlsHarness(files)
    frontend, client = h.accept()
    handshake(h, echoing(h, files, clientCerts=True, maxVersion=SSL.TLS1_3_VERSION))
    assert client.disconnecting  # the server's connection is over: so is the client's
    frontend.connectionLost(None)
    event = connection(events)
    assert event["error"] == "TLS with s0 failed: tlsv13 alert certificate required"
    assert h.servers[0].failures == 1 and h.servers[0].active == 0


def test_a_tls12_server_refusing_the_missing_client_certificate_is_a_failed_connect(files, events):
    h = tlsHarness(files)
    frontend, client = h.accept()
    handshake(h, echoing(h, files, clientCerts=True, maxVersion=SSL.TLS1_2_VERSION))
    [why] = failures(events)
    assert why.startswith("TLS with s0 failed: ") and why.endswith("alert handshake failure")


def test_the_client_certificate_is_given_when_the_pool_has_one(files, events):
    h = tlsHarness(files, cert=str(files / "client.pem"), key=str(files / "client.key"))
    frontend, client = h.accept()
    handshake(h, echoing(h, files, clientCerts=True))
    assert frontend.serverConnected and failures(events) == []
