# -*- test-case-name: tests.test_http_frontend -*-
"""
One request and its response, as the proxy carries it: the request side fed
by the client connection's parser, the response side by the backend
connection the exchange is attached to.

The seam: a frontend (L{txlb.http.frontend.HTTPFrontend}, or one HTTP/2
stream, L{txlb.http.h2stream.H2Stream}) owns the client's connection,
its timers and the order of answers; it makes an L{Exchange} per request
head and, once the request is routed and admitted, calls
L{Exchange.dispatch}.  From then on the exchange owns the request's life:
the server, the backend connection, the response; it calls back only the
methods of L{ExchangeOwner}.  When the client goes, the frontend calls
L{Exchange.abort}.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.balance.hashkey import hashKeyOf
from txlb.balance.pool import Pool
from txlb.cache import storedResponse
from txlb.http.backend import BackendConnection
from txlb.http.bodysplice import SINK, SOURCE, BodySplice, spliceable
from txlb.http.headers import requestHead, requestId, responseHead, responseLines
from txlb.interfaces import PickContext
from txlb.net.endpoints import connectFailure
from txlb.net.wire import buffered, noDelay, release, sendNow
from txlb.policy.headers import variables

if TYPE_CHECKING:  # pragma: no cover
    from txlb.http.frontend import HTTPService, ReadGate

_log = Logger(namespace="txlb.http")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_CHUNK_END = b"0\r\n\r\n"


class ExchangeOwner(Protocol):
    """
    What an exchange needs of the frontend it answers through: the client
    connection's output and settings, and a handful of calls.  Everything
    else of the frontend is its own.
    """

    #: The service's settings (timeouts, pools, connections, clock).
    service: "HTTPService"
    #: The client's address as the service sees it.
    client: str
    #: The client certificate's header lines for the backend (none without TLS).
    clientCert: tuple[bytes, ...]
    #: Pauses and resumes reading from the client, by reason.
    gate: "ReadGate"
    #: Where the response goes (a L{txlb.net.wire.Cork}, or a stream's).
    out: object
    #: The client's transport (producers, closing).
    transport: object
    #: The connection will close once the answers in hand are sent.
    closing: bool
    #: The owner frames responses itself (an HTTP/2 stream): a response
    #: from a backend reaches it through L{respond}, its body bytes
    #: unframed through C{out} and its end through L{respondEnd}, never
    #: as an HTTP/1.1 head that the owner would have to read back.  txlb's
    #: own answers (errors, redirects, the cache's) still come as HTTP/1.1
    #: bytes on C{out}.
    framesResponses: bool

    def respond(self, status: int, lines: list[bytes], end: bool) -> None:
        """
        (When C{framesResponses}.)  A response head: its status (below 200:
        an interim one, more follows) and C{b"Name: value"} lines as the
        client gets them (L{txlb.http.headers.responseLines}, with
        C{Content-Length} when the length is known); C{end}: no body
        follows.
        """

    def respondEnd(self, trailers: Optional[list]) -> None:
        """(When C{framesResponses}.)  The body is over; C{trailers}: its trailer fields, if any."""

    def arm(self, seconds: float, what: Callable[[], None]) -> None:
        """Call C{what} after C{seconds} unless disarmed (the connection's one timer)."""

    def disarm(self, what: Optional[Callable[[], None]] = None) -> None:
        """Cancel the timer (only if it is set for C{what}, when given)."""

    def backlogged(self) -> bool:
        """Whether the client is slow to read what it was sent."""

    def fail(self, exchange: "Exchange", status: int, message: str, extra: bytes = b"") -> None:
        """Answer C{exchange} with txlb's own error response; the exchange is done."""

    def exchangeDone(self, exchange: "Exchange") -> None:
        """C{exchange} is answered in full: log it, go on with the next."""

    def pipe(self, exchange: "Exchange", backendData: bytes) -> None:
        """After a 101 answer, copy bytes both ways between client and backend."""


class Exchange:
    """
    One request and its response.

    The request side is fed by the frontend's parser; the response side by
    the backend connection it is attached to.
    """

    conn: Optional[BackendConnection] = None
    server = None
    reason = ""
    status = 0
    responseStarted = False
    requestDone = False
    bodySent = False
    toClientChunked = False
    closeAfter = False
    upgrade: Optional[bytes] = None
    refusal: Optional[tuple[int, str]] = None
    pool: Optional[Pool] = None
    error: Optional[str] = None
    finished = False
    #: The request's sticky state (a L{txlb.balance.sticky.Affinity}) when the
    #: service is sticky.
    affinity = None
    #: When the service caches: C{HIT}, C{MISS}, C{STALE} or C{BYPASS}; the
    #: L{txlb.cache.Fill} the response goes into; the wait for another
    #: request's response.
    cacheResult: Optional[str] = None
    cacheFill = None
    cacheWait = None
    #: The operator's header rules (a L{txlb.policy.headers.HeaderPolicy})
    #: and compression (a L{txlb.http.compress.Compression}) for this
    #: request's route, when it has any; the body's
    #: L{txlb.http.compress.Encoder} while one encodes it, and the
    #: encoding's name once it did.
    rules = None
    compress = None
    encoder = None
    encoding: Optional[str] = None
    #: C{"HTTP/2"} for a stream's exchange; L{None}: C{HTTP/} + C{version}.
    protocol: Optional[str] = None
    #: Why C{allow}/C{deny} or C{rate_limit} refused the request
    #: (C{deny}, C{rate_limit}), if they did.
    refused: Optional[str] = None

    def __init__(self, frontend: ExchangeOwner, method: bytes, target: bytes, headers: list,
                 keepAlive: bool, version: str) -> None:
        self.frontend = frontend
        self.method = method
        self.target = target
        self.headers = headers
        self.version = version
        self.closeAfter = not keepAlive
        self.started = time.monotonic()
        self.tried: list = []
        self.pending: list[bytes] = []
        self.bytesSent = 0
        self._connecting = None
        self.chunked = False
        self.length = 0
        host = None
        incomingId = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"host":
                host = value
            elif lower == b"transfer-encoding":
                self.chunked = True
            elif lower == b"content-length":
                self.length = int(value)
            elif lower == b"x-request-id":
                incomingId = value
        self.host = host
        self.requestId = requestId(incomingId)
        self.hasBody = self.chunked or self.length > 0
        # Without a body the request is whole once its head is: an early
        # answer (an error) need not close the connection.
        self.requestDone = not self.hasBody

    # The request side.

    def requestBody(self, data: bytes) -> None:
        if self.finished:
            return  # answered already; the connection closes after
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        conn = self.conn
        if conn is not None:
            self.bodySent = True
            self.lastSent = self.frontend.service.clock.seconds()
            sendNow(conn.transport, data)
        else:
            self.pending.append(data)

    def requestEnd(self) -> None:
        self.requestDone = True
        conn = self.conn
        if conn is not None:
            self.lastSent = self.frontend.service.clock.seconds()
            if self.chunked:
                sendNow(conn.transport, _CHUNK_END)
            if self.hasBody:
                conn.transport.unregisterProducer()
                self.frontend.gate.resume("backend")
        elif self.chunked:
            self.pending.append(_CHUNK_END)

    # The response side (called by the backend connection).

    def interimResponse(self, status: int, reason: bytes, headers: list) -> None:
        if self.frontend.framesResponses:
            self.frontend.respond(status, [], False)
        elif self.version == "1.1":
            self.frontend.out.write(b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason))

    def responseHead(self, status: int, reason: bytes, headers: list, keepAlive: bool) -> None:
        frontend = self.frontend
        self._cancelTimer()
        self.status = status
        self.responseStarted = True
        self.pool.observeResponseTime(self.server, time.monotonic() - self.dispatched)
        if status < 500:
            self.pool.reportResult(self.server, True)
        else:
            self.pool.reportResult(self.server, False, f"HTTP {status}")
        conn = self.conn
        affinity = self.affinity
        extra = () if affinity is None else frontend.service.sticky.answered(affinity, self.server, frontend.client,
                                                                             headers)
        rules, values = self.responseRules()
        if status == 101 and self.upgrade is not None:
            head = responseHead(status, reason, headers, requestId=self.requestId, framing=None,
                                close=False, upgrade=_headerValue(headers, b"upgrade") or self.upgrade,
                                extra=extra, rules=rules, values=values)
            self.write(head)
            return
        if self.upgrade is not None:
            self.closeAfter = True  # the client's parser is past the upgrade request
        if self.compress is not None and not conn.done:
            # Before the cache sees the head: what is stored is what is sent.
            headers, self.encoder = self.compress.start(self.method, status, self.headers, headers)
        if self.cacheResult is not None:
            headers, extra = self._cacheHead(status, reason, headers, extra)
            if headers is None:
                self.encoder = None
                return
        framed = frontend.framesResponses  # the owner frames the body itself (HTTP/2)
        end = conn.done
        if conn.done:  # no body: HEAD, 204, 304
            framing = _lengthLine(headers) if status != 204 else None
        elif self.encoder is not None:
            self.encoding = self.encoder.encoding
            noDelay(frontend.transport)  # the body leaves in a piece per read (txlb.net.wire.noDelay)
            if framed:
                framing = None
            elif self.version == "1.1":
                framing = b"Transfer-Encoding: chunked"
                self.toClientChunked = True
            else:
                framing = None
                self.closeAfter = True
        elif not conn.closeDelimited and not conn.chunked:
            framing = b"Content-Length: " + conn.lengthValue
            end = not conn.lengthValue.strip(b"0")  # an empty body: the head says it all
        elif framed:
            framing = None
        elif self.version == "1.1":
            framing = b"Transfer-Encoding: chunked"
            self.toClientChunked = True
        else:
            framing = None
            self.closeAfter = True
        if framed:
            lines = responseLines(headers, requestId=self.requestId, extra=extra, rules=rules, values=values)
            if framing is not None:
                lines.append(framing)
            frontend.respond(status, lines, end)
        else:
            head = responseHead(status, reason, headers, requestId=self.requestId, framing=framing,
                                close=self.closeAfter or frontend.closing,
                                keepAliveHeader=self.version == "1.0" and not self.closeAfter, extra=extra,
                                rules=rules, values=values)
            self.write(head)
        if not conn.done:
            frontend.transport.registerProducer(conn.transport, True)
            self.producing = True
            service = frontend.service
            self.lastMoved = service.clock.seconds()
            frontend.arm(_spliceTimeout(service), self._bodyStalled)

    producing = False

    def responseRules(self):
        """
        C{(rules, values)} for a response head to this request: the
        response side's L{txlb.policy.headers.SideRules} (or L{None}) and
        the values of their variables.
        """
        policy = self.rules
        if policy is None or policy.response is None:
            return None, ()
        rules = policy.response
        if not rules.dynamic:
            return rules, ()
        server = self.server
        return rules, variables(self.frontend.client, self.requestId, self.frontend.service.name,
                                server.name if server is not None else None)

    def _cacheHead(self, status: int, reason: bytes, headers: list, extra):
        """
        A cached service's response head: into the fill, with C{X-Cache}.
        C{(None, None)} when it was answered here instead: a 304 to the
        cache's own revalidation, for which the client gets the stored
        response.
        """
        frontend = self.frontend
        fill = self.cacheFill
        if fill is not None:
            entry = fill.head(status, reason, headers, frontend.service.clock.seconds())
            if not fill.storing:
                self.cacheFill = None
            if entry is not None:
                rules, values = self.responseRules()
                self.status, data = storedResponse(
                    entry, frontend.service.clock.seconds(), self.method, fill.requestHeaders,
                    requestId=self.requestId, close=self.closeAfter or frontend.closing,
                    keepAliveHeader=self.version == "1.0" and not self.closeAfter, result=self.cacheResult,
                    extra=extra, rules=rules, values=values)
                self.write(data)
                return None, None
        elif status < 400 and self.method not in (b"GET", b"HEAD", b"OPTIONS", b"TRACE"):
            cache = frontend.service.cache
            if cache is not None:
                cache.remove(((self.host or b"").lower(), self.target))  # RFC 9111 4.4
        headers = [(n, v) for n, v in headers if n.lower() != b"x-cache"]
        return headers, (*extra, b"X-Cache: " + self.cacheResult.encode("ascii"))

    def responseBody(self, data: bytes) -> None:
        self.lastMoved = self.frontend.service.clock.seconds()
        encoder = self.encoder
        if encoder is not None:
            data = encoder.compress(data)
            if not data:
                return  # zlib keeps it for now (a zero-length chunk would end the body)
        self._bodyOut(data)

    def _bodyOut(self, data: bytes) -> None:
        """Body bytes as the client gets them: into the cache's fill, framed, out."""
        fill = self.cacheFill
        if fill is not None and not fill.add(data):
            self.cacheFill = None
        if self.toClientChunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.write(data)

    def responseRead(self) -> None:
        """
        The backend connection is done with one read: what the encoder
        holds of it goes out now, so that the client sees the body as it
        comes and nothing builds up here.
        """
        encoder = self.encoder
        if encoder is not None:
            data = encoder.flush()
            if data:
                self._bodyOut(data)

    #: Trailer fields of the request (from an HTTP/2 client), set before
    #: C{requestEnd}: an HTTP/2 backend gets them after the body
    #: (L{txlb.http.h2backend}); an HTTP/1.1 backend does not.
    requestTrailers: Optional[list] = None
    #: Trailer fields of the response this client will get.
    trailers: Optional[list] = None

    def responseTrailers(self, headers: list) -> None:
        """
        The response's trailer fields (from an HTTP/2 backend), before
        C{responseEnd}.  The client gets them in the last chunk when it
        said C{TE: trailers} (as a gRPC client does) and the body is chunked
        to it; an HTTP/2 client side sends that chunk's fields as the
        stream's trailing HEADERS (L{txlb.http.h2frontend}).  They are
        dropped otherwise.
        """
        if (self.toClientChunked or self.frontend.framesResponses) and _acceptsTrailers(self.headers):
            self.trailers = headers

    def responseEnd(self, reusable: bool) -> None:
        encoder = self.encoder
        if encoder is not None:
            self.encoder = None
            self._bodyOut(encoder.finish())
        fill = self.cacheFill
        if fill is not None:
            self.cacheFill = None
            fill.end()
        conn, self.conn = self.conn, None
        if self.toClientChunked:
            self.write(_CHUNK_END if self.trailers is None else _lastChunk(self.trailers))
        elif self.frontend.framesResponses and self.responseStarted:
            self.frontend.respondEnd(None if self.trailers is None else trailerFields(self.trailers))
        if self.producing:
            self.producing = False
            self.frontend.transport.unregisterProducer()
        if reusable and self.requestDone and conn is not None:
            conn.reused = False
            self.frontend.service.connections.putIdle(conn)
        elif conn is not None and not conn.closed:
            conn.transport.loseConnection()
        # After the connection is idle, so that work queued for this server
        # (max_connections) can take it.
        self.release()
        self.finished = True
        if not self.requestDone:
            # The answer came before the whole request: nothing more can be
            # read reliably on this connection.
            self.closeAfter = True
        self.frontend.exchangeDone(self)

    # The rest of a large body by splice(2) (txlb.http.bodysplice).

    #: Bytes of the response body the kernel moved.
    spliced = 0
    lastMoved = 0.0

    def spliceBody(self, left: int) -> None:
        """
        The response's last C{left} bytes (at least
        L{txlb.http.bodysplice.MIN_SPLICE}) have not been read yet: have
        the kernel move them from the backend's socket to the client's,
        when nothing needs to see them (no cache fill, no re-framing, both
        sockets plain TCP) and both sockets are ours alone (the request is
        all sent, nothing of it waits in Twisted's buffer, the client is
        not being read).  Otherwise the body keeps streaming through here.
        """
        frontend = self.frontend
        conn = self.conn
        client = frontend.transport
        backend = conn.transport
        # What this turn gathered for either socket leaves first
        # (txlb.net.wire.sendNow), so that the kernel moves nothing past it.
        release(client)
        release(backend)
        if (self.toClientChunked or self.cacheFill is not None or self.encoder is not None or not self.requestDone
                or frontend.out.out is not None or not spliceable(client) or not spliceable(backend)
                or client.disconnecting or backend.disconnecting or buffered(backend)):
            return
        if self.producing:
            self.producing = False
            client.unregisterProducer()
        backend.pauseProducing()
        frontend.gate.pause("splice")
        conn.splice = BodySplice(backend.reactor, backend.socket, client.socket, left,
                                 self._spliceMoved, self._spliceEnded)
        service = frontend.service
        self.lastMoved = service.clock.seconds()
        frontend.arm(_spliceTimeout(service), self._bodyStalled)
        if buffered(client):
            # The head (or the start of the body) is still in Twisted's
            # buffer: splice once it is out, so that bytes keep their order.
            client.registerProducer(_WhenDrained(client, self._spliceStart), False)
        else:
            self._spliceStart()

    def _spliceStart(self) -> None:
        if self.conn is not None and self.conn.splice is not None:  # else a side went away meanwhile
            self.conn.splice.start()

    def _spliceMoved(self, count: int) -> None:
        self.bytesSent += count
        self.spliced += count
        self.lastMoved = self.frontend.service.clock.seconds()

    def _bodyStalled(self) -> None:
        """
        A response body, spliced or copied, made no progress for a while:
        the backend's timeout applies while the backend sends nothing, the
        client's while it leaves what it was sent unread.
        """
        frontend = self.frontend
        service = frontend.service
        conn = self.conn
        if conn is None or self.finished:
            return
        splice = conn.splice
        if splice is not None:
            slow = splice.waitingForSink or not splice.started  # (waiting for Twisted's buffer to drain)
        else:
            slow = frontend.backlogged()
        timeout = service.clientTimeout if slow else service.backendTimeout
        quiet = service.clock.seconds() - self.lastMoved
        if not timeout or quiet < timeout:
            frontend.arm(timeout - quiet if timeout else _spliceTimeout(service), self._bodyStalled)
            return
        if slow:
            error, side = f"the client read nothing for {timeout:g}s", SINK
        else:
            error, side = f"sent nothing for {timeout:g}s", SOURCE
        if splice is not None:
            splice.stop()
            self._spliceEnded(error, side)
        else:
            self._bodyFailed(error, side)

    def _spliceEnded(self, error: Optional[str], side: Optional[str]) -> None:
        """The splice is over and has given both sockets back."""
        frontend = self.frontend
        frontend.disarm(self._bodyStalled)
        conn = self.conn
        conn.splice = None
        if error is None:
            frontend.gate.resume("splice")
            conn.spliced()
        else:
            self._bodyFailed(error, side)

    def _bodyFailed(self, error: str, side: Optional[str]) -> None:
        """A response body cannot go on: end it as the side at fault broke."""
        if side == SOURCE:
            # As if the backend connection had broken under the parser.
            name = self.server.name
            self.conn.fail(f"{name} {error}" if error[:1].islower() else f"{name}: {error}")
        else:
            # As the client's transport would have found it gone (or stalled).
            self.error = error if error.startswith("the client") else "client closed the connection"
            self.frontend.transport.abortConnection()

    def backendFailed(self, message: str, gotBytes: bool, unprocessed: bool = False,
                      refused: bool = False) -> None:
        """
        The backend connection broke or sent garbage.  C{unprocessed}: the
        server said it never took the request (an HTTP/2 GOAWAY or
        REFUSED_STREAM), so any method may be retried if its body is not
        gone.  C{refused}: the server refused the connection's TLS (a TLS
        1.3 server judges a client certificate after the client's side of
        the handshake is done): a failed connect, counted and logged as
        one, and another server is tried if the body is not gone.
        """
        conn, self.conn = self.conn, None
        self._cancelTimer()
        if self.producing:
            self.producing = False
            self.frontend.transport.unregisterProducer()
        if self.responseStarted:
            # Too late for an error response: cut the client off too.
            self.release()
            self.error = message
            self.frontend.transport.abortConnection()
            return
        if refused and not self.bodySent:
            self._connectFailed(Failure(ConnectError(string=message)))
            return
        server = self.server
        self.release()
        retry = not gotBytes and (unprocessed or self.method in IDEMPOTENT) and not self.bodySent
        if retry and conn is not None and (conn.reused or (unprocessed and not self.replayed)):
            # Most likely an idle connection the server had just closed, or
            # one it is closing: not the server's fault; replay on a new
            # connection (once, for a server that keeps refusing).
            self.replayed = self.replayed or unprocessed
            self.dispatch(fresh=True)
        elif retry:
            self.tried.append(server)
            self.dispatch()
        else:
            self.frontend.fail(self, 502, message)

    def upgraded(self, data: bytes) -> None:
        """The backend switched protocols: from now on, a byte pipe."""
        self.frontend.pipe(self, data)

    def pipeData(self, data: bytes) -> None:
        self.bytesSent += len(data)
        self.frontend.out.write(data)

    def pipeClosed(self) -> None:
        self.frontend.out.flush()
        self.frontend.transport.loseConnection()

    # Finding a server (the frontend calls dispatch once the request is routed).

    def dispatch(self, fresh: bool = False) -> None:
        """
        Find this request a server: one scheduling decision (sticky
        sessions first), a wait in the pool's queue when every server is at
        C{max_connections}, then a connection to that server (an idle one
        unless C{fresh}) and the request head sent on it.  Failures end in
        the frontend's L{fail<ExchangeOwner.fail>}; a failed connect tries
        another server up to the pool's C{retries}.
        """
        frontend = self.frontend
        pool = self.pool
        sticky = frontend.service.sticky
        if sticky is not None:
            affinity = self.affinity
            if affinity is None:
                affinity = self.affinity = sticky.affinity(frontend.client, self.headers)
                if affinity.pending is not None:
                    # The shared store is looking the key up (bounded by its
                    # timeout): read no more of the request meanwhile.
                    if not self.requestDone:
                        frontend.gate.pause("connecting")
                    affinity.pending.addCallback(self._stickyFound, fresh)
                    return
            decision = sticky.choose(pool, affinity, self.tried)
            if decision is not None:
                self._use(decision, fresh)
                return
        key = None if pool.hashKey == "client_ip" else hashKeyOf(pool.hashKey, self.target, self.headers)
        context = PickContext(frontend.client, key)
        decision = pool.pick(context, self.tried)
        if decision is None and pool.saturated(self.tried):
            # Every free server is at max_connections: wait for one.
            if not self.requestDone:
                frontend.gate.pause("connecting")
            self._waiter = pool.enqueue(context, self.tried, lambda decision: self._dequeued(decision, fresh))
            return
        self._use(decision, fresh)

    def _stickyFound(self, _, fresh: bool) -> None:
        frontend = self.frontend
        frontend.gate.resume("connecting")
        if not self.finished:
            self.dispatch(fresh)

    def _dequeued(self, decision, fresh: bool) -> None:
        frontend = self.frontend
        self._waiter = None
        if decision is None:
            frontend.gate.resume("connecting")
            frontend.fail(self, 503, f"every server of pool {self.pool.name} stayed at max_connections "
                                     f"for {self.pool.queueTimeout:g}s")
            return
        self._use(decision, fresh)

    def _use(self, decision, fresh: bool) -> None:
        frontend = self.frontend
        pool = self.pool
        if decision is None:
            if self.tried:
                names = ", ".join(s.name for s in self.tried)
                frontend.fail(self, 502, f"no server of pool {pool.name} could be reached (tried {names})")
            else:
                frontend.fail(self, 503, f"no server of pool {pool.name} is available")
            return
        server = self.server = decision.server
        self.reason = decision.reason
        self.released = False
        connections = frontend.service.connections
        if pool.protocol == "h2":
            connections = connections.h2  # a stream on an HTTP/2 connection (txlb.http.h2backend)
        if not fresh:
            conn = connections.stream(server) if pool.protocol == "h2" else connections.takeIdle(server)
            if conn is not None:
                self._attach(conn)
                return
        if not self.requestDone:
            frontend.gate.pause("connecting")
        d = connections.connect(server, pool.connectTimeout, pool.tls)
        self._connecting = d
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, conn: BackendConnection) -> None:
        frontend = self.frontend
        self._connecting = None
        frontend.gate.resume("connecting")
        if self.finished:
            conn.transport.loseConnection()
            return
        self._attach(conn)

    def _connectFailed(self, failure: Failure) -> None:
        frontend = self.frontend
        self._connecting = None
        server = self.server
        self.release()
        if self.finished:
            return  # the client left
        self.pool.connectFailed(server)
        self.tried.append(server)
        why = connectFailure(failure, self.pool.connectTimeout)
        _log.info("connect to {server} failed: {why}", event="connect_failed", service=frontend.service.name,
                  pool=self.pool.name, server=server.name, why=why)
        if len(self.tried) <= self.pool.retries:
            self.dispatch()
        else:
            frontend.fail(self, 502, f"could not connect to {', '.join(s.name for s in self.tried)}")

    def _attach(self, conn: BackendConnection) -> None:
        frontend = self.frontend
        service = frontend.service
        self.conn = conn
        frontend.gate.resume("backend")
        if self.chunked:
            framing = b"Transfer-Encoding: chunked"
        elif self.length:
            framing = b"Content-Length: %d" % self.length
        else:
            framing = None
        policy = self.rules
        rules = None if policy is None else policy.request
        head = requestHead(
            self.method, self.target, self.headers, client=frontend.client,
            host=self.host, proto=service.proto, requestId=self.requestId,
            framing=framing, forwarded=service.forwarded, upgrade=self.upgrade,
            rules=rules, values=() if rules is None or not rules.dynamic else variables(
                frontend.client, self.requestId, service.name, self.server.name),
            clientCert=frontend.clientCert,
        )
        self.dispatched = time.monotonic()
        self.lastSent = service.clock.seconds()
        conn.send(self, head, self.method == b"HEAD")
        if self.pending:
            self.bodySent = True
            sendNow(conn.transport, b"".join(self.pending))
            self.pending = []
        if self.hasBody and not self.requestDone:
            conn.transport.registerProducer(frontend.gate.producer("backend"), True)
        frontend.arm(service.backendTimeout, self.backendTimedOut)

    # Helpers.

    def write(self, data: bytes) -> None:
        """Write C{data} to the client, counted as sent."""
        self.bytesSent += len(data)
        self.frontend.out.write(data)

    def release(self) -> None:
        """Give the server's slot back to the pool, once."""
        if self.server is not None and not self.released:
            self.released = True
            self.pool.release(self.server)

    released = True
    #: Replayed once already because the server had not taken it.
    replayed = False

    _waiter = None

    def _stopWaiting(self) -> None:
        """
        Leave the pool's max_connections queue, if waiting there (and the
        wait for another request's response, or the response being cached).
        """
        if self._waiter is not None:
            self.pool.cancel(self._waiter)
            self._waiter = None
        if self.cacheResult is not None:
            self.stopCaching()

    def stopCaching(self) -> None:
        """Leave the wait for another request's response, and stop filling the cache."""
        if self.cacheWait is not None:
            cache, key, waiter = self.cacheWait
            cache.cancel(key, waiter)
            self.cacheWait = None
        if self.cacheFill is not None:
            self.cacheFill.abandon()
            self.cacheFill = None

    def abort(self, gently: bool = False) -> bool:
        """
        Let go of everything this exchange waits for or holds: the backend
        timer, a place in the pool's queue or the cache, a connect under
        way, the backend connection (aborted; closed after what it holds is
        written when C{gently}, as a piped upgrade's is) and the server's
        slot.  Marks it finished; returns whether it had finished before.
        """
        wasFinished, self.finished = self.finished, True
        self._cancelTimer()
        self._stopWaiting()
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            conn.exchange = None
            if gently:
                conn.transport.loseConnection()
            else:
                conn.transport.abortConnection()
        self.release()
        return wasFinished

    def _cancelTimer(self) -> None:
        self.frontend.disarm(self.backendTimedOut)

    lastSent = 0.0

    def backendTimedOut(self) -> None:
        """
        No answer within C{timeouts.backend} of the request's last byte
        sent: a long upload the backend keeps reading is not timed out.
        """
        clock = self.frontend.service.clock
        quiet = clock.seconds() - self.lastSent
        timeout = self.frontend.service.backendTimeout
        if quiet < timeout:
            self.frontend.arm(timeout - quiet, self.backendTimedOut)
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.exchange = None
            conn.transport.abortConnection()
        if self.producing:
            self.producing = False
            self.frontend.transport.unregisterProducer()
        self.release()
        self.frontend.fail(self, 504, f"{self.server.name} did not answer within {self.frontend.service.backendTimeout:g}s")


