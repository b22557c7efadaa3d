"""
The HTTP/2 server codec (L{txlb.http.h2wire}) frame by frame: the C{h2}
library plays the client where a well-behaved one is wanted (and reads
what the codec sends, as an independent parser), frames made by hand
where the client breaks the rules.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hypothesis import given, settings, strategies as st

from txlb.http import h2wire
from txlb.http.h2fields import StaticEncoder
from txlb.http.h2wire import BODY, GONE, REQUEST, RESET, TRAILERS, WINDOW, ServerConnection, frame

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


def server(maxStreams: int = 10, window: int = 65535) -> ServerConnection:
    return ServerConnection(StaticEncoder(), maxStreams, 8192, 32768, connectionWindow=window)


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


def talk(s: ServerConnection, c: h2.connection.H2Connection) -> tuple[list, list]:
    """What the server made of the client's bytes, and what the client of the server's."""
    events = s.receive(c.data_to_send())
    return events, c.receive_data(s.dataToSend())


def opened(s: ServerConnection | None = None) -> tuple[ServerConnection, bytes]:
    """A server past the preface and the client's SETTINGS, its own frames taken."""
    s = s or server()
    s.receive(h2wire.PREFACE + frame(h2wire.SETTINGS, 0, 0))
    return s, s.dataToSend()


def gives(s: ServerConnection, data: bytes, code: int) -> None:
    """C{data} ends the connection with a GOAWAY of C{code}."""
    with pytest.raises(h2wire.ConnectionError) as e:
        s.receive(data)
    assert e.value.code == code
    events = client_reading(s.dataToSend())
    [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == code
    assert s.closed and s.receive(frame(h2wire.PING, 0, 0, b"12345678")) == []


def client_reading(data: bytes) -> list:
    """What an h2 client that sent only its preface makes of C{data}."""
    c = client()
    c.data_to_send()
    return c.receive_data(data)


def test_settings_window_and_a_request_answered_with_trailers():
    s, c = server(maxStreams=7, window=7 * 65535), client()
    events, answers = talk(s, c)
    assert events == []
    assert c.remote_settings.max_concurrent_streams == 7
    assert c.remote_settings.max_header_list_size == 8192
    assert c.outbound_flow_control_window == 7 * 65535
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GET + [(b"cookie", b"a=1")], end_stream=True)
    events, _ = talk(s, c)
    assert events == [(REQUEST, sid, GET + [(b"cookie", b"a=1")], True)]
    stream = s.stream(sid)
    s.sendHeaders(stream, [(b":status", b"200"), (b"content-type", b"text/plain")], False)
    s.sendData(stream, b"hello", False)
    s.sendHeaders(stream, [(b"grpc-status", b"0")], True)
    got = c.receive_data(s.dataToSend())
    kinds = [type(e) for e in got]
    assert kinds == [h2.events.ResponseReceived, h2.events.DataReceived, h2.events.TrailersReceived,
                     h2.events.StreamEnded]
    assert got[0].headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert got[1].data == b"hello" and got[2].headers == [(b"grpc-status", b"0")]
    assert sid not in s.streams  # both halves ended
    with pytest.raises(h2wire.StreamClosed):
        s.sendData(stream, b"late", True)


def test_ping_is_answered_and_settings_acknowledged():
    s, _ = opened()
    assert s.receive(frame(h2wire.PING, 0, 0, b"abcdefgh") + frame(h2wire.SETTINGS, 0, 0)) == []
    assert s.dataToSend() == frame(h2wire.PING, h2wire.ACK, 0, b"abcdefgh") + frame(h2wire.SETTINGS, h2wire.ACK, 0)
    assert s.receive(frame(h2wire.PING, h2wire.ACK, 0, b"abcdefgh")) == []
    assert s.dataToSend() == b""


