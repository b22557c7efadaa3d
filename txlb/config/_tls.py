# -*- test-case-name: tests.test_tls -*-
"""
Reading the C{tls} tables: a service's (its certificates, and the client
certificates it asks for) and a pool's (TLS to its servers).  Every file
is read and checked here, as OpenSSL will read it (L{txlb.net.tls}), so
C{--check} stops on a file that would fail at start-up, naming its key.
"""

from __future__ import annotations

import os
from typing import Optional

from txlb.config._model import BackendTLSConfig, CertificateConfig, TLSConfig
from txlb.config._table import _boolean, _oneOf, _string, _Table

_CLIENT_AUTH = _oneOf("required", "optional")


def _file(t: _Table, key: str, default: Optional[str] = None) -> Optional[str]:
    """A file name, relative to the config file, that must be readable."""
    name = t.get(key, _string, default)
    if name is None:
        return None
    path = os.path.join(t.ctx.baseDir, name)
    if not os.access(path, os.R_OK):
        t.error(key, f"cannot read {path}")
    return path


def _hasProblems(t: _Table, key: str = "") -> bool:
    """Whether a problem was already found in this table (or at C{key} of it)."""
    path = t.keyPath(key) if key else t.path
    return any(p.path.startswith(path) for p in t.ctx.problems)


def _clientCA(t: _Table) -> Optional[str]:
    """C{client_ca}: a readable PEM file of CA certificates."""
    from txlb.net.tls import CertificateError, checkClientCA

    path = _file(t, "client_ca")
    if path is not None and not _hasProblems(t, "client_ca"):
        try:
            checkClientCA(path)
        except CertificateError as e:
            t.error("client_ca", str(e))
    return path


def readTLS(t: Optional[_Table]) -> Optional[TLSConfig]:
    """
    A service's C{tls}.  C{client_ca} and C{client_auth} may be written
    for the whole service, or on a certificate entry (the entry's win), so
    that each SNI name can ask its own of clients; C{client_auth} is
    C{"required"} unless it says C{"optional"}, and means nothing without
    a C{client_ca}.
    """
    from txlb.net.tls import CertificateError, checkCertificate

    if t is None:
        return None
    clientCA = _clientCA(t)
    clientAuth = t.get("client_auth", _CLIENT_AUTH, None)
    entries = []
    inherits = False  # an entry takes the service's client_ca
    for c in t.tables("certificates", "certificate"):
        cert, key = _file(c, "cert"), _file(c, "key")
        ownCA = _clientCA(c)
        ownAuth = c.get("client_auth", _CLIENT_AUTH, None)
        c.finish()
        if cert and key and not _hasProblems(c, "cert") and not _hasProblems(c, "key"):
            try:
                checkCertificate(cert, key)
            except CertificateError as e:
                c.error("cert", str(e))
        ca = ownCA or clientCA
        inherits = inherits or ownCA is None
        if ownAuth is not None and ca is None:
            c.error("client_auth", "needs client_ca, the PEM file of the CA that signs the client certificates "
                                   "(on this certificate or for the whole tls table)")
        auth = (ownAuth or clientAuth or "required") if ca else None
        entries.append(CertificateConfig(cert, key, ca, auth))
    if clientAuth is not None and clientCA is None and (inherits or not entries):
        t.error("client_auth", "needs client_ca, the PEM file of the CA that signs the client certificates")
    if "certificates" in t.data and not entries:
        t.error("certificates", "needs at least one { cert = ..., key = ... }")
    elif "certificates" not in t.data:
        t.error("certificates", 'is required: [{ cert = "site.pem", key = "site.key" }]')
    tls = TLSConfig(
        certificates=tuple(entries),
        min_version=t.get("min_version", _oneOf("1.2", "1.3"), "1.2"),
        client_ca=clientCA,
        client_auth=clientAuth,
    )
    t.finish()
    return tls


def readBackendTLS(t: Optional[_Table]) -> Optional[BackendTLSConfig]:
    """A pool's C{tls}: verify its servers, and present a client certificate to them."""
    from txlb.net.tls import CertificateError, backendCA, checkCertificate

    if t is None:
        return None
    tls = BackendTLSConfig(
        verify=t.get("verify", _boolean, True),
        ca=_file(t, "ca"),
        server_name=t.get("server_name", _string, None),
        cert=_file(t, "cert"),
        key=_file(t, "key"),
    )
    if tls.ca is not None and not _hasProblems(t, "ca"):
        try:
            backendCA(tls.ca)
        except CertificateError as e:
            t.error("ca", str(e))
    if (tls.cert is None) != (tls.key is None):
        t.error("cert" if tls.cert is None else "key", "cert and key go together (mutual TLS)")
    elif tls.cert and tls.key and not _hasProblems(t):
        try:
            checkCertificate(tls.cert, tls.key)
        except CertificateError as e:
            t.error("cert", str(e))
    t.finish()
    return tls


def describeTLS(service) -> list[str]:
    """The C{--check} summary's lines for a service's C{tls}."""
    tls = service.tls
    if tls is None:
        return []
    count = len(tls.certificates)
    lines = [f"TLS {tls.min_version} or later, {count} certificate{'s' if count != 1 else ''} (chosen by SNI)"]
    asked = {(c.client_ca, c.client_auth) for c in tls.certificates}
    if len(asked) == 1:
        [(ca, auth)] = asked
        if ca is not None:
            lines.append(f"client certificates {auth}, signed by {ca}")
        return lines
    for i, c in enumerate(tls.certificates):
        what = (f"client certificates {c.client_auth}, signed by {c.client_ca}" if c.client_ca
                else "no client certificates")
        lines.append(f"certificates[{i}] ({os.path.basename(c.cert)}): {what}")
    lines.append("TLS sessions are not resumed: the certificates ask different things of clients")
    return lines
