"""
Protocol tests for HTTP/2 from clients (L{txlb.http.h2frontend}): the
C{h2} library plays the client over a StringTransport, backends are
answered by hand on a memory reactor, time is a Clock.
"""

from __future__ import annotations

import gc
import weakref

import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Decoder
from hypothesis import given, settings, strategies as st
from hyperframe.frame import ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame

from tests.h2support import H2Peer, h2Connection
from tests.test_http_frontend import OK, Harness, head
from txlb.http.h2fields import Malformed, Refused, StaticEncoder, requestFields
from txlb.http.h2frontend import PREFACE, H2Connection
from txlb.http.h2wire import CONTINUATION_LIMIT


class Client(H2Peer):
    """An HTTP/2 client connection (h2) to one frontend."""

    def __init__(self, h: Harness, address: str = "10.1.2.3", settings=None) -> None:
        self.h = h
        h.factory.http2 = H2Connection
        self.frontend, transport = h.accept(address)
        # The client may send what a server must refuse.
        conn = h2Connection(client=True, validate_outbound_headers=False, normalize_outbound_headers=False)
        conn.initiate_connection()
        if settings:
            conn.update_settings(settings)
        super().__init__(self.frontend, transport, conn, h.reactor)  # frames leave at the end of the reactor's turn
        self.flush()

    def request(self, path: str = "/", method: str = "GET", authority: str = "shop.example", extra=(),
                body: bytes | None = None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", authority.encode()), *extra]
        self.conn.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.send(sid, body, end)
        self.flush()
        return sid

    def send(self, sid: int, body: bytes, end: bool = False) -> None:
        for i in range(0, len(body), 16384):
            self.conn.send_data(sid, body[i:i + 16384], end_stream=end and i + 16384 >= len(body))
        if not body:
            self.conn.send_data(sid, b"", end_stream=end)
        self.flush()

    def response(self, sid: int) -> tuple[dict, bytes, bool]:
        [answer] = self.of(h2.events.ResponseReceived, sid)
        body = b"".join(e.data for e in self.of(h2.events.DataReceived, sid))
        for e in self.of(h2.events.DataReceived, sid):
            self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
        ended = bool(self.of(h2.events.StreamEnded, sid))
        return dict(answer.headers), body, ended

    def goaway(self):
        return self.of(h2.events.ConnectionTerminated)


def test_prior_knowledge_get_is_forwarded_as_http11_and_answered(events):
    h = Harness()
    c = Client(h)
    assert c.frontend.h2 is not None
    sid = c.request("/a?b=1", extra=[(b"accept", b"*/*"), (b"x-forwarded-for", b"1.1.1.1")])
    backend, server = h.answer()
    line, fields = head(server.value())
    assert line == b"GET /a?b=1 HTTP/1.1"
    assert fields[b"host"] == [b"shop.example"]
    assert fields[b"x-forwarded-for"] == [b"1.1.1.1, 10.1.2.3"]
    assert fields[b"x-forwarded-proto"] == [b"http"]
    assert b"transfer-encoding" not in fields and b"content-length" not in fields
    [rid] = fields[b"x-request-id"]
    backend.dataReceived(OK)
    c.read()
    headers, body, ended = c.response(sid)
    assert headers[b":status"] == b"200"
    assert headers[b"x-request-id"] == rid
    assert headers[b"content-length"] == b"5"
    assert b"connection" not in headers
    assert (body, ended) == (b"hello", True)
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["protocol"] == "HTTP/2"
    assert (event["status"], event["selectedServer"], event["path"]) == (200, "s0", "/a")


def test_http11_still_served_when_http2_is_on():
    h = Harness()
    h.factory.http2 = H2Connection
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert frontend.h2 is None
    backend, _ = h.answer()
    backend.dataReceived(OK)
    assert client.value().startswith(b"HTTP/1.1 200 OK")


def test_preface_cut_short_waits_for_the_rest():
    h = Harness()
    h.factory.http2 = H2Connection
    frontend, client = h.accept()
    frontend.dataReceived(PREFACE[:5])
    assert frontend.h2 is None and client.value() == b""
    frontend.dataReceived(PREFACE[5:])
    assert frontend.h2 is not None


def test_http2_off_leaves_the_preface_to_http11():
    h = Harness(http2=False)
    h.factory.http2 = H2Connection
    frontend, client = h.accept()
    frontend.dataReceived(PREFACE)
    assert frontend.h2 is None
    assert client.value().startswith(b"HTTP/1.1 4")


def test_streams_of_one_connection_are_balanced_independently():
    h = Harness()
    c = Client(h)
    sids = [c.request(f"/{i}") for i in range(3)]
    assert h.connects() == 3
    hosts = [h.reactor.tcpClients[i][0] for i in range(3)]
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    answers = [h.answer(i) for i in range(3)]
    for i, (backend, _) in reversed(list(enumerate(answers))):
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
    c.read()
    for i, sid in enumerate(sids):
        assert c.response(sid)[1:] == (b"%d" % i, True)


def test_request_body_without_length_goes_chunked_and_with_length_as_is():
    h = Harness()
    c = Client(h)
    sid = c.request("/up", method="POST", body=b"abc", end=False)
    backend, server = h.answer()
    c.conn.send_data(sid, b"def", end_stream=True)
    c.flush()
    _, fields = head(server.value())
    assert fields[b"transfer-encoding"] == [b"chunked"]
    assert server.value().endswith(b"\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    backend.dataReceived(OK)
    sid2 = c.request("/up2", method="POST", extra=[(b"content-length", b"4")], body=b"wxyz")
    backend2, server2 = h.answer()
    _, fields = head(server2.value())
    assert fields[b"content-length"] == [b"4"] and b"transfer-encoding" not in fields
    assert server2.value().endswith(b"\r\n\r\nwxyz")
    backend2.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    assert c.response(sid2)[1:] == (b"hello", True)


def test_chunked_response_is_unframed_and_head_has_no_body():
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    backend.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    c.read()
    headers, body, ended = c.response(sid)
    assert b"transfer-encoding" not in headers
    assert (body, ended) == (b"abcde", True)
    sid = c.request("/", method="HEAD")
    backend, _ = h.answer(-1) if h.connects() > 1 else (backend, None)
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    c.read()
    headers, body, ended = c.response(sid)
    assert headers[b"content-length"] == b"10"
    assert (body, ended) == (b"", True)


def test_no_server_reached_gets_the_error_answer_on_its_stream():
    h = Harness(servers=1, retries=0)
    c = Client(h)
    sid = c.request("/")
    h.refuse()
    c.read()
    headers, body, ended = c.response(sid)
    assert headers[b":status"] == b"502"
    assert ended and b"could not connect" in body


def test_a_slow_stream_pauses_only_its_own_backend():
    h = Harness()
    c = Client(h)
    # As browsers and curl do: a large window for the connection, so that
    # one stream left unread cannot hold up the others.
    c.conn.increment_flow_control_window(1 << 24)
    c.flush()
    slow = c.request("/big")
    fast = c.request("/small")
    big, _ = h.answer(0)
    small, _ = h.answer(1)
    size = 300_000
    big.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    sent = 0
    while sent < size and big.transport.producerState == "producing":
        big.dataReceived(b"x" * 16384)
        sent += 16384
    # The client acknowledged nothing: the stream's window (64 KiB) is full,
    # and the backend is paused once the buffer passes the high-water mark.
    assert big.transport.producerState == "paused"
    assert sent < size
    small.dataReceived(OK)
    c.read()
    assert c.response(fast)[1:] == (b"hello", True)
    assert small.transport.producerState == "producing"
    # Reading the big stream opens its window: the backend resumes.
    got = 0
    for _ in range(100):
        c.read()
        data = c.of(h2.events.DataReceived, slow)
        for e in data:
            c.conn.acknowledge_received_data(e.flow_controlled_length, slow)
        got = sum(len(e.data) for e in data)
        c.flush()
        if big.transport.producerState == "producing":
            break
    assert big.transport.producerState == "producing"
    assert got > 65535 - 1


def test_request_body_acknowledged_only_as_the_backend_takes_it():
    # (h2 sends WINDOW_UPDATE once half a window is acknowledged: 40 000 bytes.)
    h = Harness()
    c = Client(h)
    sid = c.request("/up", method="POST", extra=[(b"content-length", b"100000")], body=b"a" * 40000, end=False)
    # Not connected yet: nothing acknowledged.
    assert c.conn.local_flow_control_window(sid) == 65535 - 40000
    backend, server = h.answer()
    c.read()
    assert c.conn.local_flow_control_window(sid) == 65535
    server.producer.pauseProducing()  # the backend's socket is full
    c.send(sid, b"b" * 40000)
    assert c.conn.local_flow_control_window(sid) == 65535 - 40000
    server.producer.resumeProducing()
    c.read()
    assert c.conn.local_flow_control_window(sid) == 65535
    assert server.value().endswith(b"a" * 40000 + b"b" * 40000)


def test_malformed_requests_get_a_stream_error_and_others_go_on():
    h = Harness()
    c = Client(h)
    bad = [
        [(b"connection", b"keep-alive")],
        [(b"te", b"gzip")],
        [(b"transfer-encoding", b"chunked")],
        [(b"x-a", b"one\r\nx-b: two")],
        [(b"x-a", b"nul\x00")],
        [(b"X-Upper", b"1")],
        [(b":bogus", b"1")],
    ]
    sids = []
    for extra in bad:
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                  (b":authority", b"a"), *extra], end_stream=True)
        sids.append(sid)
    c.flush()
    for sid in sids:
        [reset] = c.of(h2.events.StreamReset, sid)
        assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.connects() == 0
    good = c.request("/", extra=[(b"te", b"trailers")])
    backend, server = h.answer()
    assert b"\r\nte:" not in server.value().lower()
    backend.dataReceived(OK)
    c.read()
    assert c.response(good)[1:] == (b"hello", True)
    assert not c.goaway()