def test_a_preface_arriving_in_pieces_and_frames_cut_across_reads():
    s, c = server(), client()
    data = c.data_to_send()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GET, end_stream=False)
    c.send_data(sid, b"x" * 1000, end_stream=True)
    data += c.data_to_send()
    events = []
    for i in range(0, len(data), 7):
        events += s.receive(data[i:i + 7])
    assert events[0] == (REQUEST, sid, GET, False)
    assert b"".join(e[2] for e in events[1:]) == b"x" * 1000
    assert events[-1][4] is True


@pytest.mark.parametrize("data, code", [
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, h2wire.PROTOCOL_ERROR),
    (b"PRX", h2wire.PROTOCOL_ERROR),
    (h2wire.PREFACE + frame(h2wire.PING, 0, 0, b"12345678"), h2wire.PROTOCOL_ERROR),  # SETTINGS first
])
def test_a_bad_preface_ends_the_connection(data, code):
    gives(server(), data, code)


@pytest.mark.parametrize("data, code", [
    (frame(h2wire.DATA, 0, 1, b"x" * 16385), h2wire.FRAME_SIZE_ERROR),
    (frame(h2wire.DATA, 0, 0, b"x"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.DATA, 0, 5, b"x"), h2wire.PROTOCOL_ERROR),  # an idle stream
    (frame(h2wire.HEADERS, h2wire.END_HEADERS, 2, b""), h2wire.PROTOCOL_ERROR),  # even: the server's
    (frame(h2wire.HEADERS, h2wire.END_HEADERS, 0, b""), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.PADDED, 1, b"\x09abc"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.HEADERS, h2wire.END_HEADERS, 1, b"\xff\xff\xff\xff\x0f"), h2wire.COMPRESSION_ERROR),
    (frame(h2wire.CONTINUATION, h2wire.END_HEADERS, 1, b""), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.HEADERS, 0, 1, b"") + frame(h2wire.PING, 0, 0, b"12345678"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.HEADERS, 0, 1, b"") + frame(h2wire.CONTINUATION, 0, 3, b""), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.PUSH_PROMISE, h2wire.END_HEADERS, 1, b"\x00\x00\x00\x02"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.PING, 0, 0, b"1234567"), h2wire.FRAME_SIZE_ERROR),
    (frame(h2wire.PING, 0, 1, b"12345678"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), h2wire.FLOW_CONTROL_ERROR),
    (frame(h2wire.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x10\x00"), h2wire.PROTOCOL_ERROR),  # max frame 4096
    (frame(h2wire.SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.SETTINGS, 0, 0, b"\x00\x02\x00"), h2wire.FRAME_SIZE_ERROR),
    (frame(h2wire.SETTINGS, h2wire.ACK, 0, b"\x00\x02\x00\x00\x00\x00"), h2wire.FRAME_SIZE_ERROR),
    (frame(h2wire.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), h2wire.FLOW_CONTROL_ERROR),
    (frame(h2wire.WINDOW_UPDATE, 0, 0, b"\x00\x01"), h2wire.FRAME_SIZE_ERROR),
    (frame(h2wire.RST_STREAM, 0, 9, b"\x00\x00\x00\x08"), h2wire.PROTOCOL_ERROR),  # an idle stream
    (frame(h2wire.PRIORITY, 0, 0, b"\x00\x00\x00\x00\x10"), h2wire.PROTOCOL_ERROR),
    (frame(h2wire.GOAWAY, 0, 0, b"\x00\x00"), h2wire.FRAME_SIZE_ERROR),
])
def test_frames_a_server_must_refuse_end_the_connection(data, code):
    s, _ = opened()
    gives(s, data, code)


