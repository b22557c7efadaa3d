# -*- test-case-name: tests.test_h2frontend -*-
"""
HTTP/2 from clients.

A client connection starts as an L{txlb.http.frontend.HTTPFrontend}; when
TLS agreed on C{h2} by ALPN, or its first bytes are the HTTP/2 connection
preface (prior knowledge, on plaintext), the frontend hands its bytes to an
L{H2Connection}, which speaks HTTP/2 through txlb's own frame codec
(L{txlb.http.h2wire}): the C{h2} library's general state machine cost
several times what the rest of a request costs, per request.

Each stream is an L{H2Stream}: a frontend of its own for exactly one
L{txlb.http.exchange.Exchange}, so that routing, the pool's pick, sticky
sessions, the cache, header rules, retries, error answers, the access
event and metrics are the very code HTTP/1.1 requests go through, and the
streams of one connection are balanced independently.  A backend's
response reaches the stream as the fields an HTTP/1.1 client would get
(the same header rules, C{X-Request-ID}, cookies: see
L{txlb.http.exchange.ExchangeOwner.respond}) and unframed body bytes,
encoded straight into HEADERS and DATA frames; only txlb's own answers
(errors, redirects, the cache's) are HTTP/1.1 bytes, read back (llhttp, in
C) by a parser made for them alone.
Backends are reached over HTTP/1.1: the request's pseudo-headers become a
request line and C{Host}, and a body of unknown length goes chunked.

Flow control is per stream.  Response bytes wait in the stream's buffer
for its send window; while that buffer is large, or the client's socket is
full, the stream pauses the backend connection it reads from, and only
that one.  Request bytes are acknowledged (C{WINDOW_UPDATE}) as the
backend's socket takes them, so a slow backend slows only its client's
stream.

Defences: at most C{limits.max_concurrent_streams} streams; a header list
larger than C{limits.max_header_bytes} is answered 431 on its stream, and
the HPACK decoder refuses lists far beyond that (a "bomb") with GOAWAY; a
malformed request (pseudo-headers, connection-specific headers, C{TE}
other than C{trailers}, characters HTTP/1.1 would read differently) gets
a stream error and the other streams go on; too many streams reset in a
short while (the "rapid reset" attack, CVE-2023-44487) or too many
CONTINUATION frames (CVE-2024-27316, bounded by the codec) end the
connection with GOAWAY.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Optional

import httptools
from hpack.table import HeaderTable
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from txlb.http import h2wire
from txlb.http.exchange import Exchange
from txlb.http.frontend import HTTPFrontend, ReadGate
from txlb.http.h2wire import BODY, GONE, REQUEST, RESET, TRAILERS, WINDOW, ServerConnection, StreamClosed
from txlb.net.wire import backlogged, noDelay, sendNow
from txlb.observe.logs import emit

_log = Logger(namespace="txlb.http2")

PREFACE = h2wire.PREFACE

#: Response bytes a stream buffers beyond its send window before it pauses
#: the backend connection it reads from.
HIGH_WATER = 64 * 1024

#: Resets (the client's RST_STREAM, streams we refused as malformed, and
#: empty DATA frames that end nothing) a connection may cause within
#: L{RESET_WINDOW} seconds: twice the streams it may have open, and at
#: least this many.
MIN_RESETS = 200
RESET_WINDOW = 10.0

#: The HPACK decoder's own bound, in multiples of C{limits.max_header_bytes}:
#: between the two a request is answered 431 on its stream; beyond it the
#: header block is a bomb and the connection ends.
_DECODER_FACTOR = 4

#: Headers HTTP/2 forbids in requests (RFC 9113 8.2.2), and that an
#: HTTP/1.1 response carries but an HTTP/2 one must not.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_RESPONSE_DROP = _CONNECTION_SPECIFIC | {b"te", b"trailer"}
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
#: A field name as HTTP/2 allows it: a lower-case token (RFC 9110 5.1).
_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
#: A field value HTTP/1.1 reads the same way: no NUL, CR or LF, no
#: whitespace at either end (RFC 9113 8.2.1).
_VALUE = re.compile(rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?")
_AUTHORITY = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]+")


class Malformed(Exception):
    """A request HTTP/2 calls malformed: a stream error (PROTOCOL_ERROR)."""


class Refused(Exception):
    """A well-formed request txlb answers itself, with C{status}."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def requestFields(headers: list, maxHeaderBytes: int) -> tuple[bytes, bytes, Optional[bytes], list]:
    """
    C{(method, path, authority, headers)} of an HTTP/2 request's header
    list, the headers as an HTTP/1.1 backend may get them (the caller adds
    C{Host}).

    @raise Malformed: for what RFC 9113 8.1.1 makes a stream error.
    @raise Refused: 431 for a header list over C{maxHeaderBytes} (counted
        as HTTP/1.1 counts a head), 405 for C{CONNECT}.
    """
    method = scheme = path = authority = None
    regular: list = []
    host = length = None
    cookies: Optional[list] = None
    size = 0
    name = _NAME.fullmatch
    value = _VALUE.fullmatch
    for n, v in headers:
        size += len(n) + len(v) + 4
        if value(v) is None:
            raise Malformed(f"invalid characters in the value of {n.decode('latin-1')!r}")
        if n[:1] == b":":
            if regular:
                raise Malformed(f"pseudo-header {n.decode('latin-1')} after regular headers")
            if n == b":method" and method is None:
                method = v
            elif n == b":path" and path is None:
                path = v
            elif n == b":scheme" and scheme is None:
                scheme = v
            elif n == b":authority" and authority is None:
                authority = v
            else:
                raise Malformed(f"unknown or repeated pseudo-header {n.decode('latin-1')}")
            continue
        if name(n) is None:
            raise Malformed(f"invalid header name {n.decode('latin-1')!r}")
        if n in _CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific header {n.decode('latin-1')}")
        if n == b"te" and v != b"trailers":
            raise Malformed("TE other than trailers")
        if n == b"host":
            if host is not None:
                raise Malformed("more than one Host header")
            host = v
            continue
        if n == b"content-length":
            if not v.isdigit():
                raise Malformed("content-length is not a number")
            if length is not None:
                if int(v) != length:
                    raise Malformed("content-lengths that differ")
                continue
            length = int(v)
        elif n == b"cookie":
            # Split over several fields for compression (RFC 9113 8.2.3):
            # one field again for HTTP/1.1.
            if cookies is None:
                cookies = [v]
            else:
                cookies.append(v)
            continue
        regular.append((n, v))
    if cookies is not None:
        regular.append((b"cookie", b"; ".join(cookies)))
    if size > maxHeaderBytes:
        raise Refused(431, "request header block too large")
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT":
        raise Refused(405, "CONNECT is not supported by this reverse proxy")
    if not scheme or not path:
        raise Malformed("a request needs :scheme and :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise Malformed("the :path must start with /")
    if b" " in path or b" " in method:
        raise Malformed("a space in :method or :path")
    authority = authority or host
    if authority is not None and _AUTHORITY.fullmatch(authority) is None:
        raise Malformed("invalid :authority")
    return method, path, authority, regular


#: HPACK's static table (RFC 7541 appendix A): full entries and names.
_STATIC_FULL: dict = {}
_STATIC_NAME: dict = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAME.setdefault(_name, _index)
    if _value:
        _STATIC_FULL.setdefault((_name, _value), _index)


#: The encoder keeps at most this many whole fields, of values at most this
#: long, and none of the fields whose value differs in every response.
_KEEP_FIELDS = 64
_KEEP_VALUE = 128
_UNIQUE = frozenset({b"x-request-id", b"set-cookie"})


def _hpackInteger(value: int, bits: int, flags: int = 0) -> bytes:
    """An HPACK integer with a C{bits}-bit prefix (RFC 7541 5.1)."""
    top = (1 << bits) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


class StaticEncoder:
    """
    HPACK for response headers with no dynamic table: every field is the
    static table's index or a literal "without indexing" (RFC 7541 6.2.2),
    no Huffman coding.  Blocks are a little larger than h2's own encoder
    makes them, for a fraction of its CPU: the encoder keeps no table to
    search, and a name's encoding is worked out once.  The first block
    says the table is 0 bytes (any peer's limit allows that), and says so
    again after the peer changes its limit.
    """

    _sizeUpdate = True

    def __init__(self) -> None:
        self._names: dict[bytes, bytes] = {}
        #: Whole fields encoded before (a backend's C{server},
        #: C{content-type}, ... come back in every response).
        self._fields: dict[tuple, bytes] = {}
        #: The same for fields as an HTTP/1.1 head has them (b"" for those
        #: left out).
        self._raw: dict[tuple, bytes] = {}
        #: The same for C{b"Name: value"} lines.
        self._lines: dict[bytes, bytes] = {}

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._sizeUpdate = True

    def encode(self, headers, huffman: bool = True) -> bytes:
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")  # dynamic table size update: 0
        fields = self._fields
        for field in headers:
            encoded = fields.get(field)
            if encoded is None:
                encoded = self._field(field)
                if len(field[1]) <= _KEEP_VALUE and field[0] not in _UNIQUE:
                    if len(fields) >= _KEEP_FIELDS:
                        fields.clear()
                    fields[field] = encoded
            out.append(encoded)
        return b"".join(out)

    def responseBlock(self, status: int, headers: list) -> tuple[bytes, bool]:
        """
        The block of an HTTP/1.1 response head's fields as read (names in
        any case): C{:status} first, names lower-cased, connection-specific
        fields left out; and whether C{content-length} is 0.  Each field as
        read is looked up once per connection, not lower-cased and sifted
        for every response.
        """
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")
        out.append(b"\x88" if status == 200 else self._field((b":status", b"%d" % status)))
        raw = self._raw
        empty = False
        for field in headers:
            encoded = raw.get(field)
            if encoded is None:
                name = field[0].lower()
                value = field[1]
                encoded = b"" if name in _RESPONSE_DROP else self._field((name, value))
                if len(value) <= _KEEP_VALUE and name not in _UNIQUE:
                    if len(raw) >= _KEEP_FIELDS:
                        raw.clear()
                    raw[field] = encoded
            out.append(encoded)
            if field[1] == b"0" and field[0].lower() == b"content-length":
                empty = True
        return b"".join(out), empty

    def responseLines(self, status: int, lines: list) -> bytes:
        """
        The block of a response head given as C{b"Name: value"} lines
        (L{txlb.http.headers.responseLines}): C{:status} first, names
        lower-cased, connection-specific fields left out.  Each line is
        encoded once per connection, not split and lower-cased for every
        response.
        """
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")
        out.append(b"\x88" if status == 200 else self._field((b":status", b"%d" % status)))
        known = self._lines
        for line in lines:
            encoded = known.get(line)
            if encoded is None:
                name, _, value = line.partition(b":")
                name = name.lower()
                value = value.lstrip(b" \t")
                encoded = b"" if name in _RESPONSE_DROP else self._field((name, value))
                if len(value) <= _KEEP_VALUE and name not in _UNIQUE:
                    if len(known) >= _KEEP_FIELDS:
                        known.clear()
                    known[line] = encoded
            out.append(encoded)
        return b"".join(out)

    def _field(self, field: tuple) -> bytes:
        """One field: the static table's entry, or a literal of its name's entry or the name."""
        index = _STATIC_FULL.get(field)
        if index is not None:
            return bytes((0x80 | index,))
        n, v = field
        names = self._names
        prefix = names.get(n)
        if prefix is None:
            index = _STATIC_NAME.get(n)
            prefix = _hpackInteger(index, 4) if index else b"\x00" + _hpackInteger(len(n), 7) + n
            if len(names) < 1024:
                names[n] = prefix
        size = len(v)
        return prefix + (bytes((size,)) if size < 127 else _hpackInteger(size, 7)) + v


@implementer(IPushProducer)
class H2Connection:
    """
    One client connection speaking HTTP/2, for its L{HTTPFrontend}.

    It is the client transport's producer: while the client's socket is
    full, every stream pauses its backend and no more is read from the
    client (so that pings and settings it sends cannot pile up answers).
    """

    #: GOAWAY is on its way (drain, idle, or the limits): no new streams.
    closing = False
    #: The client's socket took less than it was given.
    socketFull = False
    _holding = False
    _gone = False

    def __init__(self, frontend: HTTPFrontend) -> None:
        self.frontend = frontend
        self.service = service = frontend.service
        self.transport = frontend.transport
        self.streams: dict[int, H2Stream] = {}
        self._spareTimers: list[_Alarm] = []
        self.maxStreams = service.maxStreams
        # Every stream may hold its whole window (64 KiB) unacknowledged, its
        # backend being slow, without holding up the others: the
        # connection's window is theirs together.
        self.encoder = StaticEncoder()
        self.wire = ServerConnection(
            self.encoder, self.maxStreams, service.maxHeaderBytes, service.maxHeaderBytes * _DECODER_FACTOR,
            connectionWindow=h2wire.DEFAULT_WINDOW * max(1, self.maxStreams))
        self.resetBudget = max(2 * self.maxStreams, MIN_RESETS)
        self._resets = 0
        self._resetsSince = service.clock.seconds()
        self.transport.registerProducer(self, True)
        noDelay(self.transport)
        self._write()

    # Bytes in.

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        self._holding = True
        try:
            try:
                events = self.wire.receive(data)
            except h2wire.ConnectionError as e:
                # A GOAWAY naming the error is queued.
                self._end("protocol_error", str(e))
                return
            self._handle(events)
        finally:
            self._holding = False
        # What this read made (acks, answers from the cache) goes now, with
        # anything still waiting for the end of the turn.
        if self._later is not None:
            self._later.cancel()
        self._write()

    def _handle(self, events: list) -> None:
        # Streams opened and reset in this same read are never started: a
        # rapid reset costs no pool pick and no backend connection.
        resetNow = {e[1] for e in events if e[0] == RESET} if len(events) > 1 else ()
        streams = self.streams
        for event in events:
            if self._gone:
                return
            kind = event[0]
            if kind == REQUEST:
                _, sid, headers, ended = event
                if sid not in resetNow:
                    self._request(sid, headers, ended)
            elif kind == BODY:
                _, sid, data, size, ended = event
                stream = streams.get(sid)
                if stream is None:
                    self._ack(size, sid)
                else:
                    stream.received(data, size)
                if ended:
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.requestEnded()
                elif not size:
                    self._reset()  # an empty DATA frame that ends nothing (CVE-2019-9518)
            elif kind == TRAILERS:
                stream = streams.get(event[1])
                if stream is not None:
                    stream.requestTrailers(event[2])
                    stream.requestEnded()
            elif kind == RESET:
                stream = streams.pop(event[1], None)
                if stream is not None:
                    stream.abandon("the client reset the stream")
                self._reset()
            elif kind == WINDOW:
                if event[1]:
                    stream = streams.get(event[1])
                    if stream is not None:
                        stream.push()
                else:
                    self._pushAll()
            elif kind == GONE:
                # The client opens no more streams: those in flight finish.
                self.closing = True
        self._idleCheck()

    def _request(self, sid: int, fields: list, ended: bool) -> None:
        wire = self.wire
        if self.closing:
            wire.reset(sid, h2wire.REFUSED_STREAM)
            return
        limit = self.service.maxHeaderBytes
        try:
            if fields is self._lastFields and limit == self._lastLimit:
                # The very list the codec decoded before (the same header
                # block again): checked already.
                method, path, authority, headers = self._lastRequest
                headers = headers.copy()
            else:
                method, path, authority, headers = requestFields(fields, limit)
                self._lastFields, self._lastLimit = fields, limit
                self._lastRequest = method, path, authority, headers.copy()
        except Malformed as e:
            wire.reset(sid, h2wire.PROTOCOL_ERROR)
            _log.info("HTTP/2 stream refused: {why}", event="http2_malformed", service=self.service.name,
                      client=self.frontend.client, why=str(e))
            self._reset()
            return
        except Refused as e:
            method, path, authority, headers = b"-", b"-", None, []
            refusal = (e.status, e.message)
        else:
            refusal = None
        state = wire.streams.get(sid)
        if state is None:
            return  # a stream error ended it within this read
        if authority is not None:
            headers.append((b"host", authority))
        stream = self.streams[sid] = H2Stream(self, sid, method == b"HEAD", state)
        if len(self.streams) == 1:
            self.frontend.disarm()
        stream.begin(method, path, headers, ended, refusal)

    #: The last request's header list as decoded, the limit it was checked
    #: against, and what L{requestFields} made of it.
    _lastFields = None
    _lastLimit = 0
    _lastRequest: tuple = ()

    # Bytes out.

    # Frames from many streams (each backend's read, the client's read)
    # leave together: one write per turn of the reactor, not one per
    # response, which saves system calls and keeps Nagle from holding a
    # second small write behind the first one's ACK.

    _later = None

    def hold(self) -> bool:
        """Gather frames until L{flush}; true if this call started gathering."""
        if self._holding:
            return False
        self._holding = True
        return True

    def flush(self) -> None:
        """Gathering is over: what h2 has framed leaves at the end of this turn."""
        self._holding = False
        self.send()

    def send(self) -> None:
        """
        Frames were queued: out at the end of this turn, unless a read
        gathers them; out now when no other stream could add to them.
        """
        if self._holding or self._later is not None or self._gone:
            return
        if len(self.streams) <= 1:
            self._write()
        else:
            self._later = self.service.clock.callLater(0, self._write)

    def _write(self) -> None:
        self._later = None
        data = self.wire.dataToSend()
        if data and not self._gone:
            sendNow(self.transport, data)

    def _ack(self, size: int, sid: int) -> None:
        if size and not self._gone:
            self.wire.acknowledge(size, sid)

    def _pushAll(self) -> None:
        for stream in list(self.streams.values()):
            stream.push()

    # The client's socket (IPushProducer).

    def pauseProducing(self) -> None:
        self.socketFull = True
        self.transport.pauseProducing()
        for stream in self.streams.values():
            stream.checkProducer()

    def resumeProducing(self) -> None:
        self.socketFull = False
        if not self._gone:
            self.transport.resumeProducing()
        for stream in list(self.streams.values()):
            stream.checkProducer()

    def stopProducing(self) -> None:
        self.transport.abortConnection()

    # Streams ending, and the connection.

    def streamDone(self, stream: "H2Stream") -> None:
        """A stream's response went out whole (or the stream was cut)."""
        if self.streams.get(stream.streamId) is stream:
            del self.streams[stream.streamId]
        self._idleCheck()

    def _idleCheck(self) -> None:
        if self.streams or self._gone:
            return
        if self.closing:
            self.goAway()
        else:
            self.frontend.arm(self.service.idleTimeout, self._idle)

    def _idle(self) -> None:
        self.goAway()

    def _reset(self) -> None:
        """A stream was reset: the rapid-reset budget."""
        now = self.service.clock.seconds()
        if now - self._resetsSince > RESET_WINDOW:
            self._resetsSince = now
            self._resets = 0
        self._resets += 1
        if self._resets > self.resetBudget:
            self.wire.goAway(h2wire.ENHANCE_YOUR_CALM)
            self._end("rapid_reset", f"more than {self.resetBudget} streams reset within {RESET_WINDOW:g}s")

    def drain(self) -> None:
        """
        Finish the streams in flight, refuse new ones, then GOAWAY and
        close (nothing more can be sent once GOAWAY is).
        """
        self.closing = True
        self._idleCheck()

    def goAway(self) -> None:
        """GOAWAY (no error) now, and close once it is out."""
        if self._gone:
            return
        self.wire.goAway(h2wire.NO_ERROR)
        self._end(None, None)

    def _end(self, why: Optional[str], detail: Optional[str]) -> None:
        """Send what is framed (a GOAWAY among it), then close the connection."""
        if self._gone:
            return
        data = self.wire.dataToSend()
        self._gone = True
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if why is not None:
            emit(_log, "http2_goaway", dict(service=self.service.name, client=self.frontend.client,
                                            reason=why, error=detail))
        if data:
            sendNow(self.transport, data)
        self.frontend.dead = True
        self.transport.loseConnection()
        self._abandonAll("the connection ended")

    def _abandonAll(self, why: str) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.abandon(why)
        spares, self._spareTimers = self._spareTimers, []
        for alarm in spares:
            if alarm.call is not None and alarm.call.active():
                alarm.call.cancel()

    # Each stream has a timeout armed (L{HTTPFrontend.arm}); a timer set
    # and cancelled for every stream would cost more than the rest of its
    # bookkeeping, so a stream done hands its timer on to the next one.

    def takeTimer(self, stream: "H2Stream", seconds: float):
        """A timer calling C{stream._fire} in C{seconds}: a spare one, if any."""
        spares = self._spareTimers
        while spares:
            alarm = spares.pop()
            call = alarm.call
            if call is not None and call.active():
                alarm.stream = stream
                call.reset(seconds)
                return call
        alarm = _Alarm(self, stream)
        alarm.call = self.service.clock.callLater(seconds, alarm)
        return alarm.call

    def putTimer(self, call) -> None:
        """A stream is done with its timer: kept for the next (as many as may be open), or cancelled."""
        alarm = call.func
        if type(alarm) is _Alarm and alarm.call is call and call.active() and not self._gone \
                and len(self._spareTimers) < self.maxStreams:
            alarm.stream = None
            self._spareTimers.append(alarm)
        elif call.active():
            call.cancel()

    def connectionLost(self, reason=None) -> None:
        self._gone = True
        self._abandonAll("client closed the connection")


class _Alarm:
    """What a stream's timer calls: that stream's C{_fire}, or nothing while it is a spare."""

    __slots__ = ("connection", "stream", "call")

    def __init__(self, connection: H2Connection, stream: "H2Stream") -> None:
        self.connection = connection
        self.stream = stream
        self.call = None

    def __call__(self) -> None:
        self.call = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream._fire()
        elif self in self.connection._spareTimers:
            self.connection._spareTimers.remove(self)


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
        self.stream = stream
        self.producer = None
        self.paused = False

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        self.stream.producerPaused = False
        self.stream.checkProducer()

    def unregisterProducer(self) -> None:
        # The backend connection may go back to the idle pool: not paused.
        producer, self.producer = self.producer, None
        if self.stream.producerPaused and producer is not None:
            self.stream.producerPaused = False
            producer.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.stream.ackHeld()

    def stopProducing(self) -> None:
        self.abortConnection()

    def write(self, data: bytes) -> None:
        self.stream.out.write(data)

    def loseConnection(self) -> None:
        self.stream.cut(h2wire.CANCEL)

    def abortConnection(self) -> None:
        self.stream.cut(h2wire.INTERNAL_ERROR)

    def getPeer(self):
        return self.stream.connection.transport.getPeer()

    def getHost(self):
        return self.stream.connection.transport.getHost()


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
        self.stream = stream
        self.noBody = noBody

    def write(self, data: bytes) -> None:
        if self.done:
            return
        stream = self.stream
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
        self._held = self.stream.connection.hold()
        return True

    def flush(self) -> None:
        self.holding = False
        stream = self.stream
        if self.direct and (stream.buffer or stream.ending):
            stream.push()  # the read's body in as few frames as the window allows; END_STREAM on the last
        if self._held:
            self._held = False
            stream.connection.flush()
        else:
            stream.connection.send()

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
                self.stream.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in _RESPONSE_DROP]
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
            self.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in _RESPONSE_DROP]
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

    def _newTimer(self, seconds: float):
        # A timer that the connection's streams pass on to each other.
        return self.connection.takeTimer(self, seconds)

    def connectionMade(self) -> None:  # pragma: no cover - never on a socket
        raise NotImplementedError

    def connectionLost(self, reason=None) -> None:  # pragma: no cover - see abandon
        self.abandon("client closed the connection")
