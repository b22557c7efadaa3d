# -*- test-case-name: tests.test_tcp -*-
"""
The TCP balancer: a client connection spliced to one backend connection.

This is L{twisted.protocols.portforward}'s idea with a scheduler in front:
each side is a protocol holding its peer, and each transport is registered
as the producer of the other, so a slow reader pauses the fast writer and
txlb never buffers more than a transport's buffer per direction.  Added
here: a pick from the pool per connection, a different server tried when a
connect fails, half-close passed through both ways, an idle timeout, and
exact accounting (active connections, bytes, time to first byte).
"""

from __future__ import annotations

import time
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.drain import OpenConnections
from txlb.endpoints import EndpointCache
from txlb.interfaces import PickContext
from txlb.pool import Pool, Server
from txlb.splice import SplicePair, spliceable

_log = Logger(namespace="txlb.tcp")


class TCPBalancerFactory(Factory):
    """
    Accepts client connections for one TCP service.

    @param clock: an C{IReactorTime} for timeouts and durations.
    @param idleTimeout: seconds without a byte either way before both
        connections are closed; 0 disables it.
    """

    def __init__(
        self,
        service: str,
        pool: Pool,
        endpoints: EndpointCache,
        clock,
        *,
        idleTimeout: float = 0.0,
        accessLog: bool = True,
        metrics=None,
        sticky=None,
        splice: bool = True,
    ) -> None:
        self.service = service
        self.pool = pool
        self.endpoints = endpoints
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.accessLog = accessLog
        #: A L{txlb.metrics.Metrics} to count connections in, or L{None}.
        self.metrics = metrics
        #: A L{txlb.sticky.Sticky} (C{ip} mode), or L{None}.
        self.sticky = sticky
        #: Hand plaintext connections to the kernel (L{txlb.splice}) where it can.
        self.splice = splice
        self.open: OpenConnections[Frontend] = OpenConnections(
            clock, lambda frontend: frontend.abort("shutdown timeout")
        )

    def drain(self, timeout: float) -> Deferred:
        """See L{OpenConnections.drain}; the caller has stopped listening."""
        return self.open.drain(timeout)

    noisy = False

    def buildProtocol(self, addr) -> "Frontend":
        return Frontend(self, getattr(addr, "host", str(addr)))


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, frontend: "Frontend") -> None:
        self.frontend = frontend

    def buildProtocol(self, addr) -> "Backend":
        return Backend(self.frontend)


class _Side(Protocol):
    """
    What both sides share: closing our transport's writing half (or all of
    it) after dropping the peer as its producer, because a transport that
    still has a paused producer resumes it instead of closing.
    """

    hasProducer = False

    def closeWriting(self, full: bool) -> None:
        if self.hasProducer:
            self.hasProducer = False
            self.transport.unregisterProducer()
        if full:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()


