# -*- test-case-name: tests.test_health -*-
"""
The built-in kinds of active check: C{http} and C{tcp}.

Each is an L{IHealthCheckFactory} (registered as a plugin in
C{twisted/plugins/txlb_health.py}) that makes an L{IHealthCheck}.  A check
opens one connection, reads a bounded amount, closes, and answers a
L{CheckResult}; timing, timeouts and rise/fall are L{HealthChecks}' job.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Optional

import httptools
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.health._options import checkOptions, isHostName, option
from txlb.health._tls import TLS_OPTIONS, TLSOptions, tlsOptions
from txlb.interfaces import CheckResult, IHealthCheck, IHealthCheckFactory
from txlb.net.endpoints import connectFailure
from txlb.net.tls import handshakeError

#: At most this much of a response body is read; a body that needs more
#: fails a check that must look at it (C{expect_json}).
MAX_BODY = 64 * 1024
#: At most this much of a response head (status line and headers).
MAX_HEAD = 16 * 1024
#: How much of a body a failure's detail quotes.
EXCERPT = 120


def describeFailure(failure: Failure) -> str:
    """
    A failed check's error in an operator's words, for the reason of a
    C{server_state} event.
    """
    if failure.check(error.ConnectionRefusedError):
        return "connection refused"
    failedTLS = handshakeError(failure)
    if failedTLS is not None:
        return f"TLS failed: {failedTLS}"
    if failure.check(error.DNSLookupError):
        return f"DNS lookup failed: {failure.getErrorMessage()}"
    if failure.check(error.ConnectError):
        return f"connect failed: {connectFailure(failure)}"
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        return "connection closed before a response"
    return failure.getErrorMessage() or failure.type.__name__


def excerpt(body: bytes, limit: int = EXCERPT) -> str:
    """The start of C{body} as one line of text."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _addressFields(address: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in re.split(r"(?<!\\):", address)[1:]:
        key, eq, value = part.partition("=")
        if eq:
            fields[key] = value.replace("\\:", ":").replace("\\=", "=").replace("\\\\", "\\")
    return fields


def hostOf(address: str) -> str:
    """The host of a TCP-like endpoint string, or C{""}."""
    return _addressFields(address).get("host", "")


def hostHeader(address: str) -> str:
    """
    The C{Host} header for a server's endpoint string: C{host:port} for
    TCP-like endpoints (IPv6 in brackets), else C{localhost}.
    """
    fields = _addressFields(address)
    host = fields.get("host")
    if not host:
        return "localhost"
    if ":" in host:
        host = f"[{host}]"
    port = fields.get("port")
    return f"{host}:{port}" if port else host