def test_request_fields_checks():
    ok = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/x"), (b":authority", b"a.example:8443")]
    assert requestFields(ok + [(b"cookie", b"a=1")], 1024) == (b"GET", b"/x", b"a.example:8443", [(b"cookie", b"a=1")])
    for headers in (
        [(b":method", b"GET"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"x")],
        [(b"a", b"1"), *ok],
        ok + [(b":method", b"GET")],
        ok + [(b"content-length", b"1_0")],
        ok + [(b"x", b" padded")],
        ok + [(b"host", b"a"), (b"host", b"b")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a/b")],
    ):
        with pytest.raises(Malformed):
            requestFields(headers, 1024)
    with pytest.raises(Refused) as e:
        requestFields(ok + [(b"x", b"y" * 2000)], 1024)
    assert e.value.status == 431
    with pytest.raises(Refused) as e:
        requestFields([(b":method", b"CONNECT"), (b":authority", b"a:1")], 1024)
    assert e.value.status == 405


def test_header_list_too_large_is_431_on_its_stream():
    h = Harness(maxHeaderBytes=2048)
    c = Client(h)
    sid = c.request("/", extra=[(b"x-big", b"y" * 3000)])
    headers, body, ended = c.response(sid)
    assert headers[b":status"] == b"431" and ended
    assert h.connects() == 0
    assert not c.goaway()


def test_hpack_bomb_ends_the_connection():
    h = Harness(maxHeaderBytes=2048)
    c = Client(h)
    # One large header in the dynamic table, then referenced again and
    # again: a few bytes on the wire, far more once decoded.
    sid = c.request("/", extra=[(b"x-big", b"y" * 1500)])
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                              (b":authority", b"a")] + [(b"x-big", b"y" * 1500)] * 50, end_stream=True)
    c.flush()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert c.transport.disconnecting


