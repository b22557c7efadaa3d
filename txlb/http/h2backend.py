# -*- test-case-name: tests.test_h2backend -*-
"""
Backends reached over HTTP/2: the pools that say C{protocol = "h2"}.

A request to such a pool is one stream on a connection to the server:
C{h2c} (the HTTP/2 preface straight away) on plaintext, or TLS with ALPN
C{h2} and the pool's own certificate checks.  L{H2Backends} keeps a small
set of connections per server, and opens another only when every one has
as many streams open as the server's C{SETTINGS_MAX_CONCURRENT_STREAMS}
allows, or is going away.

An L{H2Stream} is what an exchange (L{txlb.http.exchange.Exchange}) sees
as its backend connection: it takes the HTTP/1.1 request head and body the
exchange writes, as it would to an HTTP/1.1 server, and turns them into
HEADERS and DATA frames (the framing and hop-by-hop headers go; C{te:
trailers} stays for gRPC); it reports the response to the exchange with
the same calls an HTTP/1.1 connection makes, plus C{responseTrailers}.
So routing, retries, stickiness, caching, header rules, events and metrics
are the HTTP/1.1 path's, unchanged.

Flow control is per stream, both ways: the response's window is handed
back to the server only while the client side reads (the stream is the
client transport's producer, paused when the client is slow), and a
request body waits for the server's window, pausing the client side when
more than L{MAX_BUFFERED} bytes wait.

A GOAWAY from a server drains its connection: the streams it says it never
took (above its last stream id) fail as unprocessed, so the exchange
retries them on another connection; the others finish; new streams go to
a fresh connection.  The h2 library closes its whole connection state on
a GOAWAY and would then refuse the frames of the streams still running,
so GOAWAY frames are taken out of the byte stream here (L{_FrameSplitter})
and never reach it.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    InformationalResponseReceived,
    PushedStreamReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import Settings, SettingCodes
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from txlb.http.grpc import wantsTrailers
from txlb.net.endpoints import hostOf
from txlb.net.tls import alpnRefusal, closedAfterHandshake, handshakeError
from txlb.net.wire import sendNow

#: What a TLS connection to an h2 pool's servers offers in ALPN.
ALPN = (b"h2",)
#: The window each response stream starts with, and the connection's.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Request body bytes a stream holds while the server's window is closed
#: before the client side is paused.
MAX_BUFFERED = 64 * 1024
#: A connection with no stream for this long is closed.
IDLE_TIMEOUT = 30.0
#: Streams a connection is assumed to take until the server's SETTINGS say.
ASSUMED_STREAMS = 100

_DEFAULT_WINDOW = 65535
_GOAWAY = 0x7
#: Request headers HTTP/2 forbids (RFC 9113 8.2.2), or that become
#: pseudo-headers (Host).
_NOT_FORWARDED = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"host"}
)


class _Dechunk:
    """
    Takes chunked framing off a request body: the exchange frames a body
    of unknown length as it would for an HTTP/1.1 server, and HTTP/2 has
    frames of its own.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.left = 0  # bytes of the current chunk's data still to come
        self.crlf = 0  # bytes of the CRLF after the chunk's data still to come
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        at = 0
        size = len(buffer)
        while at < size and not self.ended:
            if self.left:
                piece = buffer[at:at + self.left]
                out.append(piece)
                self.left -= len(piece)
                at += len(piece)
                if not self.left:
                    self.crlf = 2
            elif self.crlf:
                skip = min(self.crlf, size - at)
                self.crlf -= skip
                at += skip
            else:
                end = buffer.find(b"\r\n", at)
                if end < 0:
                    self.buffer = buffer[at:]
                    break
                length = int(buffer[at:end].split(b";", 1)[0], 16)
                at = end + 2
                if length:
                    self.left = length
                else:
                    self.ended = True  # the trailer section (none, as txlb writes it) is not needed
        return out


