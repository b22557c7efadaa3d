# -*- test-case-name: tests.test_http_frontend -*-
"""
The client side of the HTTP proxy.

One L{HTTPFrontend} per client connection parses requests with httptools
(strict llhttp, plus the checks below), and turns each into an
L{Exchange}: route to a pool, one scheduling decision, a backend connection
(an idle one reused when there is one), the request head rewritten and the
body streamed, the response streamed back.  Pipelined requests wait in
order behind the one being answered; reading from the client pauses while
one is waiting, so a pipelining client cannot make txlb buffer.

Bodies are never buffered whole: each side's transport is registered as the
other's producer for as long as bytes flow that way, through a L{ReadGate}
that also pauses reading for the proxy's own reasons (connecting,
pipelining) without the two fighting over C{resumeProducing}.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping, Optional

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.balance.pool import Pool
from txlb.cache import ResponseCache, storedResponse
from txlb.http.backend import BackendConnections
from txlb.http.errors import errorResponse
from txlb.http.exchange import Exchange, _headerValue, absoluteForm
from txlb.http.grpc import grpcErrorResponse, isGrpc
from txlb.http.requestlog import logRequest
from txlb.http.routing import Router
from txlb.net.drain import OpenConnections
from txlb.net.readloop import adopt
from txlb.net.tls import clientCertificateLines
from txlb.net.wire import Cork, backlogged, sendNow
from txlb.policy.admission import Refusal

_log = Logger(namespace="txlb.http")

#: What an HTTP/2 client sends first (RFC 9113 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Raw bytes a request head may take beyond the limit before we stop
#: reading it (one read's worth: the exact check is on the parsed fields).
_HEAD_SLACK = 65536


class _Refused(Exception):
    """Raised inside a parser callback to refuse a request."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


@implementer(IPushProducer)
class _GateReason:
    """The producer a consumer sees: pauses the gate for one reason."""

    def __init__(self, gate: "ReadGate", reason: str) -> None:
        self.gate = gate
        self.reason = reason

    def pauseProducing(self) -> None:
        self.gate.pause(self.reason)

    def resumeProducing(self) -> None:
        self.gate.resume(self.reason)

    def stopProducing(self) -> None:
        self.gate.transport.loseConnection()


