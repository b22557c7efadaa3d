"""
Certificates renewed in place, under the same path, and a reload: a pool's
CA, client certificate or key (L{txlb.service.apply}), and a service's
certificates and client CA.  A L{txlb.service.TxlbService} on a memory
reactor; TLS is real, both ends in memory (trustme certificates).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trustme
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from tests.test_backend_tls import GET, Answering
from tests.test_http_frontend import head
from tests.test_reload import BASE, Running
from txlb.net.tls import ServerTLS, filesDigest

POOL_TLS = 'algorithm = "round_robin"\nretries = 0\ntls = { ca = "ca.pem", server_name = "localhost", cert = "c.pem", key = "c.key" }'
TEXT = BASE.replace('algorithm = "round_robin"', POOL_TLS)


def issue(ca: trustme.CA, directory, name: str, *names: str) -> None:
    """C{name.pem} and C{name.key}: a certificate for C{names} from C{ca}."""
    issued = ca.issue_cert(*names)
    issued.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    issued.private_key_pem.write_to_path(str(directory / f"{name}.key"))


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def files(ca, tmp_path):
    """The pool's CA (C{ca.pem}), its client certificate (C{c.*}) and a server's (C{s.*}), from C{ca}."""
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    issue(ca, tmp_path, "c", "txlb-client")
    issue(ca, tmp_path, "s", "localhost")
    return tmp_path


@pytest.fixture
def running(files):
    r = Running(files, TEXT)
    yield r
    r.service.stopService()


def backend(running: Running, files, clientCA: str = "ca.pem") -> TLSMemoryBIOFactory:
    """A server with C{s.pem}, read now, asking for a client certificate from C{clientCA}."""
    entry = SimpleNamespace(cert=str(files / "s.pem"), key=str(files / "s.key"),
                            client_ca=str(files / clientCA), client_auth="required")
    return TLSMemoryBIOFactory(ServerTLS([entry]), False, Factory.forProtocol(Answering), clock=running.reactor)


def request(running: Running, server: TLSMemoryBIOFactory, connections: list | None = None):
    """
    A request through the service to C{server}, over real TLS: what the
    client got.  The backend connection's pump is added to C{connections}.
    """
    protocol, transport = running.connect(8080)
    protocol.dataReceived(GET)
    host, port, factory, _, _ = running.reactor.tcpClients[-1]
    factory._wrappedFactory._clock = running.reactor  # TLS's small writes leave at the end of the reactor's turn
    client = factory.buildProtocol(IPv4Address("TCP", host, port))
    accepted = server.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5000))
    pump = iosim.connect(accepted, iosim.makeFakeServer(accepted), client, iosim.makeFakeClient(client))
    for _ in range(20):  # a handshake and an exchange settle in a few rounds
        running.reactor.advance(0)
        if not pump.flush() and not running.reactor.getDelayedCalls():
            break
    if connections is not None:
        connections.append(pump)
    return head(transport.value())[0]


def test_a_reload_with_the_same_files_changes_nothing(running, files):
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"
    result = running.reload(TEXT)
    assert result.ok and result.changes == ()
    assert running.service.reloads.renewed == ()


def test_a_new_ca_written_over_the_old_is_read_at_the_next_reload(running, files, events):
    before: list = []
    assert request(running, backend(running, files), before) == b"HTTP/1.1 200 OK"
    [idle] = before
    assert not idle.clientIO.disconnecting  # kept alive
    # The server's certificate is renewed by another CA; the pool's CA
    # file is replaced, under the same path, and the config is unchanged.
    renewed = trustme.CA()
    issue(renewed, files, "s", "localhost")
    assert request(running, backend(running, files)) == b"HTTP/1.1 502 Bad Gateway"  # until the reload
    renewed.cert_pem.write_to_path(str(files / "ca.pem"))
    issue(renewed, files, "c", "txlb-client")
    result = running.reload(TEXT)
    assert result.ok and result.changes == ("pool api: tls files changed",)
    idle.flush()
    assert idle.clientIO.disconnecting  # made with the old settings: serves no new request
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"
    # The next reload, with nothing renewed, says nothing of it.
    assert running.reload(TEXT).changes == ()


def test_a_client_certificate_renewed_in_place_is_presented_after_the_reload(running, files):
    server = backend(running, files)
    assert request(running, server) == b"HTTP/1.1 200 OK"
    # The server now trusts only client certificates of another CA.
    other = trustme.CA()
    other.cert_pem.write_to_path(str(files / "client-ca.pem"))
    entry = SimpleNamespace(cert=str(files / "s.pem"), key=str(files / "s.key"),
                            client_ca=str(files / "client-ca.pem"), client_auth="required")
    strict = TLSMemoryBIOFactory(ServerTLS([entry]), False, Factory.forProtocol(Answering), clock=running.reactor)
    assert request(running, strict) == b"HTTP/1.1 502 Bad Gateway"
    issue(other, files, "c", "txlb-client")
    result = running.reload(TEXT)
    assert result.changes == ("pool api: tls files changed",)
    assert request(running, strict) == b"HTTP/1.1 200 OK"


def test_a_renewed_file_that_is_not_a_certificate_keeps_the_running_config(running, files, ca):
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"
    (files / "ca.pem").write_text("renewal half written")
    result = running.reload(TEXT)
    assert not result.ok
    assert result.errors[0].endswith("pools.api.tls.ca: " + f"{files / 'ca.pem'} is not a PEM certificate "
                                     "(the CA that signs the servers' certificates)")
    # The settings made from the old files stay, and are what the next
    # reload compares with: the old file back is no change.
    ca.cert_pem.write_to_path(str(files / "ca.pem"))
    assert running.reload(TEXT).changes == ()
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"


def test_a_changed_tls_table_is_not_also_renewed_files(running, files, ca):
    ca.cert_pem.write_to_path(str(files / "ca2.pem"))
    issue(ca, files, "c", "txlb-client")
    result = running.reload(TEXT.replace('"ca.pem"', '"ca2.pem"'))
    assert result.changes == ("pool api: tls changed",)


def test_every_ca_in_the_file_is_trusted(running, files, ca):
    # While a CA is replaced, the file holds both: servers with either's certificate verify.
    renewed = trustme.CA()
    (files / "ca.pem").write_bytes(renewed.cert_pem.bytes() + ca.cert_pem.bytes())
    assert running.reload(TEXT).changes == ("pool api: tls files changed",)
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"
    issue(renewed, files, "s", "localhost")
    assert request(running, backend(running, files)) == b"HTTP/1.1 200 OK"


class Workers:
    """Stands in for a master's workers: which way a reload reached them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def changed(self) -> None:
        self.calls.append("changed")

    def restartAll(self) -> None:
        self.calls.append("restartAll")


