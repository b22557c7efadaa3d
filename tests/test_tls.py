"""
TLS contexts and their config: certificates made by trustme, real OpenSSL
handshakes in memory (no sockets).
"""

from __future__ import annotations

import datetime

import pytest
import trustme
from OpenSSL import SSL

from txlb.config import ConfigError, load
from txlb.net.tls import CertificateError, ServerTLS, checkCertificate


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def files(ca, tmp_path):
    """Certificates for shop.example and api.example, and the CA, as files."""
    out = {}
    for name in ("shop.example", "api.example"):
        cert = ca.issue_cert(name)
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        out[name] = (str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    out["ca"] = str(tmp_path / "ca.pem")
    return out


def handshake(server: ServerTLS, ca, sni: bytes | None, maxVersion=None) -> SSL.Connection:
    """Run a client and a server connection against each other in memory."""
    clientContext = SSL.Context(SSL.TLS_METHOD)
    ca.configure_trust(clientContext) if hasattr(ca, "configure_trust") else None
    clientContext.set_alpn_protos([b"h2", b"http/1.1"])
    if maxVersion:
        clientContext.set_max_proto_version(maxVersion)
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    if sni:
        client.set_tlsext_host_name(sni)
    serverConn = server.serverConnectionForTLS(None)
    serverConn.set_accept_state()
    for _ in range(10):
        for a, b in ((client, serverConn), (serverConn, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return client


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
    assert service.tls.certificates == (files["shop.example"],)
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
