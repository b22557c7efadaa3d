# -*- test-case-name: tests.test_tls -*-
"""
TLS with pyOpenSSL: the contexts txlb's listeners terminate TLS with, and
the connection creators it re-encrypts to backends with.

Front side: one OpenSSL context per certificate, all with the same modern
settings (TLS 1.2 or 1.3 at least, forward-secret AEAD ciphers, no
compression, no renegotiation, server-side session cache, ALPN for HTTP);
the first certificate is the default and a client's SNI name picks another
whose names match it.  Back side: Twisted's C{optionsForClientTLS}, which
checks the server's certificate against C{server_name} with
service-identity, and presents a client certificate for mutual TLS.

Client certificates: a certificate entry with a client CA asks clients for
a certificate signed by it (C{required}: no certificate, no handshake;
C{optional}: none is fine), and one that does not verify ends the handshake
with OpenSSL's alert.  Each such refusal is counted
(C{txlb_refused_total{reason="client_cert"}}) and logged
(C{client_cert_refused}).  What was verified reaches HTTP backends as the
lines of L{clientCertificateLines}.

Certificates are read and checked by L{checkCertificate} (client CAs by
L{checkClientCA}) when the config is validated, so a missing file, a key
that does not match its certificate or an expired certificate stops
C{--check}, naming the key.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import os
import weakref
from typing import Any, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
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


def checkClientCA(path: str, now: Optional[datetime.datetime] = None) -> list[str]:
    """
    Load a client CA file as OpenSSL will: one or more PEM certificates,
    each a CA (C{basicConstraints} C{CA:TRUE}) valid now.  Returns their
    subjects (L{subjectString}).

    @raise CertificateError: unreadable, not PEM, not a CA, expired.
    """
    pem = _readPem(path, "client CA")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate (the CA that signs the client certificates)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    subjects = []
    for cert in certs:
        subject = subjectString(cert.subject)
        try:
            isCA = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
        except x509.ExtensionNotFound:
            isCA = False
        if not isCA:
            raise CertificateError(f"{path}: {subject} is not a CA certificate (no basicConstraints CA:TRUE): "
                                   "give the CA that signs the client certificates")
        if cert.not_valid_after_utc < now:
            raise CertificateError(f"{path}: the CA {subject} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
        subjects.append(subject)
    return subjects


#: How RFC 4514 names the attributes it has no short name for that
#: client certificates commonly carry.
_NAME_OVERRIDES = {NameOID.EMAIL_ADDRESS: "emailAddress"}


def subjectString(name: x509.Name) -> str:
    """
    A certificate's subject as RFC 4514 writes it, most specific first
    (C{"CN=alice,O=Example"}), and pure printable ASCII: every other
    character's UTF-8 bytes are written C{\\XX}, as RFC 4514 allows, so
    the string is always a safe header value.
    """
    text = name.rfc4514_string(_NAME_OVERRIDES)
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "".join(f"\\{b:02X}" for b in c.encode("utf-8")) for c in text)


def clientCertificateLines(transport) -> tuple[bytes, ...]:
    """
    The header lines that tell an HTTP backend what the client's TLS
    connection proved: C{X-Client-Cert-Subject} and
    C{X-Client-Cert-Verified: SUCCESS} when it presented a certificate
    (one that failed verification never gets this far), or
    C{X-Client-Cert-Verified: NONE}.  Worked out once per connection, when
    its handshake is done.
    """
    handle = getattr(transport, "getHandle", None)
    cert = handle().get_peer_certificate(as_cryptography=True) if handle is not None else None
    if cert is None:
        return (b"X-Client-Cert-Verified: NONE",)
    return (b"X-Client-Cert-Subject: " + subjectString(cert.subject).encode("ascii"),
            b"X-Client-Cert-Verified: SUCCESS")


#: OpenSSL's C{X509_V_ERR_*} numbers a client certificate commonly fails
#: with, in the words an operator searches for.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "not signed by the client CA (unable to get local issuer certificate)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}
#: TLS alerts a server sends when a client certificate it asked for is
#: missing: C{certificate_required} (TLS 1.3), C{handshake_failure} (TLS
#: 1.2, once the certificate was asked for).
_CERTIFICATE_REQUIRED, _HANDSHAKE_FAILURE = 116, 40
_ASKED = b"SSLv3/TLS write certificate request"


class _Handshake:
    """A connection's client-certificate state, while its handshake runs."""

    __slots__ = ("asked", "refused")

    def __init__(self) -> None:
        self.asked = False
        self.refused = False


