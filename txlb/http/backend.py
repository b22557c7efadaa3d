# -*- test-case-name: tests.test_http_backend -*-
"""
The server side of the proxy: one L{BackendConnection} per TCP connection
to a server, serving one exchange at a time, and L{BackendConnections},
which keeps the idle ones per server for reuse so that a keep-alive client
costs no new backend connection per request.

A connection reads responses with httptools and hands each event straight
to the exchange that owns it, which streams the body to the client.  It is
only offered for reuse when the response ended cleanly and the server did
not ask to close.

Over TLS a connection counts as made once its handshake is done, so that a
certificate that does not verify, one for another name, or a server that
refuses the handshake fails the connect, saying why (L{txlb.net.tls}), and
another server is tried.  A reload that changes how a pool's servers are
reached (its C{tls}, its C{protocol}, a server's address) retires the
connections made before: L{BackendConnections.retire}.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional, Protocol as TypingProtocol

import httptools
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from service_identity import VerificationError
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.balance.pool import Server
from txlb.http.bodysplice import MIN_SPLICE
from txlb.http.h2backend import H2Backends
from txlb.net.endpoints import EndpointCache
from txlb.net.readloop import adopt
from txlb.net.tls import closedAfterHandshake, handshakeError
from txlb.net.wire import sendNow

#: Bytes asked of one read while a large body streams through Python (one
#: that cannot be spliced: over TLS, chunked, being cached): a quarter of
#: the reads of Twisted's 64 KiB, and about a third less CPU time per byte.
LARGE_READ = 256 * 1024
_DEFAULT_READ = 64 * 1024

#: Idle connections kept per server, and how long one may stay idle.
MAX_IDLE_PER_SERVER = 256
IDLE_TIMEOUT = 30.0


class _Unsupported(Exception):
    """Raised in a parser callback: a response we cannot pass on."""


class ResponseSink(TypingProtocol):
    """What a backend connection reports to (the exchange)."""

    def interimResponse(self, status: int, reason: bytes, headers: list) -> None: ...
    def responseHead(self, status: int, reason: bytes, headers: list, keepAlive: bool) -> None: ...
    #: What encodes the response body (L{txlb.http.compress.Encoder}), if anything.
    encoder: object

    def responseBody(self, data: bytes) -> None: ...
    def responseRead(self) -> None: ...
    def responseEnd(self, reusable: bool) -> None: ...
    def spliceBody(self, left: int) -> None: ...
    def upgraded(self, data: bytes) -> None: ...
    def pipeData(self, data: bytes) -> None: ...
    def backendFailed(self, message: str, gotBytes: bool, unprocessed: bool = False,
                      refused: bool = False) -> None: ...


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class BackendConnection(Protocol):
    """
    One connection to a server.

    @ivar exchange: the exchange being served, or L{None} while idle.
    @ivar reused: this connection served an earlier exchange: a close
        before any byte of the answer may just be the server timing out
        an idle connection, so the request may be replayed on a fresh one.
    @ivar whenReady: over TLS, fires with this connection once the
        handshake is done, or fails with a C{ConnectError} saying why the
        handshake failed; L{None} on plaintext.
    @ivar generation: how the server was reached when this connection was
        asked for (L{BackendConnections.retire}).
    """

    exchange: Optional[ResponseSink] = None
    #: The response being read: chunked, or its Content-Length as sent.
    chunked = False
    lengthValue: Optional[bytes] = None
    reused = False
    piping = False
    closed = False
    #: The L{txlb.http.bodysplice.BodySplice} moving this response's body,
    #: while one does.
    splice = None
    #: The response's Content-Length (-1: none), and how much of its body
    #: the parser has seen.
    length = -1
    bodyRead = 0
    #: Twisted's read size before this response raised it to LARGE_READ.
    _readSize = None
    whenReady: Optional[Deferred] = None
    #: The TLS handshake completed.
    handshaken = False

    def __init__(self, server: Server, owner: "BackendConnections", tls: bool = False, generation: int = 0) -> None:
        self.server = server
        self.owner = owner
        self.generation = generation
        if tls:
            self.whenReady = Deferred(lambda _: self.transport.abortConnection())
        self.idleSince = 0.0
        self.parser = None
        #: The parser ended its last message where llhttp thinks it ended,
        #: so it can read the next response (not after HEAD, say).
        self._clean = False

    def connectionMade(self) -> None:
        adopt(self.transport)

    def handshakeCompleted(self) -> None:
        self.handshaken = True
        ready = self.whenReady
        if ready is not None and not ready.called:
            ready.callback(self)

    # Serving an exchange.

    def send(self, exchange: ResponseSink, head: bytes, noBody: bool) -> None:
        """
        Start serving C{exchange}: write its request head.  C{noBody} says
        the response has no body whatever its headers say (HEAD).
        """
        self.exchange = exchange
        if not self._clean:
            self.parser = httptools.HttpResponseParser(self)
        self._clean = False
        self.headers: list = []
        self.reason = b""
        self.noBody = noBody
        self.inHead = True
        self.done = False
        self.keepAlive = False
        self.closeDelimited = False
        self.gotBytes = False
        self.extra = False
        self.length = -1
        self.bodyRead = 0
        sendNow(self.transport, head)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if self.piping:
            exchange.pipeData(data)
            return
        if exchange is None or self.done:
            # Bytes nobody asked for: this connection can't be trusted.
            self.transport.abortConnection()
            return
        self.gotBytes = True
        # What this read makes us write to the client leaves in one send.
        cork = exchange.frontend.out
        held = cork.hold()
        try:
            self._parse(exchange, data)
            if exchange.encoder is not None:
                exchange.responseRead()  # a compressed body: this read's output goes now
        finally:
            if held:
                cork.flush()
        if not self.done and not self.inHead and not self.piping and self.exchange is exchange:
            left = self.length - self.bodyRead
            if left >= MIN_SPLICE:
                # A large rest of a body: the kernel may move it
                # (txlb.http.bodysplice); the parser will not see it.
                exchange.spliceBody(left)
            if self.splice is None and self._readSize is None and (left >= _DEFAULT_READ or self.length < 0):
                # More than one of Twisted's reads (or an unknown amount)
                # still to copy: larger reads.
                transport = self.transport
                self._readSize = getattr(transport, "bufferSize", LARGE_READ)
                transport.bufferSize = LARGE_READ

    def _parse(self, exchange: ResponseSink, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.piping = True
            exchange.upgraded(data[e.args[0]:])
            return
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Unsupported):
                raise
            self.fail(f"unsupported response from {self.server.name}: {e.__context__}")
            return
        except httptools.HttpParserError as e:
            self.fail(f"invalid response from {self.server.name}: {e}")
            return
        if self.done:
            self._complete()

    def fail(self, message: str) -> None:
        """Abort the connection; its exchange (if any) hears C{message} as the backend's failure."""
        exchange, self.exchange = self.exchange, None
        self.transport.abortConnection()
        if exchange is not None:
            exchange.backendFailed(message, self.gotBytes)

    def _complete(self) -> None:
        if self._readSize is not None:
            self.transport.bufferSize, self._readSize = self._readSize, None
        exchange, self.exchange = self.exchange, None
        reusable = self.keepAlive and not self.extra
        exchange.responseEnd(reusable)

    # httptools callbacks.

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.inHead:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        status = self.parser.get_status_code()
        headers, self.headers = self.headers, []
        reason, self.reason = self.reason, b""
        if 100 <= status < 200 and status != 101:
            self.exchange.interimResponse(status, reason, headers)
            return
        self.inHead = False
        self.keepAlive = self.parser.should_keep_alive()
        chunked = False
        length = None
        for n, v in headers:
            n = n.lower()
            if n == b"transfer-encoding":
                if v.strip().lower() != b"chunked":
                    # A coding we would have to drop or could not re-frame.
                    raise _Unsupported(f"Transfer-Encoding {v.decode('latin-1')!r}")
                chunked = True
            elif n == b"content-length":
                length = v
        self.chunked = chunked
        self.lengthValue = length
        if self.noBody or status in (204, 304):
            self.done = True
        elif chunked:
            self.closeDelimited = False
        elif length is None:
            self.closeDelimited = True
        else:
            self.closeDelimited = False
            self.length = int(length)  # llhttp checked it is digits
        self.exchange.responseHead(status, reason, headers, self.keepAlive)

    def on_body(self, data: bytes) -> None:
        if not self.done:
            self.bodyRead += len(data)
            self.exchange.responseBody(data)

    def on_message_complete(self) -> None:
        if not self.inHead:
            self.done = True
            self._clean = not self.noBody

    def spliced(self) -> None:
        """
        The rest of the body went by L{txlb.http.bodysplice}: the response
        is over, and the parser, which never saw those bytes, is not fit
        for the next one.
        """
        self.splice = None
        self.done = True
        self._clean = False
        self._complete()

    # Connection events.

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed = True
        splice, self.splice = self.splice, None
        if splice is not None:
            splice.stop()
        self.owner._forget(self)
        ready = self.whenReady
        if ready is not None and not ready.called:
            failedTLS = handshakeError(reason) if reason is not None else None
            name = self.server.name
            ready.errback(Failure(error.ConnectError(string=f"TLS with {name} failed: {failedTLS}" if failedTLS
                                                     else f"{name} closed the connection during the TLS handshake")))
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if self.piping:
            exchange.pipeClosed()
        elif not self.inHead and not self.done and self.closeDelimited:
            # A body with neither length nor chunking ends when the server closes.
            exchange.responseEnd(False)
        else:
            self._lost(exchange, reason)

    def _lost(self, exchange: ResponseSink, reason: Optional[Failure]) -> None:
        """The connection went away while C{exchange} waited for its answer: why, as best known."""
        name = self.server.name
        failedTLS = handshakeError(reason) if self.handshaken and reason is not None else None
        first = self.handshaken and not self.reused and not self.gotBytes
        if failedTLS is not None and ("alert" in failedTLS or reason.check(VerificationError)):
            # The server's TLS said no (OpenSSL: "tlsv13 alert certificate
            # required"): on the first request, a TLS 1.3 server refusing
            # the client's certificate, which it judges after the client's
            # handshake is done.  Or txlb said no to the server's name, which
            # older Twisted checks only once the handshake is reported done.
            # The server never read the request: a failed connect.
            exchange.backendFailed(f"TLS with {name} failed: {failedTLS}", self.gotBytes, refused=first)
        elif first:
            exchange.backendFailed(closedAfterHandshake(name), False)
        elif failedTLS is not None:
            exchange.backendFailed(f"TLS with {name} failed: {failedTLS}", self.gotBytes)
        else:
            exchange.backendFailed(f"{name} closed the connection", self.gotBytes)

    def readConnectionLost(self) -> None:
        # The server will send nothing more: treat as a full close.
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, server: Server, owner: "BackendConnections", tls: bool, generation: int) -> None:
        self.server = server
        self.owner = owner
        self.tls = tls
        self.generation = generation

    def buildProtocol(self, addr) -> BackendConnection:
        return BackendConnection(self.server, self.owner, self.tls, self.generation)