@implementer(IHalfCloseableProtocol)
class Frontend(_Side):
    """
    The client's side.  Reading is paused until a backend is connected, so
    nothing is buffered while we connect.
    """

    backend: Optional["Backend"] = None
    server: Optional[Server] = None
    #: The connection's sticky state (a L{txlb.sticky.Affinity}), if any.
    affinity = None

    def __init__(self, factory: TCPBalancerFactory, client: str) -> None:
        self.factory = factory
        self.client = client
        self.tried: list[Server] = []
        self.bytesIn = 0
        self.bytesOut = 0
        self.error: Optional[str] = None
        self.reason = ""
        self.clientEOF = False
        self.serverEOF = False
        self.closed = False
        self._connecting = None
        self._waiter = None
        self._idleCall = None
        self._lastActivity = time.monotonic()

    def connectionMade(self) -> None:
        self.started = self.factory.clock.seconds()
        self.factory.open.add(self)
        if self.factory.metrics is not None:
            self.factory.metrics.connectionStarted(self.factory.service)
        self.transport.pauseProducing()
        self._connect()

    def _connect(self) -> None:
        pool = self.factory.pool
        sticky = self.factory.sticky
        if sticky is not None:
            affinity = self.affinity
            if affinity is None:
                affinity = self.affinity = sticky.affinity(self.client)
                if affinity.pending is not None:
                    affinity.pending.addCallback(self._stickyFound)
                    return
            decision = sticky.choose(pool, affinity, self.tried)
            if decision is not None:
                self._use(decision)
                return
        context = PickContext(self.client)
        decision = pool.pick(context, self.tried)
        if decision is None and pool.saturated(self.tried):
            self._waiter = pool.enqueue(context, self.tried, self._dequeued)
            return
        self._use(decision)

    def _stickyFound(self, _) -> None:
        if not self.closed:
            self._connect()

    def _dequeued(self, decision) -> None:
        self._waiter = None
        if decision is None:
            self.error = f"every server of pool {self.factory.pool.name} stayed at max_connections"
            self.transport.loseConnection()
            return
        self._use(decision)

    def _use(self, decision) -> None:
        pool = self.factory.pool
        if decision is None:
            self.error = (
                f"no server of pool {pool.name} available"
                if not self.tried
                else f"connect failed to {', '.join(s.name for s in self.tried)}"
            )
            self.transport.loseConnection()
            return
        self.server = decision.server
        self.reason = decision.reason
        self.connectStarted = self.factory.clock.seconds()
        d = self.factory.endpoints.get(self.server.address, pool.tls).connect(_BackendFactory(self))
        d.addTimeout(pool.connectTimeout, self.factory.clock)
        self._connecting = d
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, backend: "Backend") -> None:
        self._connecting = None
        self.factory.pool.reportResult(backend.server, True)
        if self.affinity is not None:
            self.factory.sticky.answered(self.affinity, backend.server, self.client)

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        server, self.server = self.server, None
        pool = self.factory.pool
        pool.release(server)
        if self.closed:
            return  # the client left while we were connecting: not the server's fault
        pool.connectFailed(server)
        self.tried.append(server)
        _log.info(
            "connect to {server} failed: {why}",
            event="connect_failed",
            service=self.factory.service,
            pool=pool.name,
            server=server.name,
            why=failure.getErrorMessage(),
        )
        if len(self.tried) <= pool.retries:
            self._connect()
        else:
            self.error = f"connect failed to {', '.join(s.name for s in self.tried)}"
            self.transport.loseConnection()

    def backendConnected(self, backend: "Backend") -> None:
        """
        Splice the two transports: each is the other's producer.
        """
        self.backend = backend
        if self.factory.splice and spliceable(self.transport) and spliceable(backend.transport):
            self._startSplice(backend)
        else:
            backend.transport.registerProducer(self.transport, True)
            self.transport.registerProducer(backend.transport, True)
            self.hasProducer = backend.hasProducer = True
            self.transport.resumeProducing()
        if self.factory.idleTimeout:
            self._idleCall = self.factory.clock.callLater(self.factory.idleTimeout, self._checkIdle)

    # The kernel path: both sockets taken from Twisted's transports.

    splice: Optional[SplicePair] = None

    def _startSplice(self, backend: "Backend") -> None:
        for transport in (self.transport, backend.transport):
            transport.stopReading()
            transport.stopWriting()
        self.splice = SplicePair(
            self.factory.clock, self.transport.socket, backend.transport.socket, self._spliced, self._spliceEnded
        )
        self.splice.start()

    def _spliced(self, toServer: int, toClient: int) -> None:
        """Bytes moved by the kernel: the same accounting as L{dataReceived}."""
        self._lastActivity = time.monotonic()
        self.bytesIn += toServer
        if toClient:
            self.bytesOut += toClient
            self.backend._firstByte()
        self.factory.pool.observeBytes(self.server, toServer, toClient)

    def _spliceEnded(self, error: Optional[str]) -> None:
        """Both sockets are closed: what the two C{connectionLost}s would do."""
        self.closed = True
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        self.backend._ended()
        self._finished()

    def abort(self, why: str) -> None:
        """Close both connections now, losing what is buffered."""
        self.error = why
        if self.splice is not None:
            self.splice.abort(why)
            return
        self.transport.abortConnection()
        if self.backend is not None and not self.backend.closed:
            self.backend.transport.abortConnection()

    def _checkIdle(self) -> None:
        idle = time.monotonic() - self._lastActivity
        remaining = self.factory.idleTimeout - idle
        if remaining > 0:
            self._idleCall = self.factory.clock.callLater(remaining, self._checkIdle)
            return
        self._idleCall = None
        self.abort("idle timeout")

    # Bytes from the client.

    def dataReceived(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self._lastActivity = time.monotonic()
        self.backend.transport.write(data)
        self.factory.pool.observeBytes(self.server, len(data), 0)

    def readConnectionLost(self) -> None:
        """The client sent EOF: pass it on, keep the other direction open."""
        self.clientEOF = True
        if self.backend is not None:
            if self.serverEOF:
                self.closeBoth()
            else:
                self.backend.closeWriting(full=False)

    def writeConnectionLost(self) -> None:
        pass

    def closeBoth(self) -> None:
        """Close both connections once what each has buffered is written."""
        self.closeWriting(full=True)
        self.backend.closeWriting(full=True)

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
            self._idleCall = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self._waiter is not None:
            self.factory.pool.cancel(self._waiter)
        if self.backend is not None and not self.backend.closed:
            self.backend.closeWriting(full=True)
        else:
            self._finished()

    def _finished(self) -> None:
        """Both sides are closed: the connection event."""
        factory = self.factory
        factory.open.remove(self)
        if factory.metrics is not None:
            retried = min(len(self.tried), factory.pool.retries)
            server = self.backend.server if self.backend else None
            factory.metrics.request(
                factory.service, factory.pool, server, 0, None, self.bytesIn, self.bytesOut, retried, None, self.reason
            )
        if not self.factory.accessLog:
            return
        fields = dict(
            service=self.factory.service,
            pool=self.factory.pool.name,
            selectedServer=self.backend.server.name if self.backend else None,
            client=self.client,
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
            durationMs=round((self.factory.clock.seconds() - self.started) * 1000, 3),
            retries=len(self.tried),
            splice=self.splice is not None,
        )
        if self.error:
            fields["error"] = self.error
        _log.info("connection", event="connection", **fields)


@implementer(IHalfCloseableProtocol)
class Backend(_Side):
    """The server's side of one spliced connection."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.server = frontend.server
        self.pool = frontend.factory.pool
        self.closed = False
        self.gotFirstByte = False

    def connectionMade(self) -> None:
        self.frontend.backendConnected(self)

    def _firstByte(self) -> None:
        if not self.gotFirstByte:
            self.gotFirstByte = True
            self.pool.observeResponseTime(
                self.server, self.frontend.factory.clock.seconds() - self.frontend.connectStarted
            )

    def dataReceived(self, data: bytes) -> None:
        frontend = self.frontend
        self._firstByte()
        frontend.bytesOut += len(data)
        frontend._lastActivity = time.monotonic()
        frontend.transport.write(data)
        self.pool.observeBytes(self.server, 0, len(data))

    def readConnectionLost(self) -> None:
        """The server sent EOF: pass it on to the client."""
        frontend = self.frontend
        frontend.serverEOF = True
        if frontend.clientEOF:
            frontend.closeBoth()
        else:
            frontend.closeWriting(full=False)

    def writeConnectionLost(self) -> None:
        pass

    def _ended(self) -> None:
        self.closed = True
        # Without an answer the time to first byte is unknown: the connect time stands in.
        self._firstByte()
        self.pool.release(self.server)

    def connectionLost(self, reason: Failure = None) -> None:
        self._ended()
        frontend = self.frontend
        if frontend.closed:
            frontend._finished()
        else:
            frontend.closeWriting(full=True)