def _entry(certificate: Any) -> tuple[str, str, Optional[str], Optional[str]]:
    """C{(cert, key, client_ca, client_auth)} of a C{(cert, key)} pair or a certificate record."""
    if isinstance(certificate, tuple):
        cert, key = certificate
        return cert, key, None, None
    return certificate.cert, certificate.key, certificate.client_ca, certificate.client_auth


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


def handshakeError(failure) -> Optional[str]:
    """
    What ended a TLS handshake, for an operator: OpenSSL's reasons, or the
    name the server's certificate should have carried (service-identity's
    check, which Twisted runs once the chain is verified); L{None} when
    C{failure} (a L{twisted.python.failure.Failure}) is not about TLS.
    """
    if failure.check(SSL.Error):
        return errorText(failure.value)
    if failure.check(VerificationError):
        names = []
        for mismatch in failure.value.errors:
            wanted = getattr(mismatch, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            names.append(name.decode("idna") if isinstance(name, bytes) else str(name or mismatch))
        return f"the server's certificate is not for {' or '.join(names)}"
    return None


def closedAfterHandshake(server: str) -> str:
    """
    Why C{server} closed a TLS connection right after the handshake,
    before answering anything: a TLS 1.3 server judges the client's
    certificate only once the client's side of the handshake is done, and
    one that wants a certificate it was not given may just close.
    """
    return (f"{server} closed the connection right after the TLS handshake (does it want a client certificate?"
            " the pool's tls.cert and tls.key)")


def _serverContext(certPath: str, keyPath: str, minVersion: str, alpn: Sequence[bytes], sessionId: bytes) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_VERSIONS[minVersion])
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE
                        | SSL.OP_NO_RENEGOTIATION)
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
    Creates server-side TLS connections, choosing the certificate by SNI,
    and asks for client certificates where a certificate entry says so.

    @param certificates: C{(certPath, keyPath)} pairs, or records with
        C{cert}, C{key}, C{client_ca} and C{client_auth}
        (L{txlb.config.CertificateConfig}); the first is the default for
        clients that send no name or an unknown one.
    @param alpn: protocols to agree on (C{[b"http/1.1"]} for HTTP).
    @param service: the service's name, for the count and the event of a
        refused client certificate.
    @param metrics: a L{txlb.observe.metrics.Metrics} to count refusals
        in, or L{None}.
    """

    def __init__(self, certificates: Sequence[Any], minVersion: str = "1.2",
                 alpn: Sequence[bytes] = (), *, service: str = "", metrics=None) -> None:
        entries = [_entry(c) for c in certificates]
        self.service = service
        self.metrics = metrics
        #: Each connection's L{_Handshake}, by its C{SSL.Connection} (whose
        #: app data Twisted keeps for its protocol).
        self._handshakes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: Some certificate asks clients for theirs.
        self.clientCerts = any(ca for _, _, ca, _ in entries)
        sessionId = hashlib.sha256(repr(entries).encode()).digest()[:32]
        # A session resumed skips the client certificate: OpenSSL looks the
        # session up before SNI has switched the context.  Resuming is only
        # safe when every certificate asks the same of clients.
        resumable = len({(ca, auth) for _, _, ca, auth in entries}) == 1
        self._byName: list[tuple[str, SSL.Context]] = []
        contexts = []
        for certPath, keyPath, clientCA, clientAuth in entries:
            context = _serverContext(certPath, keyPath, minVersion, alpn, sessionId)
            if not resumable:
                context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
                context.set_options(SSL.OP_NO_TICKET)
            if clientCA:
                self._askForCertificates(context, clientCA, clientAuth != "optional")
            contexts.append(context)
            cert = x509.load_pem_x509_certificate(_readPem(certPath, "certificate"))
            for name in certificateNames(cert):
                self._byName.append((name, context))
        self.default = contexts[0]
        for context in contexts:
            context.set_tlsext_servername_callback(self._chooseBySni)

    def _askForCertificates(self, context: SSL.Context, clientCA: str, required: bool) -> None:
        """
        Verify client certificates against C{clientCA} alone (not the
        system's roots).  Each CA there is trusted as it is, an
        intermediate too (OpenSSL's partial chains): naming the CA that
        signs the client certificates lets in only what it signs, not all
        that its root signs.
        """
        context.load_verify_locations(clientCA)
        context.get_cert_store().set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        context.load_client_ca(os.fsencode(clientCA))  # the names sent in the certificate request
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if required else 0)
        context.set_verify(mode, self._verified)
        context.set_info_callback(self._watch)

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
            if self.clientCerts:
                # The connection keeps the verify mode it was made with:
                # take the chosen certificate's.
                connection.set_verify(context.get_verify_mode(), self._verified)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.default, None)
        if self.clientCerts:
            self._handshakes[connection] = _Handshake()
        return connection

    # Refusals.

    def _verified(self, connection: SSL.Connection, cert, error: int, depth: int, ok: int) -> bool:
        """OpenSSL's verdict on each certificate of the client's chain, kept; a failure is refused."""
        if not ok:
            why = _VERIFY_ERRORS.get(error, f"verify error {error}")
            subject = subjectString(cert.to_cryptography().subject) if cert is not None else None
            self._refused(connection, f"{why} (depth {depth})" if depth else why, subject)
        return bool(ok)

    def _watch(self, connection: SSL.Connection, where: int, ret: int) -> None:
        """
        The handshake's progress: a fatal alert for a client certificate
        that was asked for and not sent is a refusal (failed verifications
        are seen by L{_verified}).
        """
        if where & SSL.SSL_CB_LOOP:
            if connection.get_state_string() == _ASKED:
                state = self._handshakes.get(connection)
                if state is not None:
                    state.asked = True
        elif where & SSL.SSL_CB_WRITE_ALERT and ret >> 8 == 2:  # fatal
            alert = ret & 0xFF
            state = self._handshakes.get(connection)
            if alert == _CERTIFICATE_REQUIRED or (alert == _HANDSHAKE_FAILURE and state is not None and state.asked):
                self._refused(connection, "no client certificate", None)

    def _refused(self, connection: SSL.Connection, why: str, subject: Optional[str]) -> None:
        state = self._handshakes.get(connection)
        if state is not None:
            if state.refused:
                return
            state.refused = True
        if self.metrics is not None:
            self.metrics.refused(self.service, "client_cert")
        protocol = connection.get_app_data()  # Twisted's TLS protocol, on a socket
        wrapped = getattr(protocol, "wrappedProtocol", None)
        client = getattr(wrapped, "client", None)
        if client is None and protocol is not None:
            peer = protocol.getPeer()
            client = getattr(peer, "host", str(peer))
        if hasattr(wrapped, "refused"):
            wrapped.refused = "client_cert"  # a TCP connection's event says so too
        name = connection.get_servername()
        _log.info(
            "service {service}: client certificate refused from {client}: {reason}",
            event="client_cert_refused", service=self.service, client=client, reason=why, subject=subject,
            serverName=name.decode("ascii", "replace") if name else None,  # A-labels on the wire
        )


def backendCA(path: str) -> list[x509.Certificate]:
    """
    The certificates of a pool's C{tls.ca} file, every one trusted: while
    a CA is replaced, the file holds the old and the new one.

    @raise CertificateError: unreadable, or no PEM certificate in it.
    """
    pem = _readPem(path, "CA certificate")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate (the CA that signs the servers' certificates)")


def filesDigest(tls) -> Optional[bytes]:
    """
    A digest of what the files a pool's C{tls} names (C{ca}, C{cert},
    C{key}) hold now, or L{None} without C{tls}.  Certificates are renewed
    in place, under the same path, so the config alone cannot tell that a
    pool's TLS settings are stale: a reload compares this with the digest
    taken when they were made.  A file that cannot be read counts by its
    error (the config's check says which file).
    """
    if tls is None:
        return None
    digest = hashlib.sha256()
    for path in (tls.ca, tls.cert, tls.key):
        if path is None:
            data = b"none"
        else:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                data = f"unreadable: {e.errno}".encode()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.digest()


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
    trustRoot = tssl.trustRootFromCertificates(
        [tssl.Certificate(crypto.X509.from_cryptography(c)) for c in backendCA(ca)]
    ) if ca else tssl.platformTrust()
    return tssl.optionsForClientTLS(
        serverName,
        trustRoot=trustRoot,
        clientCertificate=clientCertificate,
        extraCertificateOptions={"raiseMinimumTo": tssl.TLSVersion.TLSv1_2},
        **({"acceptableProtocols": list(alpn)} if alpn else {}),
    )