class _FrameSplitter:
    """
    Splits what a server sends at HTTP/2 frame boundaries just enough to
    take GOAWAY frames out: everything else goes on as it came, in runs.
    """

    def __init__(self) -> None:
        self.head = b""     # an incomplete frame header, or a GOAWAY being gathered
        self.passing = 0    # payload bytes of the current frame still to pass on
        self.gathering = 0  # a GOAWAY frame's total size, while gathering it

    def feed(self, data: bytes) -> list:
        """Byte runs for h2 and C{(lastStreamId, errorCode)} tuples, in order."""
        out: list = []
        at, size = 0, len(data)
        start = 0
        while at < size:
            if self.passing:
                step = min(self.passing, size - at)
                self.passing -= step
                at += step
                continue
            if self.gathering:
                if start < at:
                    out.append(data[start:at])
                need = self.gathering - len(self.head)
                self.head += data[at:at + need]
                at += min(need, size - at)
                start = at
                if len(self.head) == self.gathering:
                    payload = self.head[9:]
                    self.head, self.gathering = b"", 0
                    last, code = struct.unpack("!LL", payload[:8]) if len(payload) >= 8 else (0, 1)
                    out.append((last & 0x7FFFFFFF, code))
                continue
            if self.head or size - at < 9:
                if start < at:
                    out.append(data[start:at])
                need = 9 - len(self.head)
                self.head += data[at:at + need]
                at += min(need, size - at)
                start = at
                if len(self.head) < 9:
                    break
                header, self.head = self.head, b""
                if header[3] == _GOAWAY:
                    self.head = header
                    self.gathering = 9 + int.from_bytes(header[:3], "big")
                else:
                    out.append(header)
                    self.passing = int.from_bytes(header[:3], "big")
                continue
            if data[at + 3] == _GOAWAY:
                if start < at:
                    out.append(data[start:at])
                start = at
                self.gathering = 9 + int.from_bytes(data[at:at + 3], "big")
                continue
            self.passing = int.from_bytes(data[at:at + 3], "big")
            at += 9
        if start < at and not self.gathering and not (self.head and start == at):
            out.append(data[start:at])
        return out


