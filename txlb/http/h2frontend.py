# -*- test-case-name: tests.test_h2frontend -*-
"""
HTTP/2 from clients.

A client connection starts as an L{txlb.http.frontend.HTTPFrontend}; when
TLS agreed on C{h2} by ALPN, or its first bytes are the HTTP/2 connection
preface (prior knowledge, on plaintext), the frontend hands its bytes to an
L{H2Connection}, which speaks HTTP/2 through txlb's own frame codec
(L{txlb.http.h2wire}): the C{h2} library's general state machine cost
several times what the rest of a request costs, per request.

Each stream is an L{H2Stream<txlb.http.h2stream.H2Stream>}: a frontend of its own for exactly one
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

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from txlb.http import h2wire
from txlb.http.h2wire import BODY, GONE, REQUEST, RESET, TRAILERS, WINDOW, ServerConnection
from txlb.http.h2fields import Malformed, Refused, StaticEncoder, requestFields
from txlb.http.h2stream import H2Stream
from txlb.net.wire import noDelay, sendNow
from txlb.observe.logs import emit

if TYPE_CHECKING:  # pragma: no cover
    from txlb.http.frontend import HTTPFrontend

_log = Logger(namespace="txlb.http2")

PREFACE = h2wire.PREFACE

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
        stream.release()
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