class ReadGate:
    """
    Reading from one transport, paused while any reason holds.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    def producer(self, reason: str) -> _GateReason:
        return _GateReason(self, reason)


class HTTPService:
    """
    What every connection of one HTTP service shares (the factory's state).
    """

    #: A L{txlb.observe.metrics.Metrics} told about every finished exchange, or L{None}.
    metrics = None

    def __init__(
        self,
        name: str,
        pools: Mapping[str, Pool],
        router: Router,
        connections: BackendConnections,
        clock,
        *,
        clientTimeout: float = 60.0,
        backendTimeout: float = 30.0,
        idleTimeout: float = 75.0,
        maxHeaderBytes: int = 32 * 1024,
        maxBody: int = 0,
        forwarded: bool = False,
        accessLog: bool = True,
        proto: bytes = b"http",
        sticky=None,
        cacheConfig=None,
        http2: bool = True,
        maxStreams: int = 100,
        clientCerts: bool = False,
    ) -> None:
        self.name = name
        self.pools = pools
        self.router = router
        self.connections = connections
        self.clock = clock
        self.clientTimeout = clientTimeout
        self.backendTimeout = backendTimeout
        self.idleTimeout = idleTimeout
        self.maxHeaderBytes = maxHeaderBytes
        self.maxBody = maxBody
        self.forwarded = forwarded
        self.accessLog = accessLog
        self.proto = proto
        #: A L{txlb.balance.sticky.Sticky}, or L{None}.
        self.sticky = sticky
        self.cacheConfig = cacheConfig
        #: Speak HTTP/2 to clients that ask (ALPN, or the preface), with
        #: at most C{maxStreams} streams open per connection.
        self.http2 = http2
        self.maxStreams = maxStreams
        #: Some certificate of the service's TLS asks clients for theirs:
        #: each request tells the backend what the connection's proved.
        self.clientCerts = clientCerts

    #: The service's L{txlb.cache.ResponseCache}, or L{None}: made from
    #: C{cacheConfig} (a L{txlb.config.CacheConfig}).
    cache: Optional[ResponseCache] = None

    @property
    def cacheConfig(self):
        return self._cacheConfig

    @cacheConfig.setter
    def cacheConfig(self, config) -> None:
        # A reload keeps what is stored: only the bounds change.
        self._cacheConfig = config
        if config is None:
            self.cache = None
        elif self.cache is None:
            self.cache = ResponseCache(config.max_size, config.max_object, self.clock)
        else:
            self.cache.configure(config.max_size, config.max_object)

    def update(self, **settings) -> None:
        """
        New settings from a reloaded config (C{router}, C{clientTimeout},
        C{maxBody}, ... as the constructor names them).  Connections read
        them afresh for each request, so requests in flight keep going and
        the next ones see the change.
        """
        for name, value in settings.items():
            if name in ("name", "pools", "connections", "clock") or not hasattr(self, name):
                raise TypeError(f"HTTPService.update: {name!r} cannot be changed")
            setattr(self, name, value)


class HTTPProxyFactory(Factory):
    noisy = False
    #: Makes the HTTP/2 side of a connection that speaks it, from its
    #: L{HTTPFrontend} (L{txlb.http.h2frontend.H2Connection}), or L{None}.
    http2 = None

    def __init__(self, service: HTTPService) -> None:
        self.service = service
        self.open: OpenConnections[HTTPFrontend] = OpenConnections(
            service.clock, lambda frontend: frontend.transport.abortConnection()
        )

    def drain(self, timeout: float) -> Deferred:
        """
        Close idle keep-alive connections now; let the others finish the
        request in hand (answered with C{Connection: close}).
        """
        self.finish()
        return self.open.drain(timeout)

    def finish(self) -> None:
        """
        What L{drain} does without a deadline (a service a reload removed
        or rebuilt): idle keep-alive connections close now, the others
        after the request in hand.
        """
        for frontend in list(self.open.open):
            frontend.closing = True
            if frontend.h2 is not None:
                frontend.h2.drain()
            elif not frontend.exchanges and not frontend.piping:
                frontend.transport.loseConnection()

    def buildProtocol(self, addr) -> "HTTPFrontend":
        return HTTPFrontend(self, getattr(addr, "host", str(addr)))


@implementer(IHandshakeListener)
class HTTPFrontend(Protocol):
    """One client connection."""

    closing = False
    #: The C{X-Client-Cert-*} lines every request of this connection
    #: carries (L{txlb.net.tls.clientCertificateLines}), when the service
    #: asks for client certificates.
    clientCert: tuple[bytes, ...] = ()
    piping = False
    #: Bytes after a request that asked for an upgrade, kept until the answer.
    upgradeData: Optional[bytes] = None
    #: The HTTP/2 connection this one turned out to be, if it did.
    h2 = None
    #: Responses go out as the HTTP/1.1 bytes an exchange writes to L{out}
    #: (L{txlb.http.exchange.ExchangeOwner.framesResponses}).
    framesResponses = False

    def __init__(self, factory: HTTPProxyFactory, client: str) -> None:
        self.factory = factory
        self.service = factory.service
        self.client = client
        self.exchanges: deque[Exchange] = deque()
        self.reading: Optional[Exchange] = None
        self.parser = httptools.HttpRequestParser(self)
        self._timer = None
        self._inHead = False
        self._headSize = 0
        self._rawHead = 0
        self._url = b""
        self._headers: list = []
        self.dead = False
        self._progress = False
        self._stalled = 0

    # Connection.

    def connectionMade(self) -> None:
        adopt(self.transport)
        self.factory.open.add(self)
        if self.service.metrics is not None:
            self.service.metrics.connectionStarted(self.service.name)
        self.gate = ReadGate(self.transport)
        #: Everything written to the client goes through here, in order.
        self.out = Cork(self.transport)
        self.arm(self.service.idleTimeout, self._idle)
        if self.service.http2 and self.factory.http2 is not None:
            self.dataReceived = self._sniff  # the first bytes say which HTTP

    def _sniff(self, data: bytes) -> None:
        """
        HTTP/2 when TLS agreed on C{h2} (ALPN) or the bytes are its
        connection preface (prior knowledge); HTTP/1.1 otherwise.
        """
        data = self._early + data
        if getattr(self.transport, "negotiatedProtocol", None) != b"h2" and not data.startswith(_H2_PREFACE):
            if len(data) < len(_H2_PREFACE) and _H2_PREFACE.startswith(data):
                self._early = data  # a preface cut short: wait for the rest
                return
            del self.dataReceived
            self.dataReceived(data)
            return
        self.h2 = self.factory.http2(self)
        self.dataReceived = self.h2.dataReceived
        self.h2.dataReceived(data)

    _early = b""

    def handshakeCompleted(self) -> None:
        """
        TLS is up (before any request arrives): what the client's
        certificate proved, once for the connection.
        """
        if self.service.clientCerts:
            self.clientCert = clientCertificateLines(self.transport)

    # One timeout at a time per connection (keep-alive idle, request head,
    # backend answer), kept as a deadline on a single timer that is only
    # moved when it must fire sooner: arming and disarming for every request
    # costs two attribute writes instead of a timer set and cancelled.

    _deadline = 0.0
    _onTimeout = None
    #: When L{_timer} (if any) fires; it is L{None} once fired or cancelled.
    _timerAt = 0.0
    #: C{Host} headers in the request head being read.
    _hosts = 0

    def arm(self, seconds: float, what) -> None:
        """Call C{what} in C{seconds} (0: never), replacing what was armed."""
        if not seconds:
            self._onTimeout = None
            return
        clock = self.service.clock
        self._deadline = deadline = clock.seconds() + seconds
        self._onTimeout = what
        if self._timer is None:
            self._timer = self._newTimer(seconds)
            self._timerAt = deadline
        elif self._timerAt > deadline:
            self._timer.reset(seconds)
            self._timerAt = deadline

    def _newTimer(self, seconds: float):
        """The connection's one timer, set to call L{_fire} in C{seconds}."""
        return self.service.clock.callLater(seconds, self._fire)

    def disarm(self, what=None) -> None:
        """Forget the armed timeout (only if it is C{what}, when given)."""
        if what is None or self._onTimeout == what:
            self._onTimeout = None

    def _fire(self) -> None:
        self._timer = None
        what = self._onTimeout
        if what is None:
            return
        remaining = self._deadline - self.service.clock.seconds()
        if remaining > 0:
            self._timer = self.service.clock.callLater(remaining, self._fire)
            self._timerAt = self._deadline
            return
        self._onTimeout = None
        what()

    def _idle(self) -> None:
        self.transport.loseConnection()

    def backlogged(self) -> bool:
        """The client is not taking what it was sent (so a stalled body is its fault)."""
        return backlogged(self.transport)

    def _headerTimeout(self) -> None:
        self._refuse(408, "the request headers did not arrive in time")

    def dataReceived(self, data: bytes) -> None:
        if self.piping:
            sendNow(self.pipeTo.transport, data)
            return
        if self.dead:
            if self.upgradeData is not None:
                self.upgradeData += data  # for the tunnel, if there is one
            return
        if self._inHead:
            self._rawHead += len(data)
        self._progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # The rest belongs to the tunnel, if the backend agrees to one:
            # keep it, and read no more until the answer.
            self.dead = True
            self.gate.pause("upgrade")
            self.upgradeData = data[e.args[0]:]
            return
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if isinstance(refused, _Refused):
                self._refuse(refused.status, refused.message)
            else:
                raise
            return
        except httptools.HttpParserError as e:
            self._refuse(400, f"malformed request: {e}")
            return
        if self._inHead and self._rawHead > self.service.maxHeaderBytes + _HEAD_SLACK:
            self._refuse(431, "request header block too large")
        elif self.reading is not None and self.reading.chunked:
            # Chunk-size lines and trailers are buffered by the parser until
            # they end: bound them as the head is bounded.
            if self._progress:
                self._stalled = 0
            else:
                self._stalled += len(data)
                if self._stalled > self.service.maxHeaderBytes + _HEAD_SLACK:
                    self._refuse(431, "chunk header or trailer section too large")

    # httptools callbacks: the request being read.

    def on_message_begin(self) -> None:
        self._stalled = 0
        self._inHead = True
        self._headSize = 0
        self._rawHead = 0
        self._url = b""
        self._headers = []
        self._hosts = 0
        if not self.exchanges:
            self.arm(self.service.clientTimeout, self._headerTimeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._headSize += len(url)
        if self._headSize > self.service.maxHeaderBytes:
            raise _Refused(431, "request header block too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._inHead:
            return  # a chunked body's trailer: dropped
        self._headSize += len(name) + len(value) + 4
        if self._headSize > self.service.maxHeaderBytes:
            raise _Refused(431, "request header block too large")
        size = len(name)
        if size == 4:
            if name.lower() == b"host":
                self._hosts += 1
        elif size == 17 and name.lower() == b"transfer-encoding" and value.lower() != b"chunked":
            raise _Refused(400, "only Transfer-Encoding: chunked is accepted")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._inHead = False
        parser = self.parser
        version = parser.get_http_version()
        exchange = Exchange(self, parser.get_method(), self._url, self._headers,
                            parser.should_keep_alive(), version)
        if version != "1.1" and version != "1.0":
            raise _Refused(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        if exchange.method == b"CONNECT":
            raise _Refused(405, "CONNECT is not supported by this reverse proxy")
        hosts = self._hosts
        if hosts > 1 or (version == "1.1" and hosts == 0):
            raise _Refused(400, "an HTTP/1.1 request needs exactly one Host header")
        target = exchange.target
        if target[:1] != b"/":
            if target == b"*" and exchange.method == b"OPTIONS":
                pass
            else:
                absolute = absoluteForm(target)
                if absolute is None:
                    raise _Refused(400, "the request target must be a path or an http(s) URL")
                # RFC 9112 3.2.2: the URL's authority wins over Host.  The
                # backend gets the usual origin form, so that it and the
                # router agree on host and path.
                exchange.host, exchange.target = absolute
                exchange.headers = [(n, v) for n, v in exchange.headers if n.lower() != b"host"]
                exchange.headers.append((b"Host", exchange.host))
        maxBody = self.service.maxBody
        if maxBody and exchange.length > maxBody:
            raise _Refused(413, f"request body larger than {maxBody} bytes")
        if parser.should_upgrade():
            if exchange.hasBody:
                # llhttp would take the body for tunnel bytes; a backend, for a body.
                raise _Refused(400, "a request asking for an upgrade cannot have a body")
            exchange.upgrade = _headerValue(self._headers, b"upgrade")
        self.reading = exchange
        self.exchanges.append(exchange)
        if len(self.exchanges) == 1:
            self.disarm()
            self._start(exchange)
        else:
            self.gate.pause("pipeline")

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_body(self, data: bytes) -> None:
        self._progress = True
        exchange = self.reading
        exchange.received = getattr(exchange, "received", 0) + len(data)
        if self.service.maxBody and exchange.received > self.service.maxBody:
            raise _Refused(413, f"request body larger than {self.service.maxBody} bytes")
        exchange.requestBody(data)

    def on_message_complete(self) -> None:
        exchange, self.reading = self.reading, None
        if exchange is not None:
            exchange.requestEnd()

    # Running exchanges.

    def _start(self, exchange: Exchange) -> None:
        if exchange.refusal is not None:
            self._refuseNow(exchange)
            return
        router = self.service.router
        route = router.route(exchange.host, exchange.target, exchange.method, exchange.headers)
        admission = router.admission if route is None else route.admission
        if admission is not None:
            verdict = admission.admit(self.client, exchange.target, exchange.headers)
            if verdict is not None:
                self._admission(exchange, verdict, router, route)
                return
        self._routed(exchange, router, route)

    def _admission(self, exchange: Exchange, verdict, router: Router, route) -> None:
        """
        C{allow}/C{deny} or C{rate_limit} refused the request (a
        L{Refusal}), or the shared rate limit is deciding (a L{Deferred},
        within its timeout): read no more of the request meanwhile.
        """
        if isinstance(verdict, Refusal):
            self._turnAway(exchange, verdict)
            return
        if not exchange.requestDone:
            self.gate.pause("admission")
        verdict.addCallback(self._admitted, exchange, router, route).addErrback(
            lambda f: _log.failure("admitting a request", f, event="admission_failed"))

    def _admitted(self, verdict, exchange: Exchange, router: Router, route) -> None:
        self.gate.resume("admission")
        if exchange.finished:
            return  # the client left
        if verdict is not None:
            self._turnAway(exchange, verdict)
        else:
            self._routed(exchange, router, route)

    def _turnAway(self, exchange: Exchange, refusal: Refusal) -> None:
        """Answer a refusal (403, 429): counted, and named in the request event."""
        exchange.refused = refusal.reason
        if self.service.metrics is not None:
            self.service.metrics.refused(self.service.name, refusal.reason)
        self.fail(exchange, refusal.status, refusal.message, refusal.headers)

    def _routed(self, exchange: Exchange, router: Router, route) -> None:
        """The request may go on: to its redirect, the cache or a backend."""
        service = self.service
        if route is None:
            poolName = router.default
            exchange.rules = router.rules
            exchange.compress = router.compress
        else:
            exchange.rules = route.rules
            exchange.compress = route.compress
            if route.redirect is not None:
                self._redirect(exchange, route.redirect)
                return
            poolName = route.pool
        exchange.pool = service.pools[poolName]
        if service.cache is not None and self._fromCache(exchange, service.cache):
            return
        exchange.dispatch()

    def _redirect(self, exchange: Exchange, redirect) -> None:
        """Answer with a redirect route's L{txlb.policy.redirect.Redirect}: no backend is asked."""
        exchange.status = redirect.status
        exchange.reason = "redirect"
        exchange.closeAfter = exchange.closeAfter or not exchange.requestDone
        rules, values = exchange.responseRules()
        data = redirect.answer(self.service.proto, exchange.host, exchange.target, exchange.method,
                               requestId=exchange.requestId, close=exchange.closeAfter or self.closing,
                               keepAliveHeader=exchange.version == "1.0" and not exchange.closeAfter,
                               rules=rules, values=values)
        exchange.finished = True
        exchange.write(data)
        self.exchangeDone(exchange)

    def _fromCache(self, exchange: Exchange, cache: ResponseCache, collapse: bool = True) -> bool:
        """
        Consult the service's cache: true when the request is answered from
        it, or waits for another request's response; otherwise the backend's
        response may be stored.
        """
        plan = cache.consult(exchange.method, exchange.host, exchange.target, exchange.headers,
                             exchange.hasBody or exchange.upgrade is not None, collapse=collapse,
                             wake=lambda: self._cacheWoken(exchange), timeout=self.service.backendTimeout or 30.0,
                             certified=len(self.clientCert) == 2)  # a subject and SUCCESS: a verified certificate
        exchange.cacheResult = plan.result
        if plan.entry is not None:
            rules, values = exchange.responseRules()
            exchange.status, data = storedResponse(
                plan.entry, cache.clock.seconds(), exchange.method, exchange.headers,
                requestId=exchange.requestId, close=exchange.closeAfter or self.closing,
                keepAliveHeader=exchange.version == "1.0" and not exchange.closeAfter, result=plan.result,
                rules=rules, values=values)
            exchange.finished = True
            exchange.write(data)
            self.exchangeDone(exchange)
            return True
        if plan.waiting is not None:
            exchange.cacheWait = cache, plan.key, plan.waiting
            return True
        if plan.onlyIfCached:
            self.fail(exchange, 504, "only-if-cached: no stored response")
            return True
        exchange.cacheFill = plan.fill
        if plan.validators:
            exchange.headers = exchange.headers + plan.validators
        return False

    def _cacheWoken(self, exchange: Exchange) -> None:
        """The response this request waited for is in (or the wait is over)."""
        exchange.cacheWait = None
        if exchange.finished:
            return
        cache = self.service.cache  # a reload may have taken it away meanwhile
        if cache is None or not self._fromCache(exchange, cache, collapse=False):
            exchange.dispatch()

    def fail(self, exchange: Exchange, status: int, message: str, extra: bytes = b"") -> None:
        """Answer with txlb's own error response."""
        if exchange.cacheResult is not None:
            exchange.stopCaching()
        exchange.status = status
        exchange.error = message
        exchange.closeAfter = exchange.closeAfter or not exchange.requestDone
        if isGrpc(exchange.headers):
            # A gRPC client reads grpc-status, not a JSON body (txlb.http.grpc).
            data = grpcErrorResponse(status, message, exchange.requestId, exchange.closeAfter)
            self.out.write(data)
            exchange.bytesSent += len(data)
        else:
            exchange.bytesSent += self._writeError(status, message, exchange.requestId, exchange.closeAfter, extra)
        exchange.finished = True
        self.exchangeDone(exchange)

    def _writeError(self, status: int, message: str, rid: str, close: bool, extra: bytes = b"") -> int:
        data = errorResponse(status, message, rid, close, extra)
        self.out.write(data)
        return len(data)

    def exchangeDone(self, exchange: Exchange) -> None:
        """The head exchange is answered: log it, then the next one."""
        self.exchanges.popleft()
        self._logRequest(exchange)
        if exchange.closeAfter or self.closing:
            self.dead = True
            self.out.flush()
            self.transport.loseConnection()
            return
        if len(self.exchanges) < 2:
            self.gate.resume("pipeline")
        if self.exchanges:
            self._start(self.exchanges[0])
        elif self._inHead:
            self.arm(self.service.clientTimeout, self._headerTimeout)
        else:
            self.arm(self.service.idleTimeout, self._idle)

    def _refuse(self, status: int, message: str) -> None:
        """
        A request we will not forward: answer it in its turn, then close;
        read nothing more from this client.
        """
        self.dead = True
        self.gate.pause("refused")
        exchange, self.reading = self.reading, None
        if exchange is None:  # refused before its head was complete
            exchange = Exchange(self, b"-", self._url or b"-", [], False, "1.1")
            self.exchanges.append(exchange)
        exchange.refusal = (status, message)
        exchange.requestDone = True
        exchange.closeAfter = True
        if self.exchanges[0] is exchange:
            self._refuseNow(exchange)

    def _refuseNow(self, exchange: Exchange) -> None:
        if exchange.responseStarted:
            self.transport.abortConnection()
            return
        exchange.abort()
        self.fail(exchange, *exchange.refusal)

    def pipe(self, exchange: Exchange, backendData: bytes) -> None:
        """After a 101: copy bytes both ways, each side the other's producer."""
        conn = exchange.conn
        self.disarm()
        self.piping = True
        self.pipeTo = conn
        self.pipeExchange = exchange
        self.transport.registerProducer(conn.transport, True)
        conn.transport.registerProducer(self.transport, True)
        if self.gate.reasons:
            self.gate.reasons.clear()
            self.transport.resumeProducing()
        if backendData:
            exchange.pipeData(backendData)
        early, self.upgradeData = self.upgradeData, None
        if early:
            sendNow(conn.transport, early)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.h2 is not None:
            self.h2.connectionLost(reason)
        self.factory.open.remove(self)
        self.disarm()
        if self._timer is not None:
            self._timer.cancel()  # so that the closed connection can be collected
            self._timer = None
        self.dead = True
        for exchange in self.exchanges:
            if not exchange.abort(gently=self.piping):
                if not self.piping:
                    exchange.status = exchange.status or 499
                    exchange.error = exchange.error or "client closed the connection"
                self._logRequest(exchange)
        self.exchanges.clear()

    def _logRequest(self, exchange: Exchange) -> None:
        metrics = self.service.metrics
        if metrics is not None:
            metrics.httpRequest(self.service.name, exchange)
        if self.service.accessLog:
            logRequest(_log, exchange, self.service.name, self.client)