def test_max_body_refuses_over_http2():
    h = Harness(maxBody=10)
    c = Client(h)
    sid = c.request("/", method="POST", extra=[(b"content-length", b"20")], body=b"x" * 20)
    headers, body, _ = c.response(sid)
    assert headers[b":status"] == b"413"
    sid = c.request("/", method="POST", body=b"x" * 20)
    c.read()
    headers, body, _ = c.response(sid)
    assert headers[b":status"] == b"413"
    assert not c.goaway()


def test_concurrent_streams_are_advertised_and_bounded():
    h = Harness(maxStreams=3)
    c = Client(h)
    assert c.conn.remote_settings.max_concurrent_streams == 3
    # A client that ignores the setting: HEADERS frames made by hand.
    block = c.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                   (b":authority", b"a")])
    frames = []
    for sid in (1, 3, 5, 7):
        frame = HeadersFrame(sid)
        frame.data = block
        frame.flags.add("END_STREAM")
        frame.flags.add("END_HEADERS")
        frames.append(frame.serialize())
    c.frontend.dataReceived(b"".join(frames[:3]))
    assert h.connects() == 3 and not c.transport.disconnecting
    c.frontend.dataReceived(frames[3])
    c.read()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR


def test_rapid_reset_ends_in_goaway_and_others_are_served():
    h = Harness(maxStreams=10)
    c = Client(h)
    frontend = c.frontend
    budget = frontend.h2.resetBudget
    for i in range(budget + 5):
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                  (b":authority", b"a")], end_stream=True)
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        if c.transport.disconnecting:
            break
        if i % 10 == 9:
            c.flush()
    c.flush()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert c.transport.disconnecting
    assert h.connects() == 0  # opened and reset in one read: never dispatched
    other = Client(h, "10.9.9.9")
    sid = other.request("/")
    backend, _ = h.answer()
    backend.dataReceived(OK)
    other.read()
    assert other.response(sid)[1:] == (b"hello", True)