@implementer(IPushProducer, IConsumer)
class H2Stream:
    """
    One request and its response on an L{H2BackendConnection}: what an
    exchange holds as its backend connection, and that connection's
    C{transport} too (so that C{write}, C{registerProducer},
    C{pauseProducing} and C{abortConnection} act on this stream alone).
    """

    exchange = None
    #: The connection served streams before this one: a close before any
    #: answer may be the server's idle timeout, and the request is replayed.
    reused = False
    closed = False
    piping = False
    splice = None
    #: The response, as the exchange reads it (see
    #: L{txlb.http.backend.BackendConnection}): no body to come; neither
    #: delimited by close nor chunked (HTTP/2 frames it); its length.
    done = False
    closeDelimited = False
    chunked = False
    lengthValue: Optional[bytes] = None
    inHead = True
    gotBytes = False
    streamId: Optional[int] = None
    noBody = False

    def __init__(self, connection: "H2BackendConnection") -> None:
        self.connection = connection
        self.server = connection.server
        self.transport = self
        self._out: deque[bytes] = deque()
        self._outSize = 0
        self._bodyLeft = -1
        self._dechunk: Optional[_Dechunk] = None
        self._bodyComplete = False
        self._localEnded = False
        self._producer = None
        self._producerPaused = False
        self._paused = False
        self._owed = 0

    # What the exchange calls as on an HTTP/1.1 connection.

    def send(self, exchange, head: bytes, noBody: bool) -> None:
        """
        Start the stream with C{head}, the HTTP/1.1 request head the
        exchange built (already rewritten: X-Forwarded-*, X-Request-ID,
        header rules), as HEADERS.
        """
        self.exchange = exchange
        self.noBody = noBody
        conn = self.connection
        if exchange.upgrade is not None:
            self._failSoon(f"{self.server.name}: pool {exchange.pool.name} speaks HTTP/2, which has no "
                           "Upgrade; WebSocket needs an HTTP/1.1 pool", gotBytes=True)
            return
        if not conn.usable:
            self._failSoon(f"{self.server.name} went away before the request was sent", unprocessed=True)
            return
        lines = head.split(b"\r\n")
        method, _, rest = lines[0].partition(b" ")
        target = rest.rpartition(b" ")[0]
        authority = b""
        fields = []
        length = -1
        for line in lines[1:]:
            if not line:
                break
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip()
            if name in _NOT_FORWARDED:
                if name == b"host":
                    authority = value
                continue
            if name == b"content-length":
                length = int(value)
            fields.append((name, value))
        if wantsTrailers(exchange.headers):
            fields.append((b"te", b"trailers"))
        if not authority:
            authority = hostOf(self.server.address).encode("idna")
        headers = [(b":method", method), (b":scheme", conn.scheme), (b":authority", authority),
                   (b":path", target)] + fields
        if exchange.chunked:
            self._dechunk = _Dechunk()
        elif length > 0:
            self._bodyLeft = length
        else:
            self._bodyComplete = True
        h2 = conn.h2
        try:
            self.streamId = sid = h2.get_next_available_stream_id()
            conn.started(self)
            h2.send_headers(sid, headers, end_stream=self._bodyComplete and not self._trailers())
        except H2Error as e:
            self._failSoon(f"{self.server.name}: cannot send the request over HTTP/2: {e}")
            return
        if self._bodyComplete and self._trailers():
            self._endRequest()
        conn.flush()

    def _trailers(self):
        return getattr(self.exchange, "requestTrailers", None)

    def write(self, data: bytes) -> None:
        if self.closed or self._localEnded or self.streamId is None:
            return
        if self._dechunk is not None:
            pieces = self._dechunk.feed(data)
            if self._dechunk.ended:
                self._bodyComplete = True
        else:
            pieces = (data,)
            if self._bodyLeft >= 0:
                self._bodyLeft -= len(data)
                if self._bodyLeft <= 0:
                    self._bodyComplete = True
        for piece in pieces:
            if piece:
                self._out.append(piece)
                self._outSize += len(piece)
        self.pump()
        self.connection.flush()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def pump(self) -> None:
        """Send what the server's window allows of the request body."""
        if self.closed or self.streamId is None:
            return
        conn = self.connection
        h2 = conn.h2
        out = self._out
        sid = self.streamId
        while out and not conn.writePaused:
            window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = out[0]
            if len(chunk) > window:
                piece, out[0] = chunk[:window], chunk[window:]
            else:
                piece = out.popleft()
            self._outSize -= len(piece)
            h2.send_data(sid, piece)
        producer = self._producer
        if producer is not None:
            if self._outSize > MAX_BUFFERED:
                if not self._producerPaused:
                    self._producerPaused = True
                    producer.pauseProducing()
            elif self._producerPaused and self._outSize <= MAX_BUFFERED // 2:
                self._producerPaused = False
                producer.resumeProducing()
        if not out and self._bodyComplete and not self._localEnded and self.exchange is not None \
                and self.exchange.requestDone:
            self._endRequest()

    def _endRequest(self) -> None:
        self._localEnded = True
        trailers = self._trailers()
        h2 = self.connection.h2
        if trailers:
            h2.send_headers(self.streamId, [(n.lower(), v) for n, v in trailers
                                            if n[:1] != b":" and n.lower() not in _NOT_FORWARDED],
                            end_stream=True)
        else:
            h2.end_stream(self.streamId)

    def registerProducer(self, producer, streaming: bool) -> None:
        self._producer = producer
        self._producerPaused = False
        if self._outSize > MAX_BUFFERED:
            self._producerPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        """The exchange's request is whole (or it stops feeding us)."""
        self._producer = None
        self._producerPaused = False
        if not self.closed and self.streamId is not None:
            self.pump()
            self.connection.flush()

    # The response side, as the client transport's producer.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        owed, self._owed = self._owed, 0
        if owed and not self.closed:
            self.connection.h2.increment_flow_control_window(owed, self.streamId)
            self.connection.flush()

    def stopProducing(self) -> None:
        self.abortConnection()

    def loseConnection(self) -> None:
        """The exchange is done with this stream: cancel it if it still runs."""
        self.exchange = None
        self._cancel()

    abortConnection = loseConnection

    def _cancel(self, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        if self.closed:
            return
        if self.streamId is not None and not self.connection.lost:
            try:
                self.connection.h2.reset_stream(self.streamId, code)
            except H2Error:
                pass  # closed already on the h2 side
            self.connection.flush()
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._out.clear()
        self.connection.ended(self)

    def _failSoon(self, message: str, gotBytes: bool = False, unprocessed: bool = False) -> None:
        """
        Fail the exchange on the reactor's next turn: the exchange is in
        the middle of attaching to this stream, and cannot take an answer
        before that is over.
        """
        self.connection.clock.callLater(0, self.fail, message, unprocessed, gotBytes)

    def fail(self, message: str, unprocessed: bool = False, gotBytes: Optional[bool] = None) -> None:
        """End the stream; its exchange (if any) hears C{message} as the backend's failure."""
        exchange, self.exchange = self.exchange, None
        self._cancel()
        if exchange is None or exchange.finished:
            return
        gotBytes = self.gotBytes if gotBytes is None else gotBytes
        if unprocessed and not gotBytes:
            exchange.backendFailed(message, False, unprocessed=True)
        else:
            exchange.backendFailed(message, gotBytes)

    # Events from the connection.

    def _interim(self, headers) -> None:
        exchange = self.exchange
        if exchange is not None:
            status, fields = _split(headers)
            if status != 101:
                exchange.interimResponse(status, b"", fields)

    def _head(self, headers, ended: bool) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        self.gotBytes = True
        self.inHead = False
        status, fields = _split(headers)
        length = None
        for name, value in fields:
            if name == b"content-length":
                length = value
        self.done = ended or self.noBody or status in (204, 304)
        if ended and length is None and not self.noBody and status not in (204, 304):
            # Headers with END_STREAM (a gRPC "trailers-only" answer): an
            # empty body, said so to an HTTP/1.1 client.
            length = b"0"
            fields.append((b"content-length", length))
        self.lengthValue = length
        self.chunked = length is None
        exchange.responseHead(status, b"", fields, True)
        if ended:
            self._ended()

    def _data(self, data: bytes, flowed: int) -> None:
        exchange = self.exchange
        if data and exchange is not None and not self.done:
            exchange.responseBody(data)
            if exchange.encoder is not None:
                exchange.responseRead()
        if flowed:
            h2 = self.connection.h2
            if self._paused and not self.closed:
                # The client is slow: the server may go on with other
                # streams (the connection's window) but not with this one.
                self._owed += flowed
                h2.increment_flow_control_window(flowed)
            else:
                h2.acknowledge_received_data(flowed, self.streamId)

    def _responseTrailers(self, headers) -> None:
        exchange = self.exchange
        if exchange is not None and hasattr(exchange, "responseTrailers"):
            exchange.responseTrailers([(n, v) for n, v in headers if n[:1] != b":"])

    def _ended(self) -> None:
        exchange, self.exchange = self.exchange, None
        if self._localEnded:
            self._close()
        else:
            # Answered before the whole request was sent: the rest is not wanted.
            self._cancel(ErrorCodes.NO_ERROR)
        self.done = True
        if exchange is not None and not exchange.finished:
            exchange.responseEnd(False)

    def _reset(self, code) -> None:
        if code == ErrorCodes.REFUSED_STREAM:
            self.fail(f"{self.server.name} refused the stream", unprocessed=True)
        else:
            name = getattr(code, "name", code)
            self.fail(f"{self.server.name} reset the stream ({name})")


def _split(headers) -> tuple[int, list]:
    """A response's C{:status} and its other fields."""
    status = 0
    fields = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                status = int(value)
        else:
            fields.append((name, value))
    return status, fields


@implementer(IHandshakeListener, IPushProducer)
class H2BackendConnection(Protocol):
    """One HTTP/2 connection to a server, carrying many L{H2Stream}s."""

    ready = False
    #: No new streams here: the server sent GOAWAY, or a reload changed
    #: how its server is reached (L{drain}).
    draining = False
    lost = False
    #: The socket's buffer is full: request bodies wait.
    writePaused = False
    #: Why the connection is being closed by us, for its streams' errors.
    broken: Optional[str] = None
    _idle = None
    _first = True
    #: The TLS handshake completed, with h2 agreed.
    _handshaken = False

    def __init__(self, server, owner: "H2Backends", tls: bool) -> None:
        self.server = server
        self.owner = owner
        self.clock = owner.clock
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        })
        self.streams: dict[int, H2Stream] = {}
        #: Streams handed out, whose request is not sent yet.
        self.reserved = 0
        #: Streams started on this connection so far.
        self.served = 0
        self.whenReady: Deferred = Deferred(lambda _: self.transport.abortConnection())
        self._frames = _FrameSplitter()

    @property
    def usable(self) -> bool:
        return not self.draining and not self.lost and self.broken is None

    def room(self) -> bool:
        """This connection can take one more stream."""
        if not self.usable:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams if self.ready else ASSUMED_STREAMS
        return len(self.streams) + self.reserved < limit

    def newStream(self) -> H2Stream:
        """A stream on this connection, for one exchange."""
        self.reserved += 1
        self._stopIdle()
        stream = H2Stream(self)
        stream.reused = self.served > 0
        return stream

    def started(self, stream: H2Stream) -> None:
        self.reserved -= 1
        self.served += 1
        self.streams[stream.streamId] = stream

    def ended(self, stream: H2Stream) -> None:
        if stream.streamId is None:
            self.reserved -= 1
        else:
            self.streams.pop(stream.streamId, None)
        if not self.streams and not self.reserved and not self.lost:
            if self.draining or self.broken is not None:
                self.close()
            else:
                self.waitIdle()
        if self.ready and self.usable:
            self.owner.roomOn(self)

    def waitIdle(self) -> None:
        """No stream is here: close after the idle timeout, unless one comes first."""
        if self._idle is None:
            self._idle = self.clock.callLater(self.owner.idleTimeout, self.close)

    def _stopIdle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    # Connection.

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()

    def handshakeCompleted(self) -> None:
        refusal = alpnRefusal(self.transport, b"h2")
        if refusal is not None:
            self.fail(f"{self.server.name} {refusal}: a server that speaks HTTP/1.1 only needs its pool's "
                      'protocol = "http/1.1"')
        else:
            self._handshaken = True

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            sendNow(self.transport, data)

    def dataReceived(self, data: bytes) -> None:
        if self.broken is not None:
            return
        first, self._first = self._first, False
        if first and len(data) >= 4 and data[3] != 0x4:
            # A server's first frame is its SETTINGS: this is something else
            # (an HTTP/1.1 server's "HTTP/1.1 400", say).
            self.fail(f"{self.server.name} does not speak HTTP/2 (it answered {data[:12]!r})")
            return
        for part in self._frames.feed(data):
            if type(part) is tuple:
                self.goAway(*part)
                continue
            try:
                events = self.h2.receive_data(part)
            except H2Error as e:
                what = "does not speak HTTP/2" if not self.ready else "broke HTTP/2"
                self.flush()  # h2's GOAWAY, saying why
                self.fail(f"{self.server.name} {what}: {e}")
                return
            for event in events:
                self._event(event)
            if self.broken is not None:
                return
        self.flush()

    def _event(self, event) -> None:
        kind = type(event)
        if kind is DataReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._data(event.data, event.flow_controlled_length)
            elif event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif kind is ResponseReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._head(event.headers, event.stream_ended is not None)
        elif kind is StreamEnded:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._ended()
        elif kind is TrailersReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._responseTrailers(event.headers)
        elif kind is WindowUpdated:
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.pump()
            else:
                self._pumpAll()
        elif kind is StreamReset:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._reset(event.error_code)
        elif kind is InformationalResponseReceived:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._interim(event.headers)
        elif kind is RemoteSettingsChanged:
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._pumpAll()
            if not self.ready:
                self.ready = True
                self.whenReady.callback(self)
            elif self.usable:
                self.owner.roomOn(self)
        elif kind is PushedStreamReceived:
            self.h2.reset_stream(event.pushed_stream_id, ErrorCodes.REFUSED_STREAM)

    def _pumpAll(self) -> None:
        for stream in list(self.streams.values()):
            stream.pump()

    def goAway(self, lastStreamId: int, code: int) -> None:
        """
        The server is going away: the streams it did not take are retried
        elsewhere, the others may finish.
        """
        first = not self.draining
        self.draining = True
        if first:
            self.owner.forget(self)
        for sid, stream in list(self.streams.items()):
            if sid > lastStreamId:
                stream.fail(f"{self.server.name} is going away (GOAWAY) and did not take the request",
                             unprocessed=True)
        if not self.streams and not self.reserved:
            self.close()

    def drain(self) -> None:
        """
        Take no new stream (a reload changed the TLS or protocol its
        server is reached with), and close once the streams in hand end.
        """
        self.draining = True
        self.owner.forget(self)
        if not self.streams and not self.reserved:
            self.close()

    def close(self) -> None:
        """Close politely (our GOAWAY, then the connection)."""
        if self.lost:
            return
        self._stopIdle()
        self.owner.forget(self)
        try:
            self.h2.close_connection()
        except H2Error:
            pass
        self.flush()
        self.transport.loseConnection()

    def fail(self, message: str) -> None:
        """Give up on this connection: its streams fail with C{message}."""
        if self.broken is None:
            self.broken = message
        self.owner.forget(self)
        self.transport.abortConnection()

    def pauseProducing(self) -> None:
        self.writePaused = True

    def resumeProducing(self) -> None:
        self.writePaused = False
        self._pumpAll()
        self.flush()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = True
        self.owner.forget(self)
        self._stopIdle()
        message = self.broken
        if message is None:
            failedTLS = handshakeError(reason) if reason is not None else None
            if failedTLS is not None:
                message = f"TLS with {self.server.name} failed: {failedTLS}"
            elif self._handshaken and self._first:
                # TLS 1.3 servers check a client certificate after the
                # client's side of the handshake is done, and close.
                message = closedAfterHandshake(self.server.name)
            else:
                message = f"{self.server.name} closed the connection"
        if not self.ready:
            if not self.whenReady.called:
                self.whenReady.errback(Failure(error.ConnectError(string=message)))
            return
        for stream in list(self.streams.values()):
            stream.fail(message)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, server, owner: "H2Backends", tls: bool) -> None:
        self.server = server
        self.owner = owner
        self.tls = tls

    def buildProtocol(self, addr) -> H2BackendConnection:
        return H2BackendConnection(self.server, self.owner, self.tls)


