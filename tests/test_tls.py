"""
TLS contexts and their config: certificates made by trustme, real OpenSSL
handshakes in memory (no sockets), client certificates included.
"""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from txlb.config import CertificateConfig, ConfigError, describeTLS, load
from txlb.net.tls import (
    CertificateError,
    ServerTLS,
    checkCertificate,
    checkClientCA,
    clientCertificateLines,
    subjectString,
)
from txlb.tap import summary


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def otherCA():
    return trustme.CA()


@pytest.fixture
def files(ca, otherCA, tmp_path):
    """
    Certificates for shop.example and api.example, the CA, another CA
    (C{other}) and a leaf certificate that is no CA, as files.
    """
    out = {}
    for name in ("shop.example", "api.example"):
        cert = ca.issue_cert(name)
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        out[name] = (str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    out["ca"] = str(tmp_path / "ca.pem")
    otherCA.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    out["other"] = str(tmp_path / "other.pem")
    return out


def handshake(server: ServerTLS, ca, sni: bytes | None, maxVersion=None) -> SSL.Connection:
    """Run a client and a server connection against each other in memory: the client's."""
    return connect(server, ca, sni, maxVersion)[0]


def connect(server: ServerTLS, ca, sni: bytes | None, maxVersion=None, *, clientCert=None,
            clientContext=None, session=None) -> tuple[SSL.Connection, SSL.Connection]:
    """
    The client and server connections after a handshake in memory; the
    client presents C{clientCert} (a trustme leaf) when given, and resumes
    C{session} (made with the same C{clientContext}).
    """
    if clientContext is None:
        clientContext = SSL.Context(SSL.TLS_METHOD)
        ca.configure_trust(clientContext)
        clientContext.set_alpn_protos([b"h2", b"http/1.1"])
        if maxVersion:
            clientContext.set_max_proto_version(maxVersion)
        if clientCert is not None:
            clientCert.configure_cert(clientContext)
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if sni:
        client.set_tlsext_host_name(sni)
    if session is not None:
        client.set_session(session)
    serverConn = server.serverConnectionForTLS(None)
    serverConn.set_accept_state()
    for _ in range(10):
        for a, b in ((client, serverConn), (serverConn, client)):
            try:
                a.do_handshake()
                if a is client:
                    client.recv(1)  # takes TLS 1.3's session tickets in
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return client, serverConn


def test_expired_certificate(ca, tmp_path):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    cert = ca.issue_cert("old.example", not_before=past, not_after=past + datetime.timedelta(days=90))
    cert.private_key_pem.write_to_path(str(tmp_path / "old.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "old.pem"))
    with pytest.raises(CertificateError, match="expired on 2020-03-31"):
        checkCertificate(str(tmp_path / "old.pem"), str(tmp_path / "old.key"))


def test_certificate_names_and_checks(files):
    assert checkCertificate(*files["shop.example"]) == ["shop.example"]
    with pytest.raises(CertificateError, match="does not match"):
        checkCertificate(files["shop.example"][0], files["api.example"][1])
    earlier = datetime.datetime(1999, 1, 1, tzinfo=datetime.timezone.utc)
    with pytest.raises(CertificateError, match="not valid before"):
        checkCertificate(*files["shop.example"], now=earlier)
    with pytest.raises(CertificateError, match="cannot read"):
        checkCertificate("/nonexistent.pem", files["shop.example"][1])


def test_sni_picks_the_certificate_and_the_first_is_the_default(files, ca):
    server = ServerTLS([files["api.example"], files["shop.example"]], alpn=[b"http/1.1"])
    for sni, expected in ((b"shop.example", "shop.example"), (b"api.example", "api.example"),
                          (b"other.example", "api.example"), (None, "api.example")):
        client = handshake(server, ca, sni)
        cert = client.get_peer_certificate().to_cryptography()
        names = cert.extensions.get_extension_for_oid(
            __import__("cryptography").x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        assert expected in [n.value for n in names], sni
        assert client.get_alpn_proto_negotiated() == b"http/1.1"


def test_tls_11_is_refused(files, ca):
    server = ServerTLS([files["shop.example"]])
    with pytest.raises(SSL.Error):
        handshake(server, ca, b"shop.example", maxVersion=SSL.TLS1_1_VERSION)
    assert handshake(server, ca, b"shop.example", maxVersion=SSL.TLS1_2_VERSION).get_protocol_version_name() == "TLSv1.2"


def test_min_version_13(files, ca):
    server = ServerTLS([files["shop.example"]], minVersion="1.3")
    with pytest.raises(SSL.Error):
        handshake(server, ca, b"shop.example", maxVersion=SSL.TLS1_2_VERSION)
    assert handshake(server, ca, b"shop.example").get_protocol_version_name() == "TLSv1.3"


def config(tmp_path, text: str) -> str:
    path = tmp_path / "txlb.toml"
    path.write_text(text)
    return str(path)


def test_config_reads_tls_relative_to_the_file(files, tmp_path):
    path = config(tmp_path, (
        '[pools.api]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'
        'tls = { ca = "ca.pem", server_name = "api.example", cert = "api.example.pem", key = "api.example.key" }\n'
        '[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:8443"\npool = "api"\n'
        'tls = { certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }], min_version = "1.3" }\n'
    ))
    cfg = load(path)
    [service] = cfg.services
    assert service.tls.certificates == (CertificateConfig(*files["shop.example"]),)
    assert service.tls.min_version == "1.3"
    backend = cfg.pools["api"].tls
    assert (backend.verify, backend.ca, backend.server_name) == (True, files["ca"], "api.example")


@pytest.mark.parametrize(
    "tls, path, message",
    [
        ('{ certificates = [{ cert = "missing.pem", key = "shop.example.key" }] }',
         "services[0].tls.certificates[0].cert", "cannot read"),
        ('{ certificates = [{ cert = "shop.example.pem", key = "api.example.key" }] }',
         "services[0].tls.certificates[0].cert", "does not match"),
        ('{ certificates = [] }', "services[0].tls.certificates", "needs at least one"),
        ('{ min_version = "1.1", certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }] }',
         "services[0].tls.min_version", "must be one of '1.2', '1.3'"),
    ],
)
def test_bad_service_tls(files, tmp_path, tls, path, message):
    text = (
        '[pools.api]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'
        f'[[services]]\nname = "web"\nlisten = "tcp:8443"\npool = "api"\ntls = {tls}\n'
    )
    with pytest.raises(ConfigError) as info:
        load(config(tmp_path, text))
    [problem] = info.value.problems
    assert problem.path == path and message in problem.message


def test_backend_tls_needs_cert_and_key_together(files, tmp_path):
    with pytest.raises(ConfigError) as info:
        load(config(tmp_path, '[pools.api]\ntls = { cert = "api.example.pem" }\n'))
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("pools.api.tls.key", "cert and key go together (mutual TLS)")]


# Client certificates.


class Counted:
    """A stand-in for L{txlb.observe.metrics.Metrics}: the refusals counted."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, str]] = []

    def refused(self, service: str, reason: str) -> None:
        self.refusals.append((service, reason))


class _Handle:
    """What L{clientCertificateLines} reads of a TLS transport."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.connection = connection

    def getHandle(self) -> SSL.Connection:
        return self.connection


def served(server: ServerTLS, ca, sni: bytes, maxVersion=None, **kw) -> tuple[bytes, ...]:
    """
    The X-Client-Cert lines of the server's side of a handshake, or
    L{SSL.Error} when the server refused it.
    """
    _, serverConn = connect(server, ca, sni, maxVersion, **kw)
    serverConn.do_handshake()  # done: returns; failed: raises again
    return clientCertificateLines(_Handle(serverConn))


def clientEntry(files, name: str, ca: str | None, auth: str | None = "required") -> CertificateConfig:
    return CertificateConfig(*files[name], client_ca=files[ca] if ca else None, client_auth=auth if ca else None)


VERSIONS = pytest.mark.parametrize("maxVersion", [SSL.TLS1_2_VERSION, None], ids=["1.2", "1.3"])


@VERSIONS
def test_required_client_certificate(files, ca, maxVersion, events):
    counted = Counted()
    server = ServerTLS([clientEntry(files, "shop.example", "ca")], service="web", metrics=counted)
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", maxVersion)
    assert counted.refusals == [("web", "client_cert")]
    [event] = [e for e in events if e.get("event") == "client_cert_refused"]
    assert (event["service"], event["reason"], event["serverName"]) == ("web", "no client certificate", "shop.example")
    alice = ca.issue_cert("alice@example", common_name="alice", organization_name="Example")
    subject, verified = served(server, ca, b"shop.example", maxVersion, clientCert=alice)
    assert subject.startswith(b"X-Client-Cert-Subject: CN=alice,") and subject.endswith(b",O=Example")
    assert verified == b"X-Client-Cert-Verified: SUCCESS"
    assert len(counted.refusals) == 1


@VERSIONS
def test_optional_client_certificate(files, ca, otherCA, maxVersion):
    counted = Counted()
    server = ServerTLS([clientEntry(files, "shop.example", "ca", "optional")], service="web", metrics=counted)
    assert served(server, ca, b"shop.example", maxVersion) == (b"X-Client-Cert-Verified: NONE",)
    alice = ca.issue_cert("alice@example", common_name="alice")
    assert served(server, ca, b"shop.example", maxVersion, clientCert=alice)[1] == b"X-Client-Cert-Verified: SUCCESS"
    assert counted.refusals == []


@VERSIONS
@pytest.mark.parametrize("auth", ["required", "optional"])
def test_a_certificate_from_another_ca_ends_the_handshake(files, ca, otherCA, maxVersion, auth, events):
    counted = Counted()
    server = ServerTLS([clientEntry(files, "shop.example", "ca", auth)], service="web", metrics=counted)
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", maxVersion, clientCert=otherCA.issue_cert("mallory@example",
                                                                                         common_name="mallory"))
    assert counted.refusals == [("web", "client_cert")]
    [event] = [e for e in events if e.get("event") == "client_cert_refused"]
    assert "not signed by the client CA" in event["reason"]
    assert event["subject"].startswith("CN=mallory")


def test_no_shared_cipher_is_no_client_certificate_refusal(files, ca):
    counted = Counted()
    server = ServerTLS([clientEntry(files, "shop.example", "ca")], metrics=counted)
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(b"AES128-SHA")  # no forward secrecy: not offered by txlb
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", clientContext=context)
    assert counted.refusals == []


@VERSIONS
def test_each_sni_name_asks_its_own_of_clients(files, ca, otherCA, maxVersion):
    """The default certificate trusts one CA and is optional; shop.example requires the other."""
    counted = Counted()
    server = ServerTLS([clientEntry(files, "api.example", "other", "optional"),
                        clientEntry(files, "shop.example", "ca", "required")], metrics=counted)
    alice = ca.issue_cert("alice@example", common_name="alice")
    bob = otherCA.issue_cert("bob@example", common_name="bob")
    assert served(server, ca, b"api.example", maxVersion) == (b"X-Client-Cert-Verified: NONE",)
    assert served(server, ca, b"api.example", maxVersion, clientCert=bob)[0].startswith(
        b"X-Client-Cert-Subject: CN=bob,")
    assert served(server, ca, b"shop.example", maxVersion, clientCert=alice)[0].startswith(
        b"X-Client-Cert-Subject: CN=alice,")
    for sni, cert in ((b"shop.example", None), (b"shop.example", bob), (b"api.example", alice)):
        with pytest.raises(SSL.Error):
            served(server, ca, sni, maxVersion, clientCert=cert)
    assert len(counted.refusals) == 3


def test_a_certificate_without_client_ca_asks_nothing(files, ca):
    server = ServerTLS([files["api.example"], clientEntry(files, "shop.example", "ca")])
    assert served(server, ca, b"api.example") == (b"X-Client-Cert-Verified: NONE",)
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example")


@VERSIONS
def test_a_session_is_not_resumed_past_a_client_certificate(files, ca, maxVersion):
    """
    OpenSSL looks a session up before SNI picks the certificate: a session
    made for api.example (no client certificate) must not let a client
    into shop.example (required) without one.
    """
    server = ServerTLS([files["api.example"], clientEntry(files, "shop.example", "ca")])
    context = SSL.Context(SSL.TLS_METHOD)
    ca.configure_trust(context)
    context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    if maxVersion:
        context.set_max_proto_version(maxVersion)
    client, _ = connect(server, ca, b"api.example", clientContext=context)
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", clientContext=context, session=client.get_session())


def test_subject_string_is_rfc4514_and_a_safe_header_value():
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Exa,mple"),
        x509.NameAttribute(NameOID.COMMON_NAME, "zo\u00eb\r\nX-Evil: 1"),
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "z@example"),
    ])
    assert subjectString(name) == "emailAddress=z@example,CN=zo\\C3\\AB\\0D\\0AX-Evil: 1,O=Exa\\,mple"


