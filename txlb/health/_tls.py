# -*- test-case-name: tests.test_health -*-
"""
TLS for the built-in checks: C{options = { tls = true, ... }} makes the
C{tcp} check a TLS handshake and the C{http} check an HTTPS request.

    tls = true                 # speak TLS to the server
    server_name = "api.internal"   # SNI and the name the certificate must
                                   # carry; default: the address's host
    verify = true              # check the certificate (default true)
    ca = "ca.pem"              # trust this CA (PEM) instead of the system's
"""

from __future__ import annotations

from typing import Mapping, Optional

from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS, platformTrust

from txlb.health._options import isBool, isHostName, isString, option
from txlb.interfaces import HealthCheckOptionsError

#: The options this module reads.
TLS_OPTIONS = frozenset({"tls", "server_name", "verify", "ca"})


class TLSOptions:
    """How to wrap a check's connection in TLS; connection creators are
    made once per server name and reused."""

    def __init__(self, serverName: Optional[str], verify: bool, trustRoot: Optional[Certificate]) -> None:
        self.serverName = serverName
        self.verify = verify
        self.trustRoot = trustRoot
        self._creators: dict[str, object] = {}

    def wrap(self, endpoint, host: str):
        """C{endpoint}, speaking TLS to C{host} (or C{server_name})."""
        name = self.serverName or host or "localhost"
        creator = self._creators.get(name)
        if creator is None:
            if self.verify:
                trust = self.trustRoot if self.trustRoot is not None else platformTrust()
                creator = optionsForClientTLS(name, trustRoot=trust)
            else:
                creator = CertificateOptions(verify=False)
            creator = self._creators[name] = creator
        return wrapClientTLS(creator, endpoint)


def tlsOptions(options: Mapping[str, object]) -> Optional[TLSOptions]:
    """
    Read the TLS options of a check, or L{None} when C{tls} is not set.

    @raise HealthCheckOptionsError: a TLS option has the wrong type, the
        C{ca} file cannot be read, or TLS options are given without
        C{tls = true}.
    """
    tls = option(options, "tls", False, isBool, "true or false")
    given = sorted((TLS_OPTIONS - {"tls"}) & set(options))
    if not tls:
        if given:
            raise HealthCheckOptionsError(f"{', '.join(given)} only apply with tls = true")
        return None
    serverName = option(options, "server_name", None, isHostName, "a host name")
    verify = option(options, "verify", True, isBool, "true or false")
    trustRoot = None
    ca = option(options, "ca", None, isString, "the path of a PEM file")
    if ca is not None:
        try:
            with open(ca, "rb") as f:
                trustRoot = Certificate.loadPEM(f.read())
        except Exception as e:
            raise HealthCheckOptionsError(f"ca: cannot read a PEM certificate from {ca!r} ({e})")
    return TLSOptions(serverName, verify, trustRoot)