def test_continuation_flood_ends_in_goaway_and_others_are_served():
    h = Harness()
    c = Client(h)
    block = c.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                   (b":authority", b"a")])
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_STREAM")
    c.frontend.dataReceived(frame.serialize())
    for _ in range(CONTINUATION_LIMIT + 10):
        cont = ContinuationFrame(1)
        cont.data = b"\x00" * 1000
        c.frontend.dataReceived(cont.serialize())
        if c.transport.disconnecting:
            break
    c.read()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert c.transport.disconnecting
    other = Client(h, "10.9.9.9")
    sid = other.request("/")
    backend, _ = h.answer()
    backend.dataReceived(OK)
    other.read()
    assert other.response(sid)[1:] == (b"hello", True)


def test_client_reset_mid_response_frees_the_backend(events):
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    c.conn.reset_stream(sid, ErrorCodes.CANCEL)
    c.flush()
    assert server.disconnecting or getattr(server, "aborted", False)
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["status"] == 200 and event["protocol"] == "HTTP/2"
    assert h.servers[0].active == 0


def test_backend_breaking_mid_response_resets_only_that_stream():
    h = Harness()
    c = Client(h)
    one = c.request("/1")
    two = c.request("/2")
    b1, s1 = h.answer(0)
    b2, _ = h.answer(1)
    b1.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    b1.connectionLost(None)
    h.reactor.advance(0)
    b2.dataReceived(OK)
    c.read()
    [reset] = c.of(h2.events.StreamReset, one)
    assert c.response(two)[1:] == (b"hello", True)
    assert not c.goaway()


def test_drain_finishes_streams_then_goaway():
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    h.factory.finish()
    late = c.request("/late")
    [refused] = c.of(h2.events.StreamReset, late)
    assert refused.error_code == ErrorCodes.REFUSED_STREAM
    assert not c.transport.disconnecting
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.NO_ERROR
    assert c.transport.disconnecting


def test_idle_connection_gets_goaway():
    h = Harness(idleTimeout=5)
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    h.reactor.advance(4)
    c.read()
    assert not c.goaway() and not c.transport.disconnecting
    h.reactor.advance(6)
    c.read()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.NO_ERROR


