# -*- test-case-name: tests.test_h2wire -*-
"""
HTTP/2's framing layer (RFC 9113) for the server side of client
connections: bytes in, a list of what they meant out, frames queued for
the socket.

The C{h2} library does all of this and more, in general: both sides,
server push, priorities, every event as an object.  A balancer's client
side needs less of it, and needs it often: this codec parses frames with
one C{struct} call each, keeps per stream only its two windows, its two
halves' state and the body's declared length, reports what happened as
small tuples, and writes frames straight into one output list, for the
frontend (L{txlb.http.h2frontend}) to send in one write.  Header blocks
are HPACK's (the C{hpack} library) decoding, and
L{txlb.http.h2fields.StaticEncoder}'s encoding.

What a peer may not do ends the connection (L{ConnectionError}, with a
GOAWAY queued) or one stream (RST_STREAM queued, and a C{RESET} event
when the stream was open): frames too large, frames where they may not
be, windows overflowed, a body longer or shorter than its
C{content-length}, more streams than C{SETTINGS_MAX_CONCURRENT_STREAMS},
a header block in more than L{CONTINUATION_LIMIT} frames or larger than
the decoder's bound, an HPACK "bomb".
"""

from __future__ import annotations

import struct
from typing import Callable, Optional

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

#: What an HTTP/2 client sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes (RFC 9113 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# Settings (RFC 9113 6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# What C{receive} reports: tuples whose first item is one of these.
#: C{(REQUEST, sid, headers, ended)}: a new stream's request header list.
REQUEST = 0
#: C{(BODY, sid, data, size, ended)}: request body bytes (C{size} is what
#: they took of the windows, padding included: acknowledge that much).
BODY = 1
#: C{(TRAILERS, sid, headers)}: the request's trailer fields; its end.
TRAILERS = 2
#: C{(RESET, sid, code)}: the stream is gone (the client's RST_STREAM, or
#: a stream error this side found).
RESET = 3
#: C{(WINDOW, sid)}: the stream's send window grew (C{sid} 0: the
#: connection's, or every stream's by a new initial window size).
WINDOW = 4
#: C{(GOAWAY, code)}: the client will open no more streams.
GONE = 5

#: The largest window (RFC 9113 6.9.1).
MAX_WINDOW = (1 << 31) - 1
#: Windows before any SETTINGS say otherwise, and the frame size we take.
DEFAULT_WINDOW = 65535
MAX_INBOUND_FRAME = 16384
#: CONTINUATION frames one header block may take (CVE-2024-27316).
CONTINUATION_LIMIT = 64

#: Decoded header blocks a connection keeps, and the largest kept.
_KEEP_BLOCKS = 16
_KEEP_BLOCK = 256
#: ... and the most fields a kept block may decode to: what a connection
#: holds this way stays a few KiB, whatever its client sends.
_KEEP_HEADERS = 32

_HEAD = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header and C{payload}."""
    size = len(payload)
    return _HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, sid) + payload


class ConnectionError(Exception):
    """
    The peer broke the protocol: a GOAWAY with C{code} is queued and the
    connection must end once it is sent.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamClosed(Exception):
    """Sending on a stream that is gone (reset, or its response ended)."""


class Stream:
    """What the codec keeps of one open stream."""

    __slots__ = ("sid", "sendWindow", "recvWindow", "processed", "remoteOpen", "localOpen", "expected", "received")

    def __init__(self, sid: int, sendWindow: int, remoteOpen: bool) -> None:
        self.sid = sid
        #: What the client lets us send on it.
        self.sendWindow = sendWindow
        #: What it may still send us; bytes taken but not yet given back.
        self.recvWindow = DEFAULT_WINDOW
        self.processed = 0
        #: The client may still send on it (no END_STREAM yet); we may.
        self.remoteOpen = remoteOpen
        self.localOpen = True
        #: The body's C{content-length} (-1: none), and its bytes so far.
        self.expected = -1
        self.received = 0