def test_unknown_frames_and_priorities_are_ignored():
    s, _ = opened()
    assert s.receive(frame(0x42, 0xff, 0, b"whatever") + frame(h2wire.PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10")) == []
    assert s.dataToSend() == b"" and not s.closed


def test_padding_and_priority_in_headers_and_padded_data():
    s, _ = opened()
    block = Encoder().encode(GET)
    payload = b"\x03" + b"\x00\x00\x00\x00\x10" + block + b"pad"
    events = s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.PADDED | h2wire.PRIORITY_FLAG, 1, payload))
    assert events == [(REQUEST, 1, GET, False)]
    events = s.receive(frame(h2wire.DATA, h2wire.PADDED | h2wire.END_STREAM, 1, b"\x02body\x00\x00"))
    assert events == [(BODY, 1, b"body", 7, True)]  # the padding counts against the windows


def test_a_header_block_in_continuation_frames_and_their_limits():
    s, _ = opened()
    block = Encoder().encode(GET + [(b"x-long", b"v" * 300)])
    pieces = [block[i:i + 40] for i in range(0, len(block), 40)]
    data = frame(h2wire.HEADERS, h2wire.END_STREAM, 1, pieces[0])
    data += b"".join(frame(h2wire.CONTINUATION, 0, 1, p) for p in pieces[1:-1])
    data += frame(h2wire.CONTINUATION, h2wire.END_HEADERS, 1, pieces[-1])
    assert s.receive(data) == [(REQUEST, 1, GET + [(b"x-long", b"v" * 300)], True)]
    flood = frame(h2wire.HEADERS, 0, 3, b"") + frame(h2wire.CONTINUATION, 0, 3, b"") * h2wire.CONTINUATION_LIMIT
    gives(s, flood, h2wire.PROTOCOL_ERROR)
    s, _ = opened()
    large = frame(h2wire.HEADERS, 0, 1, b"") + frame(h2wire.CONTINUATION, 0, 1, b"\x00" * 16384) * 3
    gives(s, large, h2wire.ENHANCE_YOUR_CALM)  # beyond the decoder's bound before it is decoded


def test_an_hpack_bomb_is_enhance_your_calm():
    s, _ = opened()
    encoder = Encoder()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 1,
                    encoder.encode(GET + [(b"x-big", b"y" * 3000)])))
    bomb = encoder.encode(GET + [(b"x-big", b"y" * 3000)] * 20)
    assert len(bomb) < 200
    gives(s, frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 3, bomb), h2wire.ENHANCE_YOUR_CALM)


def test_the_stream_limit_counts_open_streams():
    s, _ = opened(server(maxStreams=2))
    encoder = Encoder()
    for sid in (1, 3):
        s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, sid, encoder.encode(GET)))
    s.sendHeaders(s.stream(1), [(b":status", b"204")], True)  # stream 1 is closed: room for one more
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 5, encoder.encode(GET)))
    s.dataToSend()
    gives(s, frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 7, encoder.encode(GET)),
          h2wire.PROTOCOL_ERROR)


def test_body_length_must_match_content_length():
    for body, end, extra in ((b"x" * 6, False, b""), (b"x" * 4, True, b""), (b"x" * 4, False, b"trailers")):
        s, _ = opened()
        encoder = Encoder()
        s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS, 1, encoder.encode(GET + [(b"content-length", b"5")])))
        data = frame(h2wire.DATA, h2wire.END_STREAM if end else 0, 1, body)
        if extra:
            data += frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 1, encoder.encode([(b"x", b"1")]))
        gives(s, data, h2wire.PROTOCOL_ERROR)


def test_trailers_end_the_request_and_must_carry_end_stream():
    s, _ = opened()
    encoder = Encoder()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS, 1, encoder.encode(GET)))
    events = s.receive(frame(h2wire.DATA, 0, 1, b"ab")
                       + frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 1,
                               encoder.encode([(b"x-sum", b"1")])))
    assert events == [(BODY, 1, b"ab", 2, False), (TRAILERS, 1, [(b"x-sum", b"1")])]
    assert not s.stream(1).remoteOpen
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS, 3, encoder.encode(GET)))
    gives(s, frame(h2wire.HEADERS, h2wire.END_HEADERS, 3, encoder.encode([(b"x-sum", b"1")])),
          h2wire.PROTOCOL_ERROR)