def test_response_trailers_reach_the_client_after_the_body():
    h = Harness()
    c = Client(h)
    sid = c.request("/pkg.Service/Call", method="POST", extra=[(b"te", b"trailers")], body=b"\x00", end=True)
    backend, _ = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n")
    [exchange] = c.frontend.h2.streams[sid].exchanges
    exchange.responseTrailers([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    backend.dataReceived(b"0\r\n\r\n")
    c.read()
    headers, body, ended = c.response(sid)
    assert (body, ended) == (b"abc", True)
    [trailers] = c.of(h2.events.TrailersReceived, sid)
    assert dict(trailers.headers) == {b"grpc-status": b"0", b"grpc-message": b"ok"}


def test_empty_answer_is_one_headers_frame_with_end_stream():
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\ngrpc-status: 14\r\nContent-Length: 0\r\n\r\n")
    c.read()
    [answer] = c.of(h2.events.ResponseReceived, sid)
    assert answer.stream_ended is not None
    assert not c.of(h2.events.DataReceived, sid)


def test_request_trailers_are_kept_for_the_exchange():
    h = Harness()
    c = Client(h)
    sid = c.request("/up", method="POST", body=b"abc", end=False)
    stream = c.frontend.h2.streams[sid]
    [exchange] = stream.exchanges
    c.conn.send_headers(sid, [(b"x-checksum", b"1")], end_stream=True)
    c.flush()
    assert exchange.requestTrailers == [(b"x-checksum", b"1")]
    assert exchange.requestDone


_names = st.sampled_from([b":status", b"server", b"date", b"content-length", b"set-cookie", b"x-request-id"]) | \
    st.binary(min_size=1, max_size=300).map(lambda b: b"x-" + bytes(97 + c % 26 for c in b))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(_names, st.binary(max_size=400)), max_size=10), min_size=1, max_size=5),
       st.booleans())
def test_static_encoder_blocks_decode_to_what_was_encoded(blocks, resize):
    encoder, decoder = StaticEncoder(), Decoder()
    for i, headers in enumerate(blocks):
        if resize and i == 1:
            encoder.header_table_size = 0
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
    assert decoder.header_table_size == 0


def test_metrics_count_requests_by_protocol():
    from txlb.observe.metrics import Metrics

    h = Harness()
    h.service.metrics = Metrics({"p": h.pool}, h.reactor)
    c = Client(h)
    c.request("/")
    backend, _ = h.answer()
    backend.dataReceived(OK)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h1, _ = h.answer()
    h1.dataReceived(OK)
    text = h.service.metrics.exposition().decode()
    assert 'txlb_http_requests_total{protocol="http/2",service="web"} 1.0' in text
    assert 'txlb_http_requests_total{protocol="http/1.1",service="web"} 1.0' in text


def test_empty_data_frames_count_against_the_reset_budget():
    h = Harness()
    c = Client(h)
    sid = c.request("/up", method="POST", end=False)
    budget = c.frontend.h2.resetBudget
    for i in range(budget + 1):
        c.conn.send_data(sid, b"")
        if i % 50 == 49:
            c.flush()
    c.flush()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_reset_budget_renews_after_its_window():
    h = Harness()
    c = Client(h)
    budget = c.frontend.h2.resetBudget
    for round in range(3):
        for _ in range(budget - 10):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                      (b":authority", b"a")], end_stream=True)
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        h.reactor.advance(11)
    assert not c.goaway()


def test_body_longer_than_its_content_length_ends_the_connection():
    h = Harness()
    c = Client(h)
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
                              (b":authority", b"a"), (b"content-length", b"5")])
    c.flush()
    backend, server = h.answer()
    frame = DataFrame(sid)
    frame.data = b"0123456789"  # what the client's own h2 would refuse to send
    frame.flags.add("END_STREAM")
    c.frontend.dataReceived(frame.serialize())
    c.read()
    [goaway] = c.goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert server.value().endswith(b"\r\n\r\n")  # the head, and not one byte of that body
    h.reactor.advance(0)
    assert getattr(server, "aborted", False) or server.disconnecting


def test_a_stream_whose_window_stays_shut_times_out_on_the_client(events):
    h = Harness(clientTimeout=10, backendTimeout=5)
    c = Client(h)
    sid = c.request("/big")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
    c.read()  # the client takes 64 KiB and opens no window
    h.reactor.advance(6)
    c.read()
    assert not c.of(h2.events.StreamReset, sid)  # the backend is not blamed after its 5s
    h.reactor.advance(5)
    c.read()
    [reset] = c.of(h2.events.StreamReset, sid)
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["error"] == "the client read nothing for 10s"
    assert getattr(server, "aborted", False) or server.disconnecting
    assert not c.goaway()


