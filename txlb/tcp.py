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

To a pool with C{tls}, a server is connected once the TLS handshake is
done: a handshake that fails (the server's certificate, or its TLS
refusing ours) is a failed connect like a refused one, named as HTTP
pools name it (L{txlb.net.tls.handshakeError}), and the next server is
tried.  Those connections are never spliced: the bytes are encrypted here.

Plaintext connections to a server with a literal IP address take a shorter
road: the backend socket is connected directly (L{txlb.net.connect}) and both
sockets are handed to the kernel (L{txlb.net.splice}) without a Twisted
transport for the backend.  The rules (backpressure, half-close, retries,
accounting) are the same on both roads.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IReactorFDSet
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.balance.pool import Pool, Server
from txlb.interfaces import IEarlyBytes, PickContext
from txlb.net.connect import Deadlines, PendingConnect, connectSocket
from txlb.net.drain import OpenConnections
from txlb.net.endpoints import EndpointCache, connectFailure
from txlb.net.proxyproto import WRITERS
from txlb.net.splice import SplicePair, loopFor, spliceable
from txlb.net.tls import handshakeError
from txlb.observe.logs import emit
from txlb.policy.access import DENY

_log = Logger(namespace="txlb.tcp")

#: The idle check runs this many times per idle timeout: a connection is
#: closed between one and 1 + 1/IDLE_CHECKS idle timeouts after its last byte.
IDLE_CHECKS = 8


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
        proxyProtocol: Optional[str] = None,
    ) -> None:
        self.service = service
        self.pool = pool
        self.endpoints = endpoints
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.accessLog = accessLog
        #: A L{txlb.observe.metrics.Metrics} to count connections in, or L{None}.
        self.metrics = metrics
        #: A L{txlb.balance.sticky.Sticky} (C{ip} mode), or L{None}.
        self.sticky = sticky
        #: Hand plaintext connections to the kernel (L{txlb.net.splice}) where it can.
        self.splice = splice
        #: C{"v1"} or C{"v2"}: a PROXY header naming the client starts each
        #: backend connection (L{txlb.net.proxyproto}); L{None}: none.
        self.proxyProtocol = proxyProtocol
        #: The reactor to watch directly connected sockets with, if it can.
        self.fdReactor = endpoints.reactor if IReactorFDSet.providedBy(endpoints.reactor) else None
        self.open: OpenConnections[Frontend] = OpenConnections(
            clock, lambda frontend: frontend.abort("shutdown timeout")
        )
        #: Connect timeouts of every connection of this service: one timer.
        self.connecting = Deadlines(clock)
        self._idleCall = None
        #: Open connections by client address, while C{max_connections_per_client} is set.
        self.perClient: dict[str, int] = {}

    def drain(self, timeout: float) -> Deferred:
        """See L{OpenConnections.drain}; the caller has stopped listening."""
        return self.open.drain(timeout)

    noisy = False
    #: The service's C{allow}/C{deny} (a L{txlb.policy.access.AccessList})
    #: and per-client C{limits} (a L{txlb.policy.ratelimit.ConnectionLimits}),
    #: or L{None}; set, and replaced by reloads, by L{txlb.service}.
    access = None
    connectionLimits = None
    #: The service's TLS asks clients for certificates: a connection picks
    #: its server only once its handshake (the certificate) has passed.
    clientCerts = False

    def admit(self, frontend: "Frontend") -> Optional[str]:
        """
        Why a new connection is refused (C{deny}, C{max_connections_per_client},
        C{connection_rate}), before any server is picked, or L{None}.  The
        client is the transport's peer: the PROXY header's client when the
        service reads one.
        """
        access, limits = self.access, self.connectionLimits
        if access is None and limits is None:
            return None
        client = getattr(frontend.transport.getPeer(), "host", None) or frontend.client
        if access is not None and not access.allows(client):
            reason = DENY
        elif limits is not None:
            perClient = self.perClient
            reason = limits.admit(client, perClient.get(client, 0))
            if reason is None and limits.maxPerClient:
                perClient[client] = perClient.get(client, 0) + 1
                frontend.counted = client
        else:
            reason = None
        if reason is not None and self.metrics is not None:
            self.metrics.refused(self.service, reason)
        return reason

    def _uncount(self, client: str) -> None:
        left = self.perClient.get(client, 1) - 1
        if left > 0:
            self.perClient[client] = left
        else:
            self.perClient.pop(client, None)

    def buildProtocol(self, addr) -> "Frontend":
        return Frontend(self, getattr(addr, "host", None) or str(addr))

    def _opened(self, frontend: "Frontend") -> None:
        self.open.add(frontend)
        if self.metrics is not None:
            self.metrics.connectionStarted(self.service)
        if self.idleTimeout and self._idleCall is None:
            self._idleCall = self.clock.callLater(self.idleTimeout / IDLE_CHECKS, self._checkIdle)

    def _checkIdle(self) -> None:
        """
        Close the connections idle for C{idleTimeout}: one timer for the
        whole service, rather than one per connection set and cancelled.
        """
        self._idleCall = None
        limit = self.idleTimeout
        now = time.monotonic()
        # A client waiting in the pool's queue or for a connect is bounded
        # by queue_timeout and connect_timeout instead; one still in its TLS
        # handshake (client certificates) by this.
        idle = [f for f in self.open.open
                if (f.serverConnected or f._awaitingHandshake) and now - f._lastActivity >= limit]
        for frontend in idle:
            frontend.abort("idle timeout")
        if self.open.open:
            self._idleCall = self.clock.callLater(limit / IDLE_CHECKS, self._checkIdle)


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, frontend: "Frontend", tls: bool = False) -> None:
        self.frontend = frontend
        self.tls = tls

    def buildProtocol(self, addr) -> "Backend":
        return Backend(self.frontend, self.tls)


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


