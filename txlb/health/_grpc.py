# -*- test-case-name: tests.test_h2backend -*-
"""
The C{grpc} health check: the standard gRPC health protocol
(C{grpc.health.v1.Health/Check}) over HTTP/2, h2c or TLS with ALPN C{h2}
(the pool's C{tls}).

    [pools.grpc.health]
    kind = "grpc"
    options = { service = "pkg.Service" }   # default "": the server as a whole

The messages are tiny enough to write by hand rather than depend on
protobuf: the request is field 1 (C{service}, a string), the response
field 1 (C{status}, an enum: 1 = SERVING).  The check passes when the call
ends with C{grpc-status: 0} and the status is SERVING.
"""

from __future__ import annotations

import struct
from typing import Mapping, Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived
from h2.exceptions import H2Error
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.health._checks import _CheckProtocol, _start, hostHeader
from txlb.health._options import checkOptions, isString, option
from txlb.interfaces import CheckResult, IHealthCheck, IHealthCheckFactory
from txlb.net.tls import alpnRefusal

PATH = b"/grpc.health.v1.Health/Check"
#: ServingStatus names, by number.
STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
#: At most this much of the answer is read.
MAX_ANSWER = 16 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def checkRequest(service: str) -> bytes:
    """A HealthCheckRequest, framed as one gRPC message."""
    name = service.encode("utf-8")
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return struct.pack("!BL", 0, len(message)) + message


def _readVarint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def servingStatus(framed: bytes) -> int:
    """
    The C{status} of a framed HealthCheckResponse (0, UNKNOWN, when the
    field is absent, as protobuf says).

    @raise ValueError: not one uncompressed message that parses.
    """
    if len(framed) < 5:
        raise ValueError("no complete gRPC message")
    compressed, length = struct.unpack("!BL", framed[:5])
    if compressed:
        raise ValueError("a compressed message")
    message = framed[5:5 + length]
    if len(message) != length:
        raise ValueError("a truncated message")
    at, status = 0, 0
    while at < len(message):
        key, at = _readVarint(message, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _readVarint(message, at)
            if field == 1:
                status = value
        elif wire == 2:
            size, at = _readVarint(message, at)
            at += size
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        else:
            raise ValueError(f"wire type {wire}")
    if at > len(message):
        raise ValueError("a truncated field")
    return status


@implementer(IHandshakeListener)
class GRPCCheckProtocol(_CheckProtocol):
    """One Health/Check call on a fresh HTTP/2 connection."""

    def __init__(self, done: Deferred, authority: bytes, request: bytes) -> None:
        super().__init__(done)
        self.authority = authority
        self.request = request
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.body = b""
        self.status: Optional[int] = None
        self.grpcStatus: Optional[bytes] = None
        self.grpcMessage = b""
        self.finished = False

    def connectionMade(self) -> None:
        if self.aborted:
            self.transport.abortConnection()
            return
        h2 = self.h2
        scheme = b"https" if ISSLTransport.providedBy(self.transport) else b"http"
        h2.initiate_connection()
        sid = h2.get_next_available_stream_id()
        h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", scheme), (b":authority", self.authority),
            (b":path", PATH), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"user-agent", b"txlb-health-check"),
        ])
        h2.send_data(sid, self.request, end_stream=True)
        self.transport.write(h2.data_to_send())

    def handshakeCompleted(self) -> None:
        refusal = alpnRefusal(self.transport, b"h2")
        if refusal is not None:
            self._finish(CheckResult(False, f"the server {refusal}"))

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        try:
            events = self.h2.receive_data(data)
        except H2Error as e:
            self._finish(CheckResult(False, f"not HTTP/2: {e}"))
            return
        for event in events:
            if self.finished:
                return
            if isinstance(event, ResponseReceived):
                self._fields(event.headers)
            elif isinstance(event, TrailersReceived):
                self._fields(event.headers)
            elif isinstance(event, DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if len(self.body) > MAX_ANSWER:
                    self._finish(CheckResult(False, "answer too large"))
            elif isinstance(event, StreamEnded):
                self._judge()
            elif isinstance(event, StreamReset):
                self._finish(CheckResult(False, f"stream reset ({getattr(event.error_code, 'name', event.error_code)})"))
            elif isinstance(event, ConnectionTerminated):
                self._finish(CheckResult(False, "the server sent GOAWAY"))
        if not self.finished:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)

    def _fields(self, headers) -> None:
        for name, value in headers:
            if name == b":status":
                self.status = int(value)
            elif name == b"grpc-status":
                self.grpcStatus = value
            elif name == b"grpc-message":
                self.grpcMessage = value

    def _judge(self) -> None:
        if self.status != 200:
            self._finish(CheckResult(False, f"HTTP {self.status}"))
            return
        if self.grpcStatus != b"0":
            message = self.grpcMessage.decode("utf-8", "replace")
            code = (self.grpcStatus or b"none").decode("latin-1")
            self._finish(CheckResult(False, f"grpc-status {code}" + (f": {message}" if message else "")))
            return
        try:
            status = servingStatus(self.body)
        except ValueError as e:
            self._finish(CheckResult(False, f"unreadable HealthCheckResponse: {e}"))
            return
        name = STATUSES.get(status, str(status))
        self._finish(CheckResult(status == 1, name))

    def connectionLost(self, reason: Failure) -> None:
        if not self.finished:
            self.finished = True
            if not self.done.called:
                if reason.check(error.ConnectionDone, error.ConnectionLost):
                    self.done.callback(CheckResult(False, "connection closed before an answer"))
                else:
                    self.done.errback(reason)

    def _finish(self, result: CheckResult) -> None:
        self.finished = True
        self.conclude(result, abort=True)


@implementer(IHealthCheck)
class GRPCCheck:
    """C{grpc.health.v1.Health/Check} for C{service}; passes on SERVING."""

    #: What the connection offers in TLS's ALPN (the pool's TLS applies).
    alpn = (b"h2",)
    tls = None

    def __init__(self, service: str = "") -> None:
        self.service = service
        self.request = checkRequest(service)

    def check(self, server, endpoint, config) -> Deferred:
        authority = hostHeader(server.address).encode("idna")
        return _start(endpoint, lambda d: GRPCCheckProtocol(d, authority, self.request))


@implementer(IPlugin, IHealthCheckFactory)
class GRPCCheckFactory:
    name = "grpc"
    description = "the gRPC health protocol (grpc.health.v1.Health/Check) over HTTP/2; passes on SERVING"

    def __call__(self, options: Mapping[str, object]) -> IHealthCheck:
        checkOptions(self.name, options, frozenset({"service"}))
        return GRPCCheck(option(options, "service", "", isString,
                                'a gRPC service name, like "pkg.Service" ("" for the server)'))


grpcCheck = GRPCCheckFactory()
