# -*- test-case-name: tests.test_h2frontend -*-
"""
One stream of a client's HTTP/2 connection (L{txlb.http.h2frontend}): an
L{H2Stream} is a frontend of its own for exactly one
L{txlb.http.exchange.Exchange}, so that a stream goes through the very code
an HTTP/1.1 request does.  L{_StreamTransport} is what the exchange takes
for its client's transport (pausing it holds back the stream's request
body); L{_Response} reads back txlb's own answers (errors, redirects, the
cache's), which are written as HTTP/1.1 bytes.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Optional

import httptools
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from txlb.http import h2wire
from txlb.http.h2wire import StreamClosed
from txlb.http.exchange import Exchange
from txlb.http.frontend import HTTPFrontend, ReadGate
from txlb.http.h2fields import RESPONSE_DROP
from txlb.net.wire import backlogged

if TYPE_CHECKING:  # pragma: no cover
    from txlb.http.h2frontend import H2Connection

_log = Logger(namespace="txlb.http2")

#: Response bytes a stream buffers beyond its send window before it pauses
#: the backend connection it reads from.
HIGH_WATER = 64 * 1024


@implementer(IPushProducer)
class _StreamTransport:
    """
    What an exchange takes for its client's transport: one stream of the
    connection.  Pausing it stops acknowledging the stream's request body;
    the producer registered on it is the backend connection the response
    comes from.
    """

    disconnecting = False
    TLS = False

    def __init__(self, stream: "H2Stream") -> None:
        #: The stream; L{None} once it ended (L{H2Stream.release}): what is
        #: asked of this transport after that is too late to matter.
        self.stream: Optional[H2Stream] = stream
        self.connection = stream.connection
        self.producer = None
        self.paused = False

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        stream = self.stream
        if stream is not None:
            stream.producerPaused = False
            stream.checkProducer()

    def unregisterProducer(self) -> None:
        # The backend connection may go back to the idle pool: not paused.
        producer, self.producer = self.producer, None
        stream = self.stream
        if stream is not None and stream.producerPaused and producer is not None:
            stream.producerPaused = False
            producer.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.stream is not None:
            self.stream.ackHeld()

    def stopProducing(self) -> None:
        self.abortConnection()

    def write(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.out.write(data)

    def loseConnection(self) -> None:
        if self.stream is not None:
            self.stream.cut(h2wire.CANCEL)

    def abortConnection(self) -> None:
        if self.stream is not None:
            self.stream.cut(h2wire.INTERNAL_ERROR)

    def getPeer(self):
        return self.connection.transport.getPeer()

    def getHost(self):
        return self.connection.transport.getHost()


class _Response:
    """
    The stream's C{out}.  A backend's response reaches the stream as
    fields (L{H2Stream.respond}); its body bytes are written here as they
    are and leave as DATA frames, those of one backend read together
    (L{hold}, L{flush}).  txlb's own answers (errors, redirects, the
    cache's stored responses) are written as HTTP/1.1 bytes, which a
    parser made for them alone (llhttp, in C) reads back into HEADERS and
    DATA frames.
    """

    #: Not L{None}: an exchange then never splices a body to this "socket".
    out = ()
    #: The head went out by L{H2Stream.respond}: what is written is body.
    direct = False
    #: Within a backend read: DATA frames wait for its end (L{flush}).
    holding = False
    _held = False
    interim = False
    done = False
    parser = None

    def __init__(self, stream: "H2Stream", noBody: bool) -> None:
        #: The stream; L{None} once it ended (L{H2Stream.release}).
        self.stream: Optional[H2Stream] = stream
        self.connection = stream.connection
        self.noBody = noBody

    def write(self, data: bytes) -> None:
        stream = self.stream
        if self.done or stream is None:
            return
        if self.direct:
            if data and not stream.finished:
                stream.buffer.append(data)
                stream.buffered += len(data)
            if not self.holding:
                stream.push()
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
            self.headers: list = []
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:  # pragma: no cover - txlb wrote it
            _log.error("HTTP/2 stream {sid}: unreadable response: {e}", sid=self.stream.streamId, e=str(e))
            self.done = True
            self.stream.cut(h2wire.INTERNAL_ERROR)
            return
        if stream.buffer or stream.ending:
            stream.push()  # once per write: the last DATA frame carries END_STREAM
        stream.connection.send()

    def hold(self) -> bool:
        self.holding = True
        self._held = self.connection.hold()
        return True

    def flush(self) -> None:
        self.holding = False
        stream = self.stream
        if stream is not None and self.direct and (stream.buffer or stream.ending):
            stream.push()  # the read's body in as few frames as the window allows; END_STREAM on the last
        # The stream may have ended within the read: the connection's
        # gathering ends all the same.
        if self._held:
            self._held = False
            self.connection.flush()
        else:
            self.connection.send()

    # httptools callbacks.

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self.headers = self.headers, []
        if status < 200:
            self.interim = True
            if status != 101:
                self.stream.sendHead([(b":status", b"%d" % status)], False)
            return
        stream = self.stream
        block, empty = stream.connection.encoder.responseBlock(status, headers)
        # No body: one HEADERS frame (a gRPC "trailers-only" answer, too).
        end = empty or self.noBody or status == 204 or status == 304
        if end:
            self.done = True
        stream.sendBlock(block, end)

    def on_body(self, data: bytes) -> None:
        self.stream.sendBody(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.done:
            self.done = True
            # Fields after the body are the last chunk's trailers.
            trailers, self.headers = self.headers, []
            if trailers:
                self.stream.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in RESPONSE_DROP]
            self.stream.sendEnd()


class H2Stream(HTTPFrontend):
    """
    One HTTP/2 stream, as the frontend of its one exchange: every method
    that routes, picks, connects, answers errors and logs is
    L{HTTPFrontend}'s own; what differs is how bytes reach the client.
    """

    protocol = "HTTP/2"
    #: Responses reach the stream as fields (L{respond}), not as HTTP/1.1.
    framesResponses = True
    #: The backend connection is paused by this stream.
    producerPaused = False
    #: The response's END_STREAM went out (or the stream was cut).
    finished = False
    #: The response's trailer fields, sent after its body (gRPC's status).
    trailers: Optional[list] = None

    def __init__(self, connection: H2Connection, streamId: int, noBody: bool, state: h2wire.Stream) -> None:
        # Not HTTPFrontend.__init__: a stream has no parser and no socket.
        frontend = connection.frontend
        self.connection = connection
        self.streamId = streamId
        #: The codec's side of the stream: its windows and state.
        self.state = state
        self.factory = frontend.factory
        self.service = connection.service
        self.client = frontend.client
        self.clientCert = frontend.clientCert  # what the connection's TLS proved
        self.exchanges: deque[Exchange] = deque()
        self.reading = None
        self._timer = None
        self.dead = False
        self.transport = _StreamTransport(self)
        self.gate = ReadGate(self.transport)
        self.out = _Response(self, noBody)
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.ending = False
        self.unacked = 0
        self.bodyBytes = 0

    @property
    def closing(self) -> bool:
        return self.connection.closing

    def begin(self, method: bytes, path: bytes, headers: list, ended: bool,
              refusal: Optional[tuple[int, str]]) -> None:
        """Make the stream's exchange and start it."""
        exchange = Exchange(self, method, path, headers, True, "1.1")
        exchange.protocol = self.protocol
        if not ended and not exchange.length and refusal is None:
            # No content-length: the body's end is END_STREAM, and the
            # backend gets it chunked.
            exchange.chunked = exchange.hasBody = True
            exchange.requestDone = False
        elif ended and exchange.length:
            refusal = refusal or (400, "content-length but no body")
        maxBody = self.service.maxBody
        if refusal is None and maxBody and exchange.length > maxBody:
            refusal = (413, f"request body larger than {maxBody} bytes")
        self.exchanges.append(exchange)
        if refusal is not None:
            exchange.refusal = refusal
            exchange.requestDone = True
        self.reading = exchange if exchange.hasBody and not ended else None
        self._start(exchange)

    # The request body.

    def received(self, data: bytes, size: int) -> None:
        exchange = self.reading
        if exchange is None or exchange.finished:
            self.connection._ack(size, self.streamId)
            return
        self.bodyBytes += len(data)
        exchange.received = self.bodyBytes
        maxBody = self.service.maxBody
        if maxBody and self.bodyBytes > maxBody:
            self.reading = None
            self.connection._ack(size, self.streamId)
            exchange.refusal = (413, f"request body larger than {maxBody} bytes")
            exchange.requestDone = True
            self._refuseNow(exchange)
            return
        if data:
            exchange.requestBody(data)
        if self.transport.paused:
            self.unacked += size
        else:
            self.connection._ack(size, self.streamId)

    def ackHeld(self) -> None:
        """The backend takes the body again: let the client send more."""
        size, self.unacked = self.unacked, 0
        if size:
            self.connection._ack(size, self.streamId)
            self.connection.send()

    def requestEnded(self) -> None:
        exchange, self.reading = self.reading, None
        if exchange is not None and not exchange.finished:
            exchange.requestEnd()

    def requestTrailers(self, headers: list) -> None:
        """Trailer fields after the request body: for an HTTP/2 backend (gRPC)."""
        exchange = self.reading
        if exchange is not None:
            exchange.requestTrailers = [(n, v) for n, v in headers if n[:1] != b":"]

    # The response: from the exchange (ExchangeOwner's respond, respondEnd).

    def respond(self, status: int, lines: list, end: bool) -> None:
        """A backend's response head, its lines as the client gets them: one HEADERS frame."""
        out = self.out
        if out.done or self.finished:
            return
        if status < 200:
            if status != 101:
                self.sendHead([(b":status", b"%d" % status)], False)
                self.connection.send()
            return
        out.direct = True
        # No body: one HEADERS frame (a gRPC "trailers-only" answer, too).
        end = end or out.noBody or status == 204 or status == 304
        if end:
            out.done = True
        self.sendBlock(self.connection.encoder.responseLines(status, lines), end)
        self.connection.send()

    def respondEnd(self, trailers: Optional[list]) -> None:
        """The body is over: END_STREAM on its last DATA frame, or a trailing HEADERS frame."""
        out = self.out
        if not out.direct or out.done:
            return  # the head said there is no body, or txlb's own answer is read back
        out.done = True
        if trailers:
            self.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in RESPONSE_DROP]
        self.sendEnd()
        if not out.holding:
            self.push()

    # The response (from L{_Response}, reading txlb's own answers).

    def sendHead(self, headers: list, end: bool) -> None:
        if self.finished:
            return
        self.connection.wire.sendHeaders(self.state, headers, end)
        if end:
            self._sent()

    def sendBlock(self, block: bytes, end: bool) -> None:
        """L{sendHead} of a block already encoded."""
        if self.finished:
            return
        self.connection.wire.sendBlock(self.state, block, end)
        if end:
            self._sent()

    def sendBody(self, data: bytes) -> None:
        if self.finished or not data:
            return
        self.buffer.append(data)
        self.buffered += len(data)

    def sendEnd(self) -> None:
        if not self.finished:
            self.ending = True

    def push(self) -> None:
        """Send what the stream's window allows; pause or resume the backend."""
        if self.finished:
            return
        wire = self.connection.wire
        state = self.state
        buffer = self.buffer
        sent = ended = False
        last = self.ending and self.trailers is None
        try:
            while buffer:
                room = wire.window(state)
                if room <= 0:
                    break
                chunk = buffer[0]
                if len(chunk) <= room:
                    buffer.popleft()
                    self.buffered -= len(chunk)
                    ended = last and not buffer
                    wire.sendData(state, chunk, ended)
                else:
                    buffer[0] = chunk[room:]
                    self.buffered -= room
                    wire.sendData(state, chunk[:room], False)
                sent = True
            if not buffer and self.ending and not ended:
                if self.trailers is not None:
                    wire.sendHeaders(state, self.trailers, True)
                else:
                    wire.sendData(state, b"", True)
                sent = True
        except StreamClosed:
            # The client closed or reset the stream meanwhile.
            self.finished = True
            self.abandon("the client reset the stream")
            return
        if sent:
            exchange = self.exchanges[0] if self.exchanges else None
            if exchange is not None:
                exchange.lastMoved = self.service.clock.seconds()
            self.connection.send()
        if not buffer and self.ending:
            self._sent()
            return
        self.checkProducer()

    def checkProducer(self) -> None:
        """Pause the backend while the client cannot take more, resume after."""
        producer = self.transport.producer
        if producer is None:
            return
        stop = self.buffered > HIGH_WATER or self.connection.socketFull
        if stop and not self.producerPaused:
            self.producerPaused = True
            producer.pauseProducing()
        elif not stop and self.producerPaused:
            self.producerPaused = False
            producer.resumeProducing()

    def _sent(self) -> None:
        """END_STREAM is out; the exchange may still have to say it is done."""
        self.finished = True
        self.buffer.clear()
        self.buffered = 0
        if self.producerPaused and self.transport.producer is not None:
            self.producerPaused = False
            self.transport.producer.resumeProducing()
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if not self.finished or self.exchanges:
            return
        if self.reading is not None or self.unacked:
            # Answered before the request body was all in: stop the
            # upload (RFC 9113 8.1), giving the connection its window back.
            self.reading = None
            size, self.unacked = self.unacked, 0
            self.connection._ack(size, self.streamId)
            self.connection.wire.reset(self.streamId, h2wire.NO_ERROR)
            self.connection.send()
        if self._timer is not None:
            self.connection.putTimer(self._timer)
            self._timer = None
        self.connection.streamDone(self)

    # HTTPFrontend's hooks, for a stream.

    def backlogged(self) -> bool:
        # The stream's window is shut, or the connection's socket is full.
        return bool(self.buffer) or self.connection.socketFull or backlogged(self.connection.transport)

    def exchangeDone(self, exchange: Exchange) -> None:
        self.exchanges.popleft()
        self._logRequest(exchange)
        self.disarm()
        self._closeIfDone()

    def cut(self, code: int) -> None:
        """End the stream with RST_STREAM, as a socket is aborted."""
        if not self.finished:
            self.finished = True
            self.connection.wire.reset(self.streamId, code)
            self.connection.send()
        # As a transport's abort reports its loss: not from inside the
        # exchange's own call.
        self.service.clock.callLater(0, self.abandon, "client closed the connection")

    def abandon(self, why: str) -> None:
        """The stream is gone (reset, cut, or the connection ended)."""
        self.finished = True
        self.buffer.clear()
        self.buffered = 0
        if self.unacked:
            size, self.unacked = self.unacked, 0
            self.connection._ack(size, self.streamId)
        self.reading = None
        self.disarm()
        if self._timer is not None:
            self.connection.putTimer(self._timer)
            self._timer = None
        exchanges, self.exchanges = self.exchanges, deque()
        for exchange in exchanges:
            if not exchange.abort():
                exchange.status = exchange.status or 499
                exchange.error = exchange.error or why
                self._logRequest(exchange)
        self.connection.streamDone(self)

    def release(self) -> None:
        """
        The stream is over and its connection let go of it: its transport
        and its response reader stop referring to it, so that reference
        counting frees the stream's objects at once.  They refer to each
        other; left to the cyclic garbage collector, which found them only
        after they had outlived a collection or two, they cost about a
        tenth of a request's CPU time at 100 streams per connection.
        """
        self.transport.stream = None
        self.out.stream = None

    def _newTimer(self, seconds: float):
        # A timer that the connection's streams pass on to each other.
        return self.connection.takeTimer(self, seconds)

    def connectionMade(self) -> None:  # pragma: no cover - never on a socket
        raise NotImplementedError

    def connectionLost(self, reason=None) -> None:  # pragma: no cover - see abandon
        self.abandon("client closed the connection")