def _spliceTimeout(service) -> float:
    """The first check of a splice's progress: after the shorter timeout (0: none), an hour at most."""
    # Once per response with a body: plain comparisons, no generator.
    timeout = 3600.0
    backend = service.backendTimeout
    if backend and backend < timeout:
        timeout = backend
    client = service.clientTimeout
    if client and client < timeout:
        timeout = client
    return timeout


@implementer(IPullProducer)
class _WhenDrained:
    """Calls C{then} once C{transport} has written all it buffered."""

    def __init__(self, transport, then) -> None:
        self.transport = transport
        self.then = then

    def resumeProducing(self) -> None:
        if not buffered(self.transport):
            self.transport.unregisterProducer()
            self.then()

    def stopProducing(self) -> None:
        pass  # the client left: its connection's end cleans up


_ABSOLUTE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#@]+)([/?][^#]*)?")


def absoluteForm(target: bytes) -> Optional[tuple[bytes, bytes]]:
    """
    C{(authority, origin-form target)} of an absolute-form request target
    (C{http://host:port/path?q}), or L{None} when it is not one we accept.
    """
    match = _ABSOLUTE.fullmatch(target)
    if match is None:
        return None
    authority, rest = match.groups()
    if not rest:
        rest = b"/"
    elif rest[:1] == b"?":
        rest = b"/" + rest
    return authority, rest


def _headerValue(headers: list, name: bytes) -> Optional[bytes]:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def _acceptsTrailers(headers: list) -> bool:
    value = _headerValue(headers, b"te")
    return value is not None and b"trailers" in value.lower()


def trailerFields(trailers: list) -> list:
    """C{trailers} bar what may not be a trailer (nor be written as one)."""
    return [(name, value) for name, value in trailers
            if name.lower() not in _NOT_TRAILERS and b"\r" not in value and b"\n" not in value]


def _lastChunk(trailers: list) -> bytes:
    """The last chunk with C{trailers}, bar what may not be a trailer."""
    lines = [b"0"]
    for name, value in trailerFields(trailers):
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


#: Fields that framing, routing or authentication depend on (RFC 9110 6.5.1).
_NOT_TRAILERS = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"te",
                           b"trailer", b"content-type", b"authorization", b"set-cookie"})


def _lengthLine(headers: list) -> Optional[bytes]:
    value = _headerValue(headers, b"content-length")
    return None if value is None else b"Content-Length: " + value