class _TwistedConnect:
    """
    A connect through a Twisted endpoint, cancellable with a reason like a
    L{PendingConnect}.  Over TLS it lasts until the handshake is done
    (L{Backend.handshakeCompleted}) or has failed (L{Backend.connectionLost}).
    """

    #: Over TLS, the backend whose handshake runs (TCP is connected).
    backend: Optional["Backend"] = None

    def __init__(self, frontend: "Frontend", d: Deferred, tls: bool = False) -> None:
        self.frontend = frontend
        self.why: Optional[str] = None
        self.d = d
        self.tls = tls

    def start(self) -> None:
        self.d.addCallbacks(self._connected, self._failed)

    def _connected(self, backend: "Backend") -> None:
        if self.tls:
            self.backend = backend
        else:
            self.frontend._connected()

    def _failed(self, failure: Failure) -> None:
        self.frontend._connectFailed(self.why or connectFailure(failure))

    def cancel(self, why: str = "connect cancelled") -> None:
        self.why = why
        if self.backend is not None:
            self.backend.transport.abortConnection()  # its connectionLost says why
        else:
            self.d.cancel()


@implementer(IHalfCloseableProtocol, IEarlyBytes, IHandshakeListener)
class Frontend(_Side):
    """
    The client's side.  Reading is paused while no backend is connected, so
    nothing is buffered while we connect.
    """

    backend: Optional["Backend"] = None
    server: Optional[Server] = None
    #: The connection's sticky state (a L{txlb.balance.sticky.Affinity}), if any.
    affinity = None
    #: Servers whose connect failed, in order.
    tried: tuple[Server, ...] = ()
    bytesIn = 0
    bytesOut = 0
    error: Optional[str] = None
    reason = ""
    clientEOF = False
    serverEOF = False
    #: A server is connected (and counted active until the end).  Not
    #: Twisted's C{connected}, which every protocol has set from its start.
    serverConnected = False
    gotFirstByte = False
    closed = False
    #: The kernel moves the bytes (L{txlb.net.splice}).
    spliced = False
    splice: Optional[SplicePair] = None
    _connecting = None
    _waiter = None
    _paused = False
    _lastActivity = 0.0
    _connectTimeout = 0.0
    #: Why the connection was refused at accept, if it was; the client
    #: address it is counted under (C{max_connections_per_client}).
    refused: Optional[str] = None
    counted: Optional[str] = None
    #: The client's bytes that came before the connection (after its PROXY
    #: header, or with the end of its TLS handshake).
    early = b""
    #: The backend waits for the TLS handshake (L{TCPBalancerFactory.clientCerts}).
    _awaitingHandshake = False

    def __init__(self, factory: TCPBalancerFactory, client: str) -> None:
        self.factory = factory
        self.client = client

    def earlyBytes(self, data: bytes) -> None:
        self.early = data

    def _firstBytes(self) -> bytes:
        """
        What the server gets ahead of the client's stream: our PROXY header
        naming the client (C{proxy_protocol}), then the client's early bytes.
        """
        writer = WRITERS.get(self.factory.proxyProtocol)
        first = writer(self.transport.getPeer(), self.transport.getHost()) if writer is not None else b""
        early = self.early
        if early:
            self.early = b""
            self.bytesIn += len(early)
            self.factory.pool.observeBytes(self.server, len(early), 0)
            first += early
        return first

    def connectionMade(self) -> None:
        factory = self.factory
        self.started = factory.clock.seconds()
        factory._opened(self)
        self.refused = factory.admit(self)
        if self.refused is not None:
            self.transport.abortConnection()
            return
        #: Connect the backend socket ourselves and splice it (see the module).
        self._direct = factory.splice and factory.fdReactor is not None and spliceable(self.transport)
        if factory.clientCerts:
            # No server is picked, nor connected to, for a client whose
            # certificate may yet be refused; the idle timeout bounds the wait.
            self._awaitingHandshake = True
            self._lastActivity = time.monotonic()
            self.dataReceived = self._beforeBackend
            return
        self._connect()

    def handshakeCompleted(self) -> None:
        """TLS is up, the client's certificate (if asked for) verified: now a server."""
        if self._awaitingHandshake:
            self._awaitingHandshake = False
            if not self.closed:
                self._connect()

    def _beforeBackend(self, data: bytes) -> None:
        """
        Bytes that came in the read that ended the handshake, before any
        backend: kept for it (L{_firstBytes}), as a PROXY header's early bytes are.
        """
        if self.backend is None:
            self.early += data
            return
        del self.dataReceived
        self.dataReceived(data)

    def _pause(self) -> None:
        """Stop reading the client while it waits for a server."""
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _connect(self) -> None:
        pool = self.factory.pool
        sticky = self.factory.sticky
        if sticky is not None:
            affinity = self.affinity
            if affinity is None:
                affinity = self.affinity = sticky.affinity(self.client)
                if affinity.pending is not None:
                    self._pause()
                    affinity.pending.addCallback(self._stickyFound)
                    return
            decision = sticky.choose(pool, affinity, self.tried)
            if decision is not None:
                self._use(decision)
                return
        context = PickContext(self.client)
        decision = pool.pick(context, self.tried)
        if decision is None and pool.saturated(self.tried):
            self._pause()
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
        factory = self.factory
        pool = factory.pool
        if decision is None:
            self.error = (
                f"no server of pool {pool.name} available"
                if not self.tried
                else f"connect failed to {', '.join(s.name for s in self.tried)}"
            )
            self.transport.loseConnection()
            return
        server = self.server = decision.server
        self.reason = decision.reason
        self.connectStarted = factory.clock.seconds()
        plain = factory.endpoints.plainTCP(server.address, pool.tls) if self._direct else None
        if plain is not None:
            self._connectSocket(*plain)
            return
        self._pause()
        tls = pool.tls is not None
        d = factory.endpoints.get(server.address, pool.tls).connect(_BackendFactory(self, tls))
        connecting = self._connecting = _TwistedConnect(self, d, tls)
        connecting.start()
        if self._connecting is connecting:  # not over already
            self._connectTimeout = pool.connectTimeout
            factory.connecting.add(self, pool.connectTimeout, self._connectTimedOut)

    def _connectSocket(self, family: int, address: tuple, timeout: float) -> None:
        """The direct road: a socket of our own, spliced once connected."""
        sock, err = connectSocket(family, address)
        if sock is None:
            self._connectFailed(os.strerror(err))
        elif not err:
            self._socketConnected(sock)
        else:
            self._pause()
            pending = self._connecting = PendingConnect(
                loopFor(self.factory.fdReactor), sock, self._socketConnected, self._connectFailed
            )
            pending.start()
            timeout = self._connectTimeout = min(timeout, self.factory.pool.connectTimeout)
            self.factory.connecting.add(self, timeout, self._connectTimedOut)

    def _connectTimedOut(self) -> None:
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel(f"timed out after {self._connectTimeout:g}s")

    def _socketConnected(self, sock) -> None:
        self._connected()
        transport = self.transport
        if not self._paused:
            transport.stopReading()
        self._lastActivity = time.monotonic()
        self.spliced = True
        self.splice = SplicePair(self.factory.fdReactor, transport.socket, sock, self._spliced, self._spliceEnded)
        self.splice.start(self._firstBytes())

    def _connected(self) -> None:
        """A server accepted the connection: it is ours until the end."""
        self._connecting = None
        self.factory.connecting.discard(self)
        self.serverConnected = True
        self.factory.pool.reportResult(self.server, True)
        if self.affinity is not None:
            self.factory.sticky.answered(self.affinity, self.server, self.client)

    def _connectFailed(self, why: str) -> None:
        self._connecting = None
        factory = self.factory
        factory.connecting.discard(self)
        server, self.server = self.server, None
        pool = factory.pool
        pool.release(server)
        if self.closed:
            return  # the client left while we were connecting: not the server's fault
        pool.connectFailed(server)
        self.tried = (*self.tried, server)
        _log.info(
            "connect to {server} failed: {why}",
            event="connect_failed",
            service=factory.service,
            pool=pool.name,
            server=server.name,
            why=why,
        )
        if len(self.tried) <= pool.retries:
            self._connect()
        else:
            self.error = f"connect failed to {', '.join(s.name for s in self.tried)}"
            self.transport.loseConnection()

    def backendConnected(self, backend: "Backend") -> None:
        """
        The Twisted road: splice the two transports, each the other's
        producer (or hand their sockets to the kernel).
        """
        self.backend = backend
        self._lastActivity = time.monotonic()
        if self.factory.splice and spliceable(self.transport) and spliceable(backend.transport):
            self._startSplice(backend)
        else:
            first = self._firstBytes()
            if first:
                backend.transport.write(first)
            backend.transport.registerProducer(self.transport, True)
            self.transport.registerProducer(backend.transport, True)
            self.hasProducer = backend.hasProducer = True
            self.transport.resumeProducing()

    def _startSplice(self, backend: "Backend") -> None:
        for transport in (self.transport, backend.transport):
            transport.stopReading()
            transport.stopWriting()
        self.spliced = True
        self.splice = SplicePair(
            self.transport.reactor, self.transport.socket, backend.transport.socket, self._spliced, self._spliceEnded
        )
        self.splice.start(self._firstBytes())

    def _spliced(self, toServer: int, toClient: int) -> None:
        """Bytes moved by the kernel: the same accounting as L{dataReceived}."""
        self._lastActivity = time.monotonic()
        self.bytesIn += toServer
        if toClient:
            self.bytesOut += toClient
            if not self.gotFirstByte:
                self._firstByte()
        self.factory.pool.observeBytes(self.server, toServer, toClient)

    def _firstByte(self) -> None:
        """The server's first byte: its response time."""
        if not self.gotFirstByte:
            self.gotFirstByte = True
            self.factory.pool.observeResponseTime(self.server, self.factory.clock.seconds() - self.connectStarted)

    def _spliceEnded(self, error: Optional[str]) -> None:
        """Both sockets are closed: what the two C{connectionLost}s would do."""
        self.closed = True
        self.splice = None
        self._released()
        if self.backend is not None:
            self.backend.closed = True
        self._finished()
        # The abandoned transports point back at their protocols: let
        # reference counting free them all now rather than the cyclic GC.
        self.transport.protocol = None
        if self.backend is not None:
            self.backend.transport.protocol = None

    def _released(self) -> None:
        """The server's connection is over: it is no longer active."""
        # Without an answer the time to first byte is unknown: the connect time stands in.
        self._firstByte()
        self.factory.pool.release(self.server)

    def abort(self, why: str) -> None:
        """Close both connections now, losing what is buffered."""
        self.error = why
        if self.splice is not None:
            self.splice.abort(why)
            return
        self.transport.abortConnection()
        if self.backend is not None and not self.backend.closed:
            self.backend.transport.abortConnection()

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
        if self.counted is not None:
            factory._uncount(self.counted)
        server = self.server if self.serverConnected else None
        if factory.metrics is not None:
            retried = min(len(self.tried), factory.pool.retries)
            factory.metrics.request(
                factory.service, factory.pool, server, 0, None, self.bytesIn, self.bytesOut, retried, None, self.reason
            )
        if not factory.accessLog:
            return
        fields = dict(
            service=factory.service,
            pool=factory.pool.name,
            selectedServer=server.name if server is not None else None,
            client=self.client,
            bytesIn=self.bytesIn,
            bytesOut=self.bytesOut,
            durationMs=round((factory.clock.seconds() - self.started) * 1000, 3),
            retries=len(self.tried),
            splice=self.spliced,
        )
        if self.error:
            fields["error"] = self.error
        if self.refused is not None:
            fields["refused"] = self.refused  # turned away at accept (txlb.policy)
        emit(_log, "connection", fields)


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Backend(_Side):
    """
    The server's side of one connection made through a Twisted endpoint.
    Over TLS (C{tls}), it starts once the handshake is done.
    """

    #: The TLS handshake is done.
    handshaken = False

    def __init__(self, frontend: Frontend, tls: bool = False) -> None:
        self.frontend = frontend
        self.server = frontend.server
        self.pool = frontend.factory.pool
        self.closed = False
        self.tls = tls

    def connectionMade(self) -> None:
        if not self.tls:
            self.frontend.backendConnected(self)

    def handshakeCompleted(self) -> None:
        """The server's certificate verified (and ours taken): now it is connected."""
        frontend = self.frontend
        if getattr(self.transport, "disconnecting", False):
            # Refused as it was reported done: older Twisted checks the
            # server's name only then.  Its connectionLost says why.
            return
        if frontend.closed:  # the client left meanwhile: a connect called off
            self.transport.abortConnection()
            return
        self.handshaken = True
        frontend._connected()
        frontend.backendConnected(self)

    def _handshakeFailed(self, reason: Optional[Failure]) -> None:
        """The connection ended before its TLS handshake did: a failed connect."""
        frontend = self.frontend
        connecting = frontend._connecting
        why = connecting.why if connecting is not None else None
        if why is None:
            failedTLS = handshakeError(reason) if reason is not None else None
            why = (f"TLS with {self.server.name} failed: {failedTLS}" if failedTLS
                   else f"{self.server.name} closed the connection during the TLS handshake")
        frontend._connectFailed(why)

    def dataReceived(self, data: bytes) -> None:
        frontend = self.frontend
        if not frontend.gotFirstByte:
            frontend._firstByte()
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

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        frontend = self.frontend
        if self.tls:
            if not self.handshaken:
                self._handshakeFailed(reason)
                return
            failedTLS = handshakeError(reason) if reason is not None and not frontend.gotFirstByte else None
            if failedTLS is not None and not frontend.error:
                # Right after the handshake, before the server said a word:
                # a TLS 1.3 server judges the client's certificate only once
                # the client's side is done.  It never served: passive
                # detection counts it.
                frontend.error = f"TLS with {self.server.name} failed: {failedTLS}"
                self.pool.connectFailed(self.server)
        frontend._released()
        if frontend.closed:
            frontend._finished()
        else:
            frontend.closeWriting(full=True)