def test_check_client_ca(files, ca, tmp_path):
    [subject] = checkClientCA(files["ca"])
    assert subject.startswith("OU=Testing CA #") and ",O=trustme" in subject
    with pytest.raises(CertificateError, match="is not a CA certificate"):
        checkClientCA(files["shop.example"][0])
    with pytest.raises(CertificateError, match="is not a PEM certificate"):
        checkClientCA(files["shop.example"][1])
    with pytest.raises(CertificateError, match="cannot read the client CA"):
        checkClientCA(str(tmp_path / "missing.pem"))


def tlsService(tls: str) -> str:
    return (
        '[pools.api]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:8443"\npool = "api"\ntls = {tls}\n'
    )


def test_config_client_certificates_per_entry_and_for_the_service(files, tmp_path):
    cfg = load(config(tmp_path, tlsService(
        '{ client_ca = "ca.pem", certificates = ['
        '{ cert = "api.example.pem", key = "api.example.key" }, '
        '{ cert = "shop.example.pem", key = "shop.example.key", client_ca = "other.pem", client_auth = "optional" }] }'
    )))
    tls = cfg.services[0].tls
    assert tls.certificates == (clientEntry(files, "api.example", "ca", "required"),
                                clientEntry(files, "shop.example", "other", "optional"))
    assert tls.clientCerts and (tls.client_ca, tls.client_auth) == (files["ca"], None)
    assert describeTLS(cfg.services[0]) == [
        "TLS 1.2 or later, 2 certificates (chosen by SNI)",
        f"certificates[0] (api.example.pem): client certificates required, signed by {files['ca']}",
        f"certificates[1] (shop.example.pem): client certificates optional, signed by {files['other']}",
        "TLS sessions are not resumed: the certificates ask different things of clients",
    ]
    same = load(config(tmp_path, tlsService(
        '{ client_ca = "ca.pem", client_auth = "optional", '
        'certificates = [{ cert = "api.example.pem", key = "api.example.key" }] }')))
    assert f"  client certificates optional, signed by {files['ca']}" in summary(same)
    plain = load(config(tmp_path, tlsService(
        '{ certificates = [{ cert = "api.example.pem", key = "api.example.key" }] }')))
    assert not plain.services[0].tls.clientCerts