class _Connecting:
    """A connection being made, and the exchanges waiting for a stream on it."""

    def __init__(self, owner: "H2Backends", server, timeout: float, tls) -> None:
        self.owner = owner
        self.server = server
        self.timeout = timeout
        self.tls = tls
        self.waiters: list[Deferred] = []
        #: A reload retired the settings this connection is made with
        #: (L{H2Backends.retire}): it serves its waiters, then drains.
        self.retired = False

    def start(self) -> None:
        owner, server, tls = self.owner, self.server, self.tls
        endpoint = owner.endpoints.get(server.address, tls, alpn=ALPN)
        d = endpoint.connect(_ConnectionFactory(server, owner, tls is not None))
        d.addCallback(lambda conn: conn.whenReady)
        d.addTimeout(self.timeout, owner.clock)
        d.addCallbacks(self._ready, self._failed)

    def add(self) -> Deferred:
        waiter: Deferred = Deferred(self.waiters.remove)
        self.waiters.append(waiter)
        return waiter

    def _ready(self, conn: H2BackendConnection) -> None:
        owner = self.owner
        connecting = owner._connecting.get(self.server, [])
        if self in connecting:
            connecting.remove(self)
        if not conn.usable:
            self._failed(Failure(error.ConnectError(string=conn.broken or "the connection went away")))
            return
        if not self.retired:
            owner._connections.setdefault(self.server, []).append(conn)
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            # This connection first: a waiter may be a replay that must not
            # go back to the connection it came from.
            stream = conn.newStream() if conn.room() else owner.stream(self.server)
            if stream is not None:
                waiter.callback(stream)
            else:
                owner.connect(self.server, self.timeout, self.tls).chainDeferred(waiter)
        if self.retired:
            conn.drain()
        elif not conn.streams and not conn.reserved:
            conn.waitIdle()

    def _failed(self, failure: Failure) -> None:
        connecting = self.owner._connecting.get(self.server, [])
        if self in connecting:
            connecting.remove(self)
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.errback(failure)