def _sameValue(value: Any, accepted: Any) -> bool:
    # JSON true is not 1 and 1 is not true, though Python says they are equal.
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def jsonMismatch(body: bytes, expect: Mapping[str, tuple[Any, ...]]) -> Optional[str]:
    """
    Why C{body} does not satisfy C{expect_json} (every named top-level
    field equals one of its accepted values), or L{None} when it does.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if not isinstance(document, dict):
        return "body is not a JSON object"
    for field, accepted in expect.items():
        if field not in document:
            return f"no field {field!r}"
        value = document[field]
        if not any(_sameValue(value, a) for a in accepted):
            return f"{field} = {json.dumps(value)}, expected one of {json.dumps(list(accepted))}"
    return None


class _CheckProtocol(Protocol):
    """Common plumbing: one result, delivered once, then the connection goes."""

    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.aborted = False
        self.cancelConnecting: Callable[[], None] = lambda: None

    def abort(self) -> None:
        """The check was cancelled: drop the connection, if any, at once."""
        self.aborted = True
        if self.transport is not None:
            self.transport.abortConnection()

    def conclude(self, result: CheckResult | Failure, abort: bool = False) -> None:
        """
        Deliver the result and close: politely after a whole answer, at
        once (C{abort}) when the rest of it is not wanted.
        """
        if self.transport is not None:
            if abort:
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()
        if not self.done.called:
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(result)


def _start(endpoint, make: Callable[[Deferred], _CheckProtocol]) -> Deferred:
    """
    Connect the protocol C{make} builds around the check's Deferred, and
    return that Deferred: a failure to connect fails the check, and
    cancelling the check cancels the attempt or drops the connection.
    """
    protocol: Optional[_CheckProtocol] = None

    def cancel(done: Deferred) -> None:
        protocol.cancelConnecting()
        protocol.abort()

    done: Deferred = Deferred(cancel)
    protocol = make(done)
    connecting = connectProtocol(endpoint, protocol)

    def failed(failure: Failure) -> None:
        if not done.called:
            done.errback(failure)

    connecting.addErrback(failed)
    protocol.cancelConnecting = connecting.cancel
    return done


# tcp


@implementer(IHandshakeListener)
class _Connected(_CheckProtocol):
    def __init__(self, done: Deferred, tls: bool) -> None:
        super().__init__(done)
        self.tls = tls

    def connectionMade(self) -> None:
        if self.aborted:
            self.transport.abortConnection()
        elif not self.tls and not ISSLTransport.providedBy(self.transport):
            # Plaintext: connected is all there is to it.  Over TLS (the
            # check's own or the pool's) the handshake must complete.
            self.conclude(CheckResult(True, "connected"))

    def handshakeCompleted(self) -> None:
        self.conclude(CheckResult(True, "TLS handshake completed"))

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(error.ConnectionDone, error.ConnectionLost):
            self.done.callback(CheckResult(False, "connection closed during the TLS handshake"))
        else:
            self.done.errback(reason)


@implementer(IHealthCheck)
class TCPCheck:
    """
    Passes when a connection to the server is made (over TLS, the check's
    own or its pool's: when the TLS handshake completes), then closes it.
    """

    def __init__(self, tls: Optional[TLSOptions] = None) -> None:
        self.tls = tls

    def check(self, server, endpoint, config) -> Deferred:
        if self.tls is not None:
            endpoint = self.tls.wrap(endpoint, hostOf(server.address))
        return _start(endpoint, lambda d: _Connected(d, self.tls is not None))


@implementer(IPlugin, IHealthCheckFactory)
class TCPCheckFactory:
    name = "tcp"
    description = "passes when a TCP connection (or TLS handshake) to the server succeeds"

    def __call__(self, options: Mapping[str, object]) -> IHealthCheck:
        checkOptions(self.name, options, TLS_OPTIONS)
        return TCPCheck(tlsOptions(options))


# http


class HTTPCheckProtocol(_CheckProtocol):
    """
    Send one request, parse the response with httptools, judge it.

    Reads at most L{MAX_HEAD} bytes of head and L{MAX_BODY} of body; the
    connection is closed as soon as the answer is known.
    """

    def __init__(self, done: Deferred, request: bytes, config) -> None:
        super().__init__(done)
        self.request = request
        self.config = config
        self.head = config.method == "HEAD"
        self.parser = httptools.HttpResponseParser(self)
        self.received = 0
        self.status: Optional[int] = None
        self.body = bytearray()
        self.finished = False

    def connectionMade(self) -> None:
        if self.aborted:
            self.transport.abortConnection()
            return
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        waiting = self.status is None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self.finished:
                self._finish(CheckResult(False, f"malformed response: {e}"), abort=True)
            return
        if waiting and self.status is None and not self.finished:
            self.received += len(data)
            if self.received > MAX_HEAD:
                self._finish(CheckResult(False, "response head too large"), abort=True)

    def connectionLost(self, reason: Failure) -> None:
        if self.finished:
            return
        if self.status is not None:
            # A body delimited by the end of the connection, or cut short:
            # judge what came.
            self._judge()
        else:
            self._finish(reason)

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:
            self.status = None  # an interim answer; the real one follows
            self.received = 0
        elif self.head or self.status in (204, 304):
            self._judge()

    def on_body(self, body: bytes) -> None:
        if self.finished:
            return
        room = MAX_BODY - len(self.body)
        self.body += body[:room]
        if len(body) > room:
            self._judge(oversized=True)

    def on_message_complete(self) -> None:
        if not self.finished and self.status is not None:
            self._judge()

    def _judge(self, oversized: bool = False) -> None:
        config = self.config
        body = bytes(self.body)
        status = self.status
        quoted = excerpt(body)
        if status not in config.expect_status:
            detail = f"HTTP {status} {quoted}" if quoted else f"HTTP {status}"
            self._finish(CheckResult(False, detail), oversized)
            return
        if config.expect_json:
            if oversized:
                why: Optional[str] = f"body larger than {MAX_BODY // 1024} KiB"
            else:
                why = jsonMismatch(body, config.expect_json)
            if why is not None:
                detail = f"HTTP {status} {why}: {quoted}" if quoted else f"HTTP {status} {why}"
                self._finish(CheckResult(False, detail), oversized)
                return
        self._finish(CheckResult(True, f"HTTP {status}"), oversized)

    def _finish(self, result: CheckResult | Failure, abort: bool = False) -> None:
        self.finished = True
        self.conclude(result, abort)


@implementer(IHealthCheck)
class HTTPCheck:
    """
    C{METHOD path HTTP/1.1} with C{Host} and C{Connection: close}; passes
    when the status is one of C{expect_status} and, with C{expect_json},
    the body is a JSON object whose named fields each equal an accepted
    value.

    @param host: the C{Host} header, or L{None} for the server's own
        C{host:port}.
    @param tls: speak HTTPS (see L{txlb.health._tls}).
    """

    def __init__(self, host: Optional[str] = None, tls: Optional[TLSOptions] = None) -> None:
        self.host = host
        self.tls = tls

    def request(self, server, config) -> bytes:
        """The request bytes for C{server}."""
        host = self.host or hostHeader(server.address)
        return (
            f"{config.method} {config.path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: txlb-health-check\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")

    def check(self, server, endpoint, config) -> Deferred:
        if self.tls is not None:
            endpoint = self.tls.wrap(endpoint, hostOf(server.address))
        request = self.request(server, config)
        return _start(endpoint, lambda d: HTTPCheckProtocol(d, request, config))


@implementer(IPlugin, IHealthCheckFactory)
class HTTPCheckFactory:
    name = "http"
    description = "an HTTP request to path; passes on expect_status (and expect_json)"

    def __call__(self, options: Mapping[str, object]) -> IHealthCheck:
        checkOptions(self.name, options, frozenset({"host"}) | TLS_OPTIONS)
        host = option(options, "host", None, isHostName, "a host name (the Host header to send)")
        return HTTPCheck(host, tlsOptions(options))


tcpCheck = TCPCheckFactory()
httpCheck = HTTPCheckFactory()