def test_expect_100_continue_gets_the_interim_answer():
    h = Harness()
    c = Client(h)
    sid = c.request("/up", method="POST", extra=[(b"content-length", b"3"), (b"expect", b"100-continue")],
                    end=False)
    backend, server = h.answer()
    assert b"\r\nexpect: 100-continue\r\n" in server.value()
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    c.read()
    [interim] = c.of(h2.events.InformationalResponseReceived, sid)
    assert dict(interim.headers)[b":status"] == b"100"
    c.send(sid, b"abc", end=True)
    assert server.value().endswith(b"\r\n\r\nabc")
    backend.dataReceived(OK)
    c.read()
    headers, body, ended = c.response(sid)
    assert (headers[b":status"], body, ended) == (b"200", b"hello", True)


def test_a_stream_holding_its_whole_window_does_not_hold_up_the_others():
    h = Harness()
    c = Client(h)
    held = c.request("/a", method="POST", extra=[(b"content-length", b"100000")], body=b"a" * 65535, end=False)
    assert c.conn.local_flow_control_window(held) == 0  # not connected yet: nothing acknowledged
    other = c.request("/b", method="POST", extra=[(b"content-length", b"40000")], end=False)
    assert c.conn.local_flow_control_window(other) == 65535
    c.send(other, b"b" * 40000, end=True)
    backend, server = h.answer(1)
    assert server.value().endswith(b"\r\n\r\n" + b"b" * 40000)


def test_a_reload_turning_http2_off_applies_to_new_connections():
    h = Harness()
    c = Client(h)
    h.service.update(http2=False, maxStreams=5)
    sid = c.request("/")  # the open HTTP/2 connection goes on
    backend, _ = h.answer()
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    frontend, client = h.accept("10.9.9.9")
    frontend.dataReceived(PREFACE)
    assert frontend.h2 is None and client.value().startswith(b"HTTP/1.1 4")
    h.service.update(http2=True)
    again = Client(h, "10.9.9.8")
    assert again.conn.remote_settings.max_concurrent_streams == 5


