# -*- test-case-name: tests.test_endpoints -*-
"""
Addresses as Twisted endpoint strings, checked with Twisted's own parsers.

An operator writes every listen and connect address as an endpoint string
(C{tcp:8080:interface=127.0.0.1}, C{tcp:host=10.0.0.5:port=9001},
C{unix:/run/app.sock}); a server address may also be the familiar
C{host:port}, which is turned into the equivalent C{tcp:} string here so
that the rest of txlb only ever sees endpoint strings.
"""

from __future__ import annotations

import re

from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint


class EndpointError(ValueError):
    """An address that Twisted cannot parse; the message says why."""


class _NoReactor:
    """
    Stands in for the reactor while an endpoint string is only parsed: the
    parsers store it and do no I/O.
    """


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)")
_ENDPOINT_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9+_-]*:")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def serverAddress(text: str) -> str:
    """
    Normalise a server's address: C{host:port} or C{[v6]:port} become a
    C{tcp:} endpoint string; an endpoint string is checked and kept.

    @raise EndpointError: neither form parses.
    """
    m = _HOST_PORT.fullmatch(text.strip())
    if m is not None and not _isEndpointType(text):
        port = int(m.group("port"))
        if not 0 < port < 65536:
            raise EndpointError(f"port {port} is out of range in {text!r}")
        host = m.group("v6") or m.group("host")
        text = f"tcp:host={_escape(host)}:port={port}"
    checkClient(text)
    return text


def _isEndpointType(text: str) -> bool:
    m = _ENDPOINT_TYPE.match(text)
    return m is not None and m.group()[:-1].lower() in {"tcp", "ssl", "unix", "tls", "tcp6"}


def checkClient(text: str) -> IStreamClientEndpoint:
    """
    @raise EndpointError: C{text} is not a client endpoint string.
    """
    try:
        return clientFromString(_NoReactor(), text)
    except Exception as e:
        raise EndpointError(_explain(text, e, "host:port or a client endpoint like tcp:host=H:port=P"))


def checkServer(text: str) -> IStreamServerEndpoint:
    """
    @raise EndpointError: C{text} is not a server (listening) endpoint string.
    """
    try:
        return serverFromString(_NoReactor(), text)
    except Exception as e:
        raise EndpointError(_explain(text, e, "a listening endpoint like tcp:8080:interface=127.0.0.1"))


def _explain(text: str, error: Exception, expected: str) -> str:
    detail = str(error.args[0]) if error.args else type(error).__name__
    return f"{text!r} is not a valid address ({detail}); expected {expected}"


class EndpointCache:
    """
    Client endpoints by address string, parsed once and reused for every
    connection: parsing on each connect would be wasted work.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._endpoints: dict[str, IStreamClientEndpoint] = {}

    def get(self, address: str) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = clientFromString(self.reactor, address)
        return endpoint