@pytest.mark.parametrize(
    "tls, path, message",
    [
        ('{ client_auth = "required", certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }] }',
         "services[0].tls.client_auth", "needs client_ca"),
        ('{ certificates = [{ cert = "shop.example.pem", key = "shop.example.key", client_auth = "optional" }] }',
         "services[0].tls.certificates[0].client_auth", "needs client_ca"),
        ('{ client_ca = "ca.pem", client_auth = "sometimes", '
         'certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }] }',
         "services[0].tls.client_auth", "must be one of 'required', 'optional'"),
        ('{ client_ca = "missing.pem", certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }] }',
         "services[0].tls.client_ca", "cannot read"),
        ('{ certificates = [{ cert = "shop.example.pem", key = "shop.example.key", client_ca = "shop.example.pem" }] }',
         "services[0].tls.certificates[0].client_ca", "is not a CA certificate"),
        ('{ client_ca = "shop.example.key", certificates = [{ cert = "shop.example.pem", key = "shop.example.key" }] }',
         "services[0].tls.client_ca", "is not a PEM certificate"),
    ],
)
def test_bad_client_certificate_settings(files, tmp_path, tls, path, message):
    path_ = config(tmp_path, tlsService(tls))
    with pytest.raises(ConfigError) as info:
        load(path_)
    [problem] = info.value.problems
    assert problem.path == path and message in problem.message, problem
    assert any(line.startswith(f"{path_}:8: {path}: ") for line in info.value.lines())


