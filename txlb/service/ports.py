# -*- test-case-name: tests.test_reload -*-
"""
Listening ports and what they accept with.

Each port accepts through an L{Entry} that a reload points at the
service's current factory, so that a port is never closed and reopened for
a change of settings or certificates.  Opening a port happens at once or
not at all (L{listenNow} raises L{ListenError}): a port that cannot be bound
stops txlb with a one-line error instead of a half-started balancer.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from txlb.net.endpoints import isUDP, parseUDPListen
from txlb.udp import MAX_DATAGRAM, UDPListener


class ListenError(SystemExit):
    """A listening endpoint could not be opened: txlb does not start."""


class Entry(Factory):
    """
    What one listening port accepts connections with: the factory of the
    service that owns the port now.  A reload points it elsewhere (new
    certificates, a rebuilt service) without closing the port.
    """

    noisy = False

    def __init__(self, factory: Optional[Factory] = None) -> None:
        self.factory = factory

    def switch(self, factory: Factory) -> None:
        old, self.factory = self.factory, factory
        if self.numPorts and old is not factory:
            factory.doStart()
            if old is not None:
                old.doStop()

    def startFactory(self) -> None:
        if self.factory is not None:
            self.factory.doStart()

    def stopFactory(self) -> None:
        if self.factory is not None:
            self.factory.doStop()

    def buildProtocol(self, addr):
        return None if self.factory is None else self.factory.buildProtocol(addr)


def newEntry(listen: str):
    """What a new listening socket delivers to: an L{Entry}, or a L{UDPListener} for C{udp:}."""
    return UDPListener() if isUDP(listen) else Entry()


LateFailure = Callable[[Failure, str, str], None]


def listenNow(reactor, name: str, listen: str, factory: Factory, late: LateFailure):
    """
    Listen on C{listen} now, or raise L{ListenError}.  Endpoints that
    answer later (not TCP) report a late failure to C{late}, with the
    service's C{name} and C{listen}.
    """
    if isUDP(listen):
        port, interface = parseUDPListen(listen)
        try:
            return reactor.listenUDP(port, factory, interface=interface, maxPacketSize=MAX_DATAGRAM)
        except CannotListenError as e:
            raise ListenError(f"txlb: service {name}: cannot listen on {listen!r}: {e.socketError}")
    d = serverFromString(reactor, listen).listen(factory)
    result: list = []
    d.addBoth(result.append)
    if result:
        if isinstance(result[0], Failure):
            raise ListenError(f"txlb: service {name}: cannot listen on {listen!r}: {result[0].getErrorMessage()}")
        return result[0]
    d.addCallbacks(lambda port: port, late, errbackArgs=(name, listen))
    return d


def stopListening(port) -> Deferred:
    """Close C{port}, or the port a late listen (a L{Deferred}) gives."""
    if isinstance(port, Deferred):
        return port.addCallback(lambda p: p.stopListening() if p is not None else None)
    return maybeDeferred(port.stopListening)