def test_the_same_header_block_again_makes_a_request_of_its_own():
    # The second block is all indexed, so the codec hands back the very
    # list it decoded the first time: each exchange must still get its own.
    h = Harness(servers=1)
    c = Client(h)
    first = c.request("/same", extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    backend, server = h.answer()
    backend.dataReceived(OK)
    second = c.request("/same", extra=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert h.connects() == 1
    heads = server.value().split(b"\r\n\r\n")[:2]
    for data in heads:
        line, fields = head(data + b"\r\n\r\n")
        assert line == b"GET /same HTTP/1.1"
        assert fields[b"host"] == [b"shop.example"]
        assert fields[b"cookie"] == [b"a=1; b=2"]
    backend.dataReceived(OK)
    c.read()
    assert c.response(first)[1:] == c.response(second)[1:] == (b"hello", True)


def test_streams_hand_their_timer_on_and_none_is_left_behind():
    h = Harness(servers=1)
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    backend.dataReceived(OK)
    for _ in range(50):
        sid = c.request("/")
        backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    # The connection's idle timer, the backend's, and a spare or two: not
    # one per stream served.
    assert len(h.reactor.getDelayedCalls()) <= 4
    c.conn.close_connection()
    c.flush()
    assert c.transport.disconnecting
    c.frontend.connectionLost(None)
    assert not [call for call in h.reactor.getDelayedCalls() if "H2" in repr(call) or "_Alarm" in repr(call)]


def test_a_client_goaway_lets_its_streams_in_flight_finish():
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    # Sent by hand: the client's h2 would read nothing more after its own GOAWAY.
    c.frontend.dataReceived(GoAwayFrame(0, last_stream_id=0).serialize())
    c.read()
    assert not c.transport.disconnecting
    late = c.request("/late")
    [refused] = c.of(h2.events.StreamReset, late)
    assert refused.error_code == ErrorCodes.REFUSED_STREAM
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    assert c.transport.disconnecting


def test_response_blocks_are_an_http11_heads_fields_for_http2():
    encoder, decoder = StaticEncoder(), Decoder()
    head = [(b"Server", b"nginx"), (b"Connection", b"keep-alive"), (b"Transfer-Encoding", b"chunked"),
            (b"Keep-Alive", b"timeout=5"), (b"X-Request-ID", b"abc-1"), (b"Content-Length", b"12")]
    for status in (200, 404, 200):
        block, empty = encoder.responseBlock(status, head)
        assert decoder.decode(block, raw=True) == [(b":status", b"%d" % status), (b"server", b"nginx"),
                                                   (b"x-request-id", b"abc-1"), (b"content-length", b"12")]
        assert not empty
    block, empty = encoder.responseBlock(204, [(b"content-LENGTH", b"0")])
    assert decoder.decode(block, raw=True) == [(b":status", b"204"), (b"content-length", b"0")] and empty


def test_response_lines_encode_as_http2_fields():
    encoder, decoder = StaticEncoder(), Decoder()
    lines = [b"Server: nginx", b"Connection: keep-alive", b"X-Request-ID: abc-1", b"X-Cache: MISS",
             b"Set-Cookie: s=1", b"Content-Length: 12", b"Upgrade: h2c", b"X-Empty: "]
    for status in (200, 503, 200):
        block = encoder.responseLines(status, lines)
        assert decoder.decode(block, raw=True) == [
            (b":status", b"%d" % status), (b"server", b"nginx"), (b"x-request-id", b"abc-1"),
            (b"x-cache", b"MISS"), (b"set-cookie", b"s=1"), (b"content-length", b"12"), (b"x-empty", b"")]
    assert b"X-Request-ID: abc-1" not in encoder._lines and b"Server: nginx" in encoder._lines


def test_a_backends_response_is_framed_without_being_read_back():
    h = Harness()
    c = Client(h)
    sid = c.request("/")
    backend, _ = h.answer()
    stream = c.frontend.h2.streams[sid]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nServer: app\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello")
    c.read()
    headers, body, ended = c.response(sid)
    assert (headers[b"server"], headers[b"content-length"], body, ended) == (b"app", b"5", b"hello", True)
    assert b"connection" not in headers
    # One read of the backend: one DATA frame, carrying END_STREAM; no
    # HTTP/1.1 head written and parsed again.
    [data] = c.of(h2.events.DataReceived, sid)
    assert data.stream_ended is not None
    assert stream.out.parser is None and stream.out.direct


def test_a_head_request_and_a_304_are_one_headers_frame():
    h = Harness()
    c = Client(h)
    for method, answer in ((b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
                           (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")):
        sid = c.request("/", method=method.decode())
        backend, _ = h.answer()
        backend.dataReceived(answer)
        c.read()
        [response] = c.of(h2.events.ResponseReceived, sid)
        assert response.stream_ended is not None and not c.of(h2.events.DataReceived, sid)
        if method == b"HEAD":
            assert dict(response.headers)[b"content-length"] == b"99"


def test_a_finished_stream_is_freed_by_reference_counting():
    """A stream's objects refer to each other until it ends; then nothing keeps them for the cycle collector."""
    h = Harness()
    c = Client(h)
    gc.disable()
    try:
        sid = c.request("/")
        stream = weakref.ref(c.frontend.h2.streams[sid])
        backend, _ = h.answer()
        backend.dataReceived(OK)
        c.read()
        assert c.response(sid)[1:] == (b"hello", True)
        assert stream() is None
    finally:
        gc.enable()


def test_what_reaches_an_ended_stream_is_too_late_to_matter():
    """A backend's last call on the transport of a stream that ended does nothing, and the connection goes on."""
    h = Harness(servers=1)
    c = Client(h)
    sid = c.request("/")
    transport = c.frontend.h2.streams[sid].transport
    backend, _ = h.answer()
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
    transport.registerProducer(backend.transport, True)
    transport.write(b"late")
    transport.resumeProducing()
    transport.unregisterProducer()
    transport.stopProducing()
    transport.loseConnection()
    assert transport.getPeer() == c.frontend.transport.getPeer()
    c.read()
    assert not c.of(h2.events.StreamReset)
    sid = c.request("/again")
    backend.dataReceived(OK)
    c.read()
    assert c.response(sid)[1:] == (b"hello", True)