def test_frames_after_the_client_ended_its_side_are_stream_errors():
    s, _ = opened()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 1, Encoder().encode(GET)))
    events = s.receive(frame(h2wire.DATA, 0, 1, b"late"))
    assert events == [(RESET, 1, h2wire.STREAM_CLOSED)]
    assert frame(h2wire.RST_STREAM, 0, 1, b"\x00\x00\x00\x05") in s.dataToSend()
    # Its bytes went back to the connection (in a batch, later), and the
    # stream is closed: what still arrives for it is ignored.
    assert s.receive(frame(h2wire.DATA, 0, 1, b"later") + frame(h2wire.WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01")) == []
    assert s.processed == 9 and not s.closed


def test_the_client_resetting_a_stream_and_our_reset():
    s, _ = opened()
    encoder = Encoder()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS, 1, encoder.encode(GET))
              + frame(h2wire.HEADERS, h2wire.END_HEADERS, 3, encoder.encode(GET)))
    assert s.receive(frame(h2wire.RST_STREAM, 0, 1, b"\x00\x00\x00\x08")) == [(RESET, 1, h2wire.CANCEL)]
    assert s.receive(frame(h2wire.RST_STREAM, 0, 1, b"\x00\x00\x00\x08")) == []  # already gone
    s.reset(3, h2wire.REFUSED_STREAM)
    assert s.dataToSend() == frame(h2wire.RST_STREAM, 0, 3, b"\x00\x00\x00\x07")
    assert s.streams == {}
    s.reset(3, h2wire.CANCEL)
    assert s.dataToSend() == b""


def test_send_windows_follow_window_updates_and_settings():
    s, c = server(), client()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100,
                       h2.settings.SettingCodes.MAX_FRAME_SIZE: 20000})
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GET, end_stream=True)
    talk(s, c)
    stream = s.stream(sid)
    assert s.window(stream) == 100 and s.maxFrame == 20000
    s.sendHeaders(stream, [(b":status", b"200")], False)
    s.sendData(stream, b"x" * 100, False)
    assert s.window(stream) == 0
    c.receive_data(s.dataToSend())
    c.increment_flow_control_window(50, stream_id=sid)
    events, _ = talk(s, c)
    assert events == [(WINDOW, sid)] and s.window(stream) == 50
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    events, _ = talk(s, c)
    assert events == [(WINDOW, 0)] and s.window(stream) == 950
    overflow = frame(h2wire.WINDOW_UPDATE, 0, sid, b"\x7f\xff\xff\xff")
    assert s.receive(overflow) == [(RESET, sid, h2wire.FLOW_CONTROL_ERROR)]
    assert s.sendWindow == 65535 - 100


def test_large_response_headers_go_in_continuation_frames():
    s, c = server(), client()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GET, end_stream=True)
    talk(s, c)
    big = [(b":status", b"200")] + [(b"x-%d" % i, b"v" * 1000) for i in range(40)]
    s.sendHeaders(s.stream(sid), big, True)
    data = s.dataToSend()
    assert data.count(bytes((h2wire.CONTINUATION,))) >= 2
    [response, ended] = c.receive_data(data)
    assert response.headers == big and isinstance(ended, h2.events.StreamEnded)


def test_window_updates_come_in_batches():
    s, c = server(window=65535 * 4), client()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, GET, end_stream=False)
    c.data_to_send()
    s.receive(h2wire.PREFACE + frame(h2wire.SETTINGS, 0, 0)
              + frame(h2wire.HEADERS, h2wire.END_HEADERS, sid, Encoder().encode(GET)))
    s.dataToSend()
    for _ in range(30):
        s.receive(frame(h2wire.DATA, 0, sid, b"x" * 1000))
        s.acknowledge(1000, sid)
    assert s.dataToSend() == b""  # 30 000 bytes: less than half of the stream's window
    s.receive(frame(h2wire.DATA, 0, sid, b"x" * 3000))
    s.acknowledge(3000, sid)
    assert s.dataToSend() == frame(h2wire.WINDOW_UPDATE, 0, sid, b"\x00\x00\x80\xe8")  # 33 000
    assert s.stream(sid).recvWindow == 65535


