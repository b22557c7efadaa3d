# -*- test-case-name: tests.test_tls -*-
"""
TLS with pyOpenSSL: the contexts txlb's listeners terminate TLS with, and
the connection creators it re-encrypts to backends with.

Front side: one OpenSSL context per certificate, all with the same modern
settings (TLS 1.2 or 1.3 at least, forward-secret AEAD ciphers, no
compression, server-side session cache, ALPN for HTTP); the first
certificate is the default and a client's SNI name picks another whose
names match it.  Back side: Twisted's C{optionsForClientTLS}, which checks
the server's certificate against C{server_name} with service-identity, and
presents a client certificate for mutual TLS.

Certificates are read and checked by L{checkCertificate} when the config is
validated, so a missing file, a key that does not match its certificate or
an expired certificate stops C{--check}, naming the key.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

_log = Logger(namespace="txlb.net.tls")

#: Forward-secret AEAD suites for TLS 1.2 (TLS 1.3 suites are always on).
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


class CertificateError(ValueError):
    """A certificate or key that cannot be used; the message says why."""


def _readPem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read the {what} {path}: {e.strerror}")


def checkCertificate(certPath: str, keyPath: str, now: Optional[datetime.datetime] = None) -> list[str]:
    """
    Load a certificate chain and its key as OpenSSL will, and return the
    DNS names the certificate is for.

    @raise CertificateError: unreadable, not PEM, key not matching, not yet
        valid or expired.
    """
    certPem, keyPem = _readPem(certPath, "certificate"), _readPem(keyPath, "key")
    try:
        cert = x509.load_pem_x509_certificate(certPem)
    except ValueError:
        raise CertificateError(f"{certPath} is not a PEM certificate")
    try:
        key = serialization.load_pem_private_key(keyPem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{keyPath} is not a PEM private key (or it is encrypted)")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(cert)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise CertificateError(f"the key {keyPath} does not match the certificate {certPath}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise CertificateError(f"{certPath} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise CertificateError(f"{certPath} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    return certificateNames(cert)


def certificateNames(cert: x509.Certificate) -> list[str]:
    """The DNS names in the subjectAltName, else the common name."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n.lower() for n in names]


def errorText(e: Exception) -> str:
    """
    What a pyOpenSSL error says, in OpenSSL's own words (C{certificate
    verify failed}, C{tlsv1 alert unknown ca}): its reasons, joined.
    """
    reasons = [r[-1] for r in (e.args[0] if e.args and isinstance(e.args[0], list) else []) if r]
    return "; ".join(str(r) for r in reasons) or str(e) or type(e).__name__


def alpnRefusal(transport, wanted: bytes) -> Optional[str]:
    """
    Why the TLS handshake just completed on C{transport} did not agree on
    C{wanted} in ALPN, or L{None} when it did: a client that offers only
    C{wanted} must not go on speaking it to a server that did not choose it.
    """
    negotiated = getattr(transport, "negotiatedProtocol", None)
    if negotiated == wanted:
        return None
    chose = f"it chose {negotiated.decode('latin-1')}" if negotiated else "it chose no protocol"
    return f"did not agree to {wanted.decode('latin-1')} in TLS's ALPN ({chose})"


def _serverContext(certPath: str, keyPath: str, minVersion: str, alpn: Sequence[bytes], sessionId: bytes) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_VERSIONS[minVersion])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
    context.set_cipher_list(CIPHERS)
    context.use_certificate_chain_file(certPath)
    context.use_privatekey_file(keyPath)
    context.check_privatekey()
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_session_id(sessionId)
    if alpn:
        offered = list(alpn)

        def selectProtocol(connection, protocols):
            for protocol in offered:
                if protocol in protocols:
                    return protocol
            return SSL.NO_OVERLAPPING_PROTOCOLS

        context.set_alpn_select_callback(selectProtocol)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Creates server-side TLS connections, choosing the certificate by SNI.

    @param certificates: C{(certPath, keyPath)} pairs; the first is the
        default for clients that send no name or an unknown one.
    @param alpn: protocols to agree on (C{[b"http/1.1"]} for HTTP).
    """

    def __init__(self, certificates: Sequence[tuple[str, str]], minVersion: str = "1.2",
                 alpn: Sequence[bytes] = ()) -> None:
        sessionId = hashlib.sha256(repr(list(certificates)).encode()).digest()[:32]
        self._byName: list[tuple[str, SSL.Context]] = []
        contexts = []
        for certPath, keyPath in certificates:
            context = _serverContext(certPath, keyPath, minVersion, alpn, sessionId)
            contexts.append(context)
            cert = x509.load_pem_x509_certificate(_readPem(certPath, "certificate"))
            for name in certificateNames(cert):
                self._byName.append((name, context))
        self.default = contexts[0]
        for context in contexts:
            context.set_tlsext_servername_callback(self._chooseBySni)

    def contextFor(self, serverName: Optional[str]) -> SSL.Context:
        """The context whose certificate names C{serverName} (wildcards too)."""
        if serverName:
            serverName = serverName.lower()
            for name, context in self._byName:
                if name == serverName or (name.startswith("*.") and fnmatch.fnmatchcase(serverName, name)
                                          and serverName.count(".") == name.count(".")):
                    return context
        return self.default

    def _chooseBySni(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        context = self.contextFor(name.decode("idna") if name else None)
        if context is not self.default:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.default, None)


def clientTLS(serverName: str, *, verify: bool = True, ca: Optional[str] = None,
              cert: Optional[str] = None, key: Optional[str] = None, alpn: Sequence[bytes] = ()):
    """
    A client connection creator for a pool's backends: TLS 1.2 at least,
    the backend's certificate verified against C{ca} (or the system's
    roots) and C{serverName}, a client certificate for mutual TLS when
    C{cert} and C{key} are given.  C{verify=False} verifies nothing: it is
    logged as a warning when the pool is built.  C{alpn} lists the
    protocols offered in ALPN (C{b"h2"} for an HTTP/2 pool).
    """
    clientCertificate = None
    if cert and key:
        clientCertificate = tssl.PrivateCertificate.loadPEM(
            _readPem(cert, "client certificate") + b"\n" + _readPem(key, "client key")
        )
    if not verify:
        options = dict(verify=False, raiseMinimumTo=tssl.TLSVersion.TLSv1_2)
        if alpn:
            options["acceptableProtocols"] = list(alpn)
        if clientCertificate is not None:
            options.update(privateKey=clientCertificate.privateKey.original,
                           certificate=clientCertificate.original)
        return tssl.CertificateOptions(**options)
    trustRoot = tssl.Certificate.loadPEM(_readPem(ca, "CA certificate")) if ca else tssl.platformTrust()
    return tssl.optionsForClientTLS(
        serverName,
        trustRoot=trustRoot,
        clientCertificate=clientCertificate,
        extraCertificateOptions={"raiseMinimumTo": tssl.TLSVersion.TLSv1_2},
        **({"acceptableProtocols": list(alpn)} if alpn else {}),
    )