class BackendConnections:
    """
    Idle backend connections by server, shared by every HTTP service.
    """

    def __init__(self, endpoints: EndpointCache, clock, *, maxIdle: int = MAX_IDLE_PER_SERVER,
                 idleTimeout: float = IDLE_TIMEOUT) -> None:
        self.endpoints = endpoints
        self.clock = clock
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self._idle: dict[Server, list[BackendConnection]] = {}
        self._sweeper: Optional[LoopingCall] = None
        #: Servers that L{retire} was called for, and how many times: a
        #: connection asked for at an older generation is not reused.
        #: Looked at only once some server was retired (C{_retired}).
        self._generations: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._retired = False
        #: The HTTP/2 connections, for pools with C{protocol = "h2"}.
        self.h2 = H2Backends(endpoints, clock)

    def connect(self, server: Server, timeout: float, tls=None) -> Deferred:
        """
        A new connection to C{server}, within C{timeout} seconds; over TLS
        with C{tls} (the pool's L{txlb.config.BackendTLSConfig}), once the
        handshake is done.
        """
        generation = self._generations.get(server, 0) if self._retired else 0
        factory = _ConnectionFactory(server, self, tls is not None, generation)
        d = self.endpoints.get(server.address, tls).connect(factory)
        if tls is not None:
            d.addCallback(lambda conn: conn.whenReady)
        return d.addTimeout(timeout, self.clock)

    def retire(self, servers: Iterable[Server]) -> None:
        """
        A reload changed how C{servers} are reached (their pool's C{tls}
        or C{protocol}, or their address): no connection made before serves
        a new request.  Idle ones close now, busy ones when their request
        ends (L{putIdle}); HTTP/2 ones take no new stream and close when
        their streams end (L{H2Backends.retire}).
        """
        servers = list(servers)
        self._retired = True
        for server in servers:
            self._generations[server] = self._generations.get(server, 0) + 1
            for conn in self._idle.pop(server, ()):
                conn.transport.loseConnection()
        self.h2.retire(servers)

    def takeIdle(self, server: Server) -> Optional[BackendConnection]:
        """The most recently used idle connection to C{server}, if any."""
        idle = self._idle.get(server)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def putIdle(self, conn: BackendConnection) -> None:
        """Keep C{conn} for the next request to its server, or close it."""
        idle = self._idle.setdefault(conn.server, [])
        if (len(idle) >= self.maxIdle or conn.closed
                or (self._retired and self._generations.get(conn.server, 0) != conn.generation)):
            conn.transport.loseConnection()
            return
        idle.append(conn)
        conn.transport.resumeProducing()  # a slow client may have paused it
        conn.idleSince = self.clock.seconds()
        if self._sweeper is None:
            # One sweep every half idle timeout, rather than a timer set and
            # cancelled for every request.
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(self.idleTimeout / 2, now=False)

    def _sweep(self) -> None:
        """Close connections idle for C{idleTimeout} or more."""
        oldest = self.clock.seconds() - self.idleTimeout
        left = 0
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idleSince <= oldest]:
                idle.remove(conn)
                conn.transport.loseConnection()
            left += len(idle)
        if not left and self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None

    def _forget(self, conn: BackendConnection) -> None:
        idle = self._idle.get(conn.server)
        if idle and conn in idle:
            idle.remove(conn)

    def closeIdle(self) -> None:
        self.h2.closeIdle()
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in list(idle):
                conn.transport.loseConnection()