class H2Backends:
    """
    HTTP/2 connections to the servers of h2 pools, shared by every HTTP
    service: a few per server, each carrying as many streams as the server
    allows.
    """

    def __init__(self, endpoints, clock, *, idleTimeout: float = IDLE_TIMEOUT) -> None:
        self.endpoints = endpoints
        self.clock = clock
        self.idleTimeout = idleTimeout
        self._connections: dict[object, list[H2BackendConnection]] = {}
        self._connecting: dict[object, list[_Connecting]] = {}

    def connections(self, server) -> list[H2BackendConnection]:
        """The connections to C{server} that may take new streams (for tests and status)."""
        return list(self._connections.get(server, ()))

    def stream(self, server) -> Optional[H2Stream]:
        """A stream on an open connection to C{server} with room for one, if any."""
        for conn in self._connections.get(server, ()):
            if conn.room():
                return conn.newStream()
        return None

    def connect(self, server, timeout: float, tls=None) -> Deferred:
        """
        A stream for C{server} once a connection has room for it: one being
        made, if it may take another stream, else a new one (within
        C{timeout}; over TLS with ALPN C{h2} when the pool has C{tls}).
        """
        connecting = self._connecting.setdefault(server, [])
        for attempt in connecting:
            if len(attempt.waiters) < ASSUMED_STREAMS:
                return attempt.add()
        attempt = _Connecting(self, server, timeout, tls)
        connecting.append(attempt)
        waiter = attempt.add()
        attempt.start()
        return waiter

    def retire(self, servers) -> None:
        """
        A reload changed how C{servers} are reached: their connections
        (and the ones being made) take no new stream and close when their
        streams end; the next request makes a new one.
        """
        for server in servers:
            for conn in self._connections.pop(server, ()):
                conn.drain()
            for attempt in self._connecting.pop(server, ()):
                attempt.retired = True

    def roomOn(self, conn: H2BackendConnection) -> None:
        """C{conn} has room for streams again (nothing waits here: the pool's queue does)."""

    def forget(self, conn: H2BackendConnection) -> None:
        """No new stream goes to C{conn}."""
        conns = self._connections.get(conn.server)
        if conns and conn in conns:
            conns.remove(conn)

    def closeIdle(self) -> None:
        """Close every connection that carries no stream (at shutdown)."""
        for conns in list(self._connections.values()):
            for conn in list(conns):
                if not conn.streams and not conn.reserved:
                    conn.close()