def _windowIncrement(processed: int, window: int, largest: int) -> int:
    """
    How much of C{processed} to give back now, in a WINDOW_UPDATE, to a
    window of C{window} (at most C{largest}): once half the largest is
    taken, or when the window is shut and a little was taken (so that a
    stream cannot stall), and never in dribbles (many small DATA frames
    are not answered with as many updates).
    """
    if processed >= largest // 2 or (window <= 0 and processed > min(1024, largest // 4)):
        return min(processed, largest - window)
    return 0


class ServerConnection:
    """
    The server side of one HTTP/2 connection, without I/O: L{receive}
    takes bytes from the client, the send methods queue frames, and
    L{dataToSend} gives what is queued.
    """

    #: A GOAWAY was queued: nothing more is read or sent.
    closed = False

    def __init__(self, encoder, maxStreams: int, maxHeaderListSize: int, decoderLimit: int,
                 connectionWindow: int = DEFAULT_WINDOW) -> None:
        """
        @param encoder: makes HPACK blocks of response headers (C{encode},
            and C{header_table_size} set from the client's settings).
        @param maxStreams: streams the client may have open at once.
        @param maxHeaderListSize: advertised in SETTINGS_MAX_HEADER_LIST_SIZE.
        @param decoderLimit: a header list larger than this once decoded
            (or a block larger than this on the wire) is an attack: GOAWAY
            ENHANCE_YOUR_CALM.
        @param connectionWindow: what the client may send on all streams
            together before txlb acknowledges any of it.
        """
        self.encoder = encoder
        self.maxStreams = maxStreams
        self.decoderLimit = decoderLimit
        self.decoder = Decoder(decoderLimit)
        #: Header blocks decoded before, that changed nothing (L{_decode}).
        self._decoded: dict[bytes, list] = {}
        self.streams: dict[int, Stream] = {}
        #: The highest stream id the client opened.
        self.lastStream = 0
        self.sendWindow = DEFAULT_WINDOW
        self.recvWindow = self.recvLargest = connectionWindow
        self.processed = 0
        #: The client's settings that shape what we send.
        self.initialWindow = DEFAULT_WINDOW
        self.maxFrame = 16384
        self.out: list[bytes] = []
        self._buffer = b""
        self._preface = True
        self._settingsFirst = True
        #: A header block waiting for its CONTINUATION frames:
        #: C{[sid, ended, [fragments], size]}.
        self._block: Optional[list] = None
        self.events: list = []
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (MAX_CONCURRENT_STREAMS, maxStreams), (MAX_HEADER_LIST_SIZE, maxHeaderListSize),
            (ENABLE_PUSH, 0)))
        self.out.append(frame(SETTINGS, 0, 0, settings))
        if connectionWindow > DEFAULT_WINDOW:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(connectionWindow - DEFAULT_WINDOW)))
        self._handlers: dict[int, Callable] = {
            DATA: self._data, HEADERS: self._headers, PRIORITY: self._priority, RST_STREAM: self._rstStream,
            SETTINGS: self._settings, PUSH_PROMISE: self._pushPromise, PING: self._ping, GOAWAY: self._goaway,
            WINDOW_UPDATE: self._windowUpdate, CONTINUATION: self._continuation,
        }

    # Bytes in.

    def receive(self, data: bytes) -> list:
        """
        What C{data} (and what was left of earlier reads) meant, as event
        tuples in order.

        @raise ConnectionError: the client broke the protocol; a GOAWAY is
            queued.
        """
        if self.closed:
            return []
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        if self._preface:
            if len(buffer) < 24:
                if not PREFACE.startswith(buffer):
                    self._fail(PROTOCOL_ERROR, "invalid connection preface")
                self._buffer = buffer
                return []
            if buffer[:24] != PREFACE:
                self._fail(PROTOCOL_ERROR, "invalid connection preface")
            self._preface = False
            pos = 24
        events = self.events = []
        size = len(buffer)
        handlers = self._handlers
        unpack = _HEAD.unpack_from
        try:
            while size - pos >= 9:
                high, low, kind, flags, sid = unpack(buffer, pos)
                length = (high << 16) | low
                if length > MAX_INBOUND_FRAME:
                    self._fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                end = pos + 9 + length
                if end > size:
                    break
                payload = buffer[pos + 9:end]
                pos = end
                sid &= 0x7FFFFFFF
                if self._settingsFirst:
                    if kind != SETTINGS or flags & ACK:
                        self._fail(PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
                    self._settingsFirst = False
                if self._block is not None and kind != CONTINUATION:
                    self._fail(PROTOCOL_ERROR, "a header block interrupted by another frame")
                handler = handlers.get(kind)
                if handler is not None:
                    handler(flags, sid, payload)
                if self.closed:
                    break
        finally:
            self._buffer = buffer[pos:] if pos < size else b""
        return events

    def _fail(self, code: int, message: str):
        """End the connection: GOAWAY with C{code}, and raise."""
        self.goAway(code)
        raise ConnectionError(code, message)

    def _streamError(self, sid: int, code: int) -> None:
        """Reset one stream; the others go on."""
        self.out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.remoteOpen = stream.localOpen = False
            self.events.append((RESET, sid, code))

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        if size > self.recvWindow:
            self._fail(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self.recvWindow -= size
        if flags & PADDED:
            if not size or payload[0] >= size:
                self._fail(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1:size - payload[0]]
        stream = self.streams.get(sid)
        if stream is None or not stream.remoteOpen:
            if sid > self.lastStream:
                self._fail(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # A frame in flight when the stream ended: nobody reads it, its
            # bytes go back to the connection's window at once.
            self.acknowledge(size, 0)
            if stream is not None:
                self._streamError(sid, STREAM_CLOSED)
            return
        if size > stream.recvWindow:
            self.acknowledge(size, 0)
            self._streamError(sid, FLOW_CONTROL_ERROR)
            return
        stream.recvWindow -= size
        received = stream.received = stream.received + len(payload)
        ended = flags & END_STREAM
        expected = stream.expected
        if expected >= 0 and (received > expected or (ended and received != expected)):
            self._fail(PROTOCOL_ERROR, f"a body of other than its content-length ({expected}) on stream {sid}")
        if ended:
            stream.remoteOpen = False
            if not stream.localOpen:
                del self.streams[sid]
        self.events.append((BODY, sid, payload, size, bool(ended)))

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid or not sid & 1:
            self._fail(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if flags & PADDED:
            size = len(payload)
            if not size or payload[0] >= size:
                self._fail(PROTOCOL_ERROR, "padding longer than the frame")
            payload = payload[1:size - payload[0]]
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._block_done(sid, flags & END_STREAM, payload)
        else:
            self._block = [sid, flags & END_STREAM, [payload], len(payload)]

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        block = self._block
        if block is None or block[0] != sid:
            self._fail(PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        block[2].append(payload)
        block[3] += len(payload)
        if len(block[2]) > CONTINUATION_LIMIT:
            self._fail(PROTOCOL_ERROR, "too many CONTINUATION frames")
        if block[3] > self.decoderLimit:
            self._fail(ENHANCE_YOUR_CALM, "a header block beyond the decoder's bound")
        if flags & END_HEADERS:
            self._block = None
            self._block_done(sid, block[1], b"".join(block[2]))

    def _block_done(self, sid: int, ended: int, block: bytes) -> None:
        # Every block is decoded, whatever becomes of its stream: the
        # decoder's table must follow the client's.
        try:
            headers = self._decoded.get(block)
            if headers is None:
                headers = self._decode(block)
        except OversizedHeaderListError:
            self._fail(ENHANCE_YOUR_CALM, "a header list beyond the decoder's bound")
        except (HPACKError, ValueError, IndexError) as e:
            self._fail(COMPRESSION_ERROR, f"undecodable header block: {e}")
        streams = self.streams
        stream = streams.get(sid)
        if stream is None:
            if sid <= self.lastStream:
                return  # a stream already closed (reset meanwhile): ignored
            if len(streams) >= self.maxStreams:
                self._fail(PROTOCOL_ERROR, f"more than {self.maxStreams} streams open")
            self.lastStream = sid
            stream = streams[sid] = Stream(sid, self.initialWindow, not ended)
            for name, value in headers:
                if name == b"content-length":
                    stream.expected = int(value) if value.isdigit() else -1
                    if ended and stream.expected > 0:
                        stream.expected = -1  # refused as malformed (no body) by the frontend
            self.events.append((REQUEST, sid, headers, bool(ended)))
            return
        if not stream.remoteOpen:
            self._streamError(sid, STREAM_CLOSED)
            return
        if not ended:
            self._fail(PROTOCOL_ERROR, f"trailers without END_STREAM on stream {sid}")
        if stream.expected >= 0 and stream.received != stream.expected:
            self._fail(PROTOCOL_ERROR, f"a body of other than its content-length ({stream.expected}) on stream {sid}")
        stream.remoteOpen = False
        if not stream.localOpen:
            del streams[sid]
        self.events.append((TRAILERS, sid, headers))

    def _decode(self, block: bytes) -> list:
        """
        HPACK's decoding of C{block}, kept when it left the dynamic table as
        it was (every field indexed, or literal without indexing): a
        client's next requests mostly send the very same block, which then
        costs a dictionary look-up.  Any block that changes the table
        forgets what was kept, since the same bytes may now mean other
        fields.
        """
        table = self.decoder.header_table
        entries = table.dynamic_entries
        count, first, size = len(entries), entries[0] if entries else None, table.maxsize
        headers = self.decoder.decode(block, raw=True)
        kept = self._decoded
        if len(entries) == count and (entries[0] if entries else None) is first and table.maxsize == size:
            if len(block) <= _KEEP_BLOCK and len(headers) <= _KEEP_HEADERS:
                if len(kept) >= _KEEP_BLOCKS:
                    kept.clear()
                kept[block] = headers
        elif kept:
            kept.clear()
        return headers

    def _priority(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._fail(FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")

    def _rstStream(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
        if sid > self.lastStream:
            self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.remoteOpen = stream.localOpen = False
            self.events.append((RESET, sid, _U32.unpack(payload)[0]))

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        size = len(payload)
        if flags & ACK:
            if size:
                self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if size % 6:
            self._fail(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        grown = False
        for offset in range(0, size, 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self.initialWindow
                self.initialWindow = value
                if delta:
                    for stream in self.streams.values():
                        stream.sendWindow += delta
                        if stream.sendWindow > MAX_WINDOW:
                            self._fail(FLOW_CONTROL_ERROR, "a stream's window grew too large")
                    grown = grown or delta > 0
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    self._fail(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.maxFrame = value
            elif key == HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif key == ENABLE_PUSH:
                if value > 1:
                    self._fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH other than 0 or 1")
        self.out.append(frame(SETTINGS, ACK, 0))
        if grown:
            self.events.append((WINDOW, 0))

    def _pushPromise(self, flags: int, sid: int, payload: bytes) -> None:
        self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            self._fail(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
        if not flags & ACK:
            self.out.append(frame(PING, ACK, 0, payload))

    def _goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            self._fail(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        self.events.append((GONE, _GOAWAY.unpack_from(payload)[1]))

    def _windowUpdate(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.sendWindow += increment
            if self.sendWindow > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "the connection's window grew too large")
            self.events.append((WINDOW, 0))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if sid > self.lastStream:
                self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not increment:
            self._streamError(sid, PROTOCOL_ERROR)
            return
        stream.sendWindow += increment
        if stream.sendWindow > MAX_WINDOW:
            self._streamError(sid, FLOW_CONTROL_ERROR)
            return
        self.events.append((WINDOW, sid))

    # Frames out.

    def stream(self, sid: int) -> Stream:
        """The open stream C{sid}."""
        return self.streams[sid]

    def window(self, stream: Stream) -> int:
        """What may be sent on C{stream} now: its window and the connection's, and one frame."""
        return min(stream.sendWindow, self.sendWindow, self.maxFrame)

    def sendHeaders(self, stream: Stream, headers: list, end: bool) -> None:
        """A HEADERS frame (and CONTINUATIONs, for a large block) on C{stream}."""
        if not stream.localOpen or self.closed:
            raise StreamClosed(stream.sid)
        self.sendBlock(stream, self.encoder.encode(headers), end)

    def sendBlock(self, stream: Stream, block: bytes, end: bool) -> None:
        """L{sendHeaders} of a block the encoder made already."""
        if not stream.localOpen or self.closed:
            raise StreamClosed(stream.sid)
        sid = stream.sid
        flags = END_STREAM if end else 0
        limit = self.maxFrame
        if len(block) <= limit:
            self.out.append(frame(HEADERS, flags | END_HEADERS, sid, block))
        else:
            chunks = [block[i:i + limit] for i in range(0, len(block), limit)]
            self.out.append(frame(HEADERS, flags, sid, chunks[0]))
            for chunk in chunks[1:-1]:
                self.out.append(frame(CONTINUATION, 0, sid, chunk))
            self.out.append(frame(CONTINUATION, END_HEADERS, sid, chunks[-1]))
        if end:
            self._ended(stream)

    def sendData(self, stream: Stream, data: bytes, end: bool) -> None:
        """A DATA frame; C{data} fits in L{window} (the caller made sure)."""
        if not stream.localOpen or self.closed:
            raise StreamClosed(stream.sid)
        size = len(data)
        stream.sendWindow -= size
        self.sendWindow -= size
        self.out.append(_HEAD.pack(size >> 16, size & 0xFFFF, DATA, END_STREAM if end else 0, stream.sid))
        self.out.append(data)
        if end:
            self._ended(stream)

    def _ended(self, stream: Stream) -> None:
        stream.localOpen = False
        if not stream.remoteOpen:
            self.streams.pop(stream.sid, None)

    def reset(self, sid: int, code: int) -> None:
        """RST_STREAM: the stream ends, both ways."""
        stream = self.streams.pop(sid, None)
        if stream is None or self.closed:
            return
        stream.remoteOpen = stream.localOpen = False
        self.out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def acknowledge(self, size: int, sid: int) -> None:
        """
        C{size} bytes received on C{sid} (0: on a stream that is gone) are
        dealt with: the client may send as much again, told in
        WINDOW_UPDATEs that come in batches.
        """
        if self.closed:
            return
        processed = self.processed = self.processed + size
        increment = _windowIncrement(processed, self.recvWindow, self.recvLargest)
        if increment:
            self.processed = 0
            self.recvWindow += increment
            self.out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment)))
        stream = self.streams.get(sid) if sid else None
        if stream is not None and stream.remoteOpen:
            processed = stream.processed = stream.processed + size
            increment = _windowIncrement(processed, stream.recvWindow, DEFAULT_WINDOW)
            if increment:
                stream.processed = 0
                stream.recvWindow += increment
                self.out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment)))

    def goAway(self, code: int) -> None:
        """GOAWAY: the last stream we took, and why; nothing after it."""
        if self.closed:
            return
        self.closed = True
        self.out.append(frame(GOAWAY, 0, 0, _GOAWAY.pack(self.lastStream, code)))

    def dataToSend(self) -> bytes:
        """The frames queued so far, and the queue emptied."""
        out = self.out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        return data