def test_goaway_from_the_client_and_ours():
    s, _ = opened()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 1, Encoder().encode(GET)))
    assert s.receive(frame(h2wire.GOAWAY, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x00")) == [(GONE, 0)]
    s.goAway(h2wire.NO_ERROR)
    [goaway] = client_reading(s.dataToSend())
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == 1
    s.goAway(h2wire.PROTOCOL_ERROR)
    assert s.dataToSend() == b""


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"user-agent", b"accept", b":path"]),
                                   st.sampled_from([b"1", b"2", b"/x", b"*/*"])), min_size=1, max_size=4),
                min_size=1, max_size=12),
       st.integers(min_value=0, max_value=200))
def test_decoded_blocks_kept_always_mean_what_the_client_meant(lists, tableSize):
    s, _ = opened()
    encoder = Encoder()
    encoder.header_table_size = tableSize  # a small table: entries are evicted often
    for i, headers in enumerate(lists):
        headers = GET + headers
        events = s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, 2 * i + 1,
                                 encoder.encode(headers)))
        assert events == [(REQUEST, 2 * i + 1, headers, True)]
        s.sendHeaders(s.stream(2 * i + 1), [(b":status", b"204")], True)


_frames = st.lists(st.tuples(st.integers(min_value=0, max_value=12), st.integers(min_value=0, max_value=255),
                             st.sampled_from([0, 1, 2, 3, 5, 7, 0x7FFFFFFF]), st.binary(max_size=40)),
                   max_size=12)


def _frames_out(data: bytes) -> list:
    """The frames in C{data}, which must be whole frames."""
    out, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 9:pos + 9 + size]))
        pos += 9 + size
    assert pos == len(data)
    return out


@settings(max_examples=300, deadline=None)
@given(_frames, st.integers(min_value=1, max_value=64))
def test_any_frames_end_in_events_or_a_goaway_and_nothing_else(frames, cut):
    s, _ = opened()
    encoder = Encoder()
    data = frame(h2wire.HEADERS, h2wire.END_HEADERS, 1, encoder.encode(GET))
    for kind, flags, sid, payload in frames:
        data += frame(kind, flags, sid, payload)
    try:
        for i in range(0, len(data), cut):
            events = s.receive(data[i:i + cut])
            for event in events:
                assert event[0] in (REQUEST, BODY, TRAILERS, RESET, WINDOW, GONE)
    except h2wire.ConnectionError as e:
        assert s.closed
        assert _frames_out(s.dataToSend())[-1][0] == h2wire.GOAWAY
        assert e.code in (h2wire.PROTOCOL_ERROR, h2wire.FRAME_SIZE_ERROR, h2wire.FLOW_CONTROL_ERROR,
                          h2wire.COMPRESSION_ERROR, h2wire.ENHANCE_YOUR_CALM)
    else:
        _frames_out(s.dataToSend())
        assert len(s.streams) <= s.maxStreams


def test_what_a_connection_keeps_of_decoded_blocks_stays_small():
    s, _ = opened(server(maxStreams=200))
    # Static-table fields only: nothing changes the table, every block is
    # one to keep.
    sid = 1
    for i in range(40):
        block = b"".join(bytes((0x80 | index,)) for index in (2, 6, 4)) + bytes((0x80 | (16 + i % 40),))
        s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, sid, block))
        sid += 2
    assert len(s._decoded) <= h2wire._KEEP_BLOCKS
    many = bytes((0x82,)) * (h2wire._KEEP_HEADERS + 1)  # 33 times :method GET
    s._decoded.clear()
    s.receive(frame(h2wire.HEADERS, h2wire.END_HEADERS | h2wire.END_STREAM, sid, many))
    assert s._decoded == {}