def test_workers_are_started_again_when_files_were_renewed(running, files):
    # Servers only are sent to workers as state: renewed files are not
    # state, the new workers read them.
    running.service.workers = workers = Workers()
    try:
        added = TEXT.replace('{ name = "b", address = "127.0.0.1:9002" },',
                             '{ name = "b", address = "127.0.0.1:9002" },\n  { name = "c", address = "127.0.0.1:9003" },')
        assert running.reload(added).ok
        assert workers.calls == ["changed"]
        trustme.CA().cert_pem.write_to_path(str(files / "ca.pem"))
        issue(trustme.CA(), files, "c", "txlb-client")
        assert running.reload(added.replace("9003", "9004")).ok
        assert workers.calls == ["changed", "restartAll"]
    finally:
        running.service.workers = None


def test_the_digest_tells_renewed_files_apart(files, ca):
    tls = SimpleNamespace(ca=str(files / "ca.pem"), cert=str(files / "c.pem"), key=str(files / "c.key"))
    before = filesDigest(tls)
    assert filesDigest(tls) == before and filesDigest(None) is None
    issue(ca, files, "c", "txlb-client")
    assert filesDigest(tls) != before
    (files / "c.key").unlink()
    assert filesDigest(tls) != before


# A service's certificates and client CA, renewed in place.


LISTENER = BASE + ('tls = { certificates = [{ cert = "site.pem", key = "site.key", client_ca = "clients.pem" }] }\n')


@implementer(IHandshakeListener)
class Client(Protocol):
    """A client of the service: whether its TLS handshake was done, and whether it was hung up on."""

    done = lost = False

    def handshakeCompleted(self) -> None:
        self.done = True

    def connectionLost(self, reason=None) -> None:
        self.lost = True


def clientHandshake(running: Running, ca: trustme.CA, name: str, certificate: trustme.LeafCert) -> bool:
    """A TLS client for C{name}, trusting C{ca} and presenting C{certificate}, to port 8080: whether it got in."""
    creator = ssl.optionsForClientTLS(
        name, trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes()),
        clientCertificate=ssl.PrivateCertificate.loadPEM(certificate.private_key_and_cert_chain_pem.bytes()),
    )
    tls = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Client))
    client = tls.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
    said = client.wrappedProtocol
    accepted = running.reactor.listening[8080].buildProtocol(IPv4Address("TCP", "127.0.0.5", 4000))
    pump = iosim.connect(accepted, iosim.makeFakeServer(accepted), client, iosim.makeFakeClient(client))
    for _ in range(20):  # a handshake settles in a few rounds
        running.reactor.advance(0)
        if not pump.flush():
            break
    return said.done and not said.lost


def test_a_services_certificate_and_client_ca_renewed_in_place_are_used_after_the_reload(tmp_path):
    ca, clients = trustme.CA(), trustme.CA()
    issue(ca, tmp_path, "site", "site.test")
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    alice = clients.issue_cert("alice")
    r = Running(tmp_path, LISTENER)
    try:
        assert clientHandshake(r, ca, "site.test", alice)
        # A new certificate (another CA, another name), a new client CA.
        renewedCA, renewedClients = trustme.CA(), trustme.CA()
        issue(renewedCA, tmp_path, "site", "www.site.test")
        renewedClients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
        assert clientHandshake(r, ca, "site.test", alice)  # read at the reload, not before
        assert r.reload(LISTENER).ok
        assert not clientHandshake(r, ca, "site.test", alice)
        assert not clientHandshake(r, renewedCA, "www.site.test", alice)  # alice's CA is no longer trusted
        assert clientHandshake(r, renewedCA, "www.site.test", renewedClients.issue_cert("bob"))
    finally:
        r.service.stopService()


def test_a_file_broken_before_a_servers_first_connect_fails_that_connect_saying_so(running, files, events):
    # The settings for a server are made at its first connect: a file
    # replaced by something unreadable since the config was checked.
    (files / "ca.pem").write_text("renewal half written")
    protocol, transport = running.connect(8080)
    protocol.dataReceived(GET)
    assert head(transport.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    assert running.reactor.tcpClients == []  # nothing to connect with
    [why] = [e["why"] for e in events if e.get("event") == "connect_failed"]
    assert why == (f"the pool's tls: {files / 'ca.pem'} is not a PEM certificate "
                   "(the CA that signs the servers' certificates)")