def test_service_client_auth_is_fine_when_every_certificate_has_its_own_ca(files, tmp_path):
    cfg = load(config(tmp_path, tlsService(
        '{ client_auth = "optional", certificates = ['
        '{ cert = "shop.example.pem", key = "shop.example.key", client_ca = "ca.pem" }] }')))
    assert cfg.services[0].tls.certificates == (clientEntry(files, "shop.example", "ca", "optional"),)


@VERSIONS
def test_an_intermediate_client_ca_lets_in_only_what_it_signs(ca, files, tmp_path, maxVersion):
    """
    client_ca may name the intermediate CA that signs the client
    certificates: it is trusted as it is, and its root's other children
    are not.
    """
    team, elsewhere = ca.create_child_ca(), ca.create_child_ca()
    team.cert_pem.write_to_path(str(tmp_path / "team.pem"))
    server = ServerTLS([CertificateConfig(*files["shop.example"], client_ca=str(tmp_path / "team.pem"),
                                          client_auth="required")])
    member = team.issue_cert("ann@example.com", common_name="ann")
    assert served(server, ca, b"shop.example", maxVersion, clientCert=member)[0].startswith(
        b"X-Client-Cert-Subject: CN=ann,")
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", maxVersion, clientCert=elsewhere.issue_cert("eve@example.com"))
    with pytest.raises(SSL.Error):
        served(server, ca, b"shop.example", maxVersion, clientCert=ca.issue_cert("root-child@example.com"))
