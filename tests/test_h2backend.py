"""
Protocol tests for HTTP/2 backends (pools with protocol = "h2"): an HTTP/1.1
client on a StringTransport, the h2 library playing the backend server on
another, time a Clock.
"""

from __future__ import annotations

import json
import struct

from h2.errors import ErrorCodes
from h2.events import RequestReceived, TrailersReceived
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from hypothesis import given, settings, strategies as st
from OpenSSL import SSL
from service_identity.exceptions import DNSMismatch, VerificationError
from service_identity.hazmat import DNS_ID
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from tests.h2support import H2Peer, h2Connection
from tests.test_http_frontend import Harness, head
from txlb.balance.pool import ServerState
from txlb.health import GRPCCheck, grpcCheck, healthCheckFactories
from txlb.health._grpc import checkRequest, servingStatus
from txlb.http.grpc import grpcErrorHeaders, isGrpc
from txlb.http.h2backend import MAX_BUFFERED, H2Stream, _Dechunk, _FrameSplitter
from txlb.interfaces import IHealthCheck


class H2Server(H2Peer):
    """The backend's side of one connection, played by the h2 library."""

    def __init__(self, backend, transport, maxStreams: int = 100) -> None:
        conn = h2Connection(client=False)
        conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: maxStreams})
        conn.initiate_connection()
        super().__init__(backend, transport, conn)
        self.backend = backend
        self.pump()

    def pump(self) -> None:
        self.flush()

    def requests(self) -> list:
        self.pump()
        return self.of(RequestReceived)

    def respond(self, sid: int, status: int = 200, body: bytes = b"", headers=(), trailers=None,
                end: bool = True) -> None:
        fields = [(b":status", b"%d" % status), *headers]
        self.conn.send_headers(sid, fields, end_stream=end and not body and not trailers)
        if body:
            self.conn.send_data(sid, body, end_stream=end and not trailers)
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
        self.pump()

    def goAway(self, lastStreamId: int) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = lastStreamId
        frame.error_code = 0
        self.backend.dataReceived(frame.serialize())


def h2Harness(servers: int = 1, **settings) -> Harness:
    h = Harness(servers=servers, **settings)
    h.pool.protocol = "h2"
    return h


def serve(h: Harness, index: int = -1, maxStreams: int = 100) -> H2Server:
    backend, transport = h.answer(index)
    return H2Server(backend, transport, maxStreams)


GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def firstStream(h: Harness, request: bytes = GET):
    """
    A client sends C{request} through C{h}, and the server of the h2
    connection made for it reads it: C{(frontend, client, server, the
    request as the server got it)}.
    """
    frontend, client = h.accept()
    frontend.dataReceived(request)
    server = serve(h)
    [received] = server.requests()
    return frontend, client, server, received


def connecting(request: bytes = GET):
    """
    A client sends C{request} to a one-server h2 pool that does not retry:
    C{(client, the backend connection made for it, its transport)}, before
    the server has said anything.
    """
    h = h2Harness(servers=1, retries=0)
    frontend, client = h.accept()
    frontend.dataReceived(request)
    backend, transport = h.answer()
    return client, backend, transport


def connectFailed(client, events) -> str:
    """The client got a 502: why the last connect failed, as logged."""
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    return [e for e in events if e.get("event") == "connect_failed"][-1]["why"]


def fields(request) -> dict:
    return {name: value for name, value in request.headers}


def test_a_request_becomes_a_stream_and_its_answer_an_http11_response(events):
    h = h2Harness()
    frontend, client, server, request = firstStream(h, (
        b"GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nAccept: */*\r\n\r\n"))
    got = fields(request)
    assert (got[b":method"], got[b":path"], got[b":authority"], got[b":scheme"]) == (
        b"GET", b"/a?b=1", b"shop.example", b"http")
    assert got[b"x-forwarded-for"] == b"10.1.2.3" and got[b"x-forwarded-host"] == b"shop.example"
    assert not {b"host", b"connection", b"keep-alive", b"x-secret", b"te"} & set(got)
    assert server.ended(request.stream_id)  # no body: END_STREAM on the HEADERS
    server.respond(request.stream_id, body=b"hello", headers=[(b"content-length", b"5"), (b"x-app", b"1")])
    status, answer = head(client.value())
    assert status == b"HTTP/1.1 200 OK"
    assert answer[b"content-length"] == [b"5"] and answer[b"x-app"] == [b"1"]
    assert answer[b"x-request-id"] == [got[b"x-request-id"]]
    assert client.value().endswith(b"\r\n\r\nhello")
    [event] = [e for e in events if e.get("event") == "request"]
    assert (event["status"], event["selectedServer"], event["pool"], event["path"]) == (200, "s0", "p", "/a")
    assert event["bytesSent"] == len(client.value())
    assert h.servers[0].active == 0 and h.servers[0].total == 1
    assert not client.disconnecting


def test_streams_of_many_clients_share_one_connection():
    h = h2Harness()
    clients = [h.accept() for _ in range(3)]
    clients[0][0].dataReceived(b"GET /0 HTTP/1.1\r\nHost: a\r\n\r\n")
    server = serve(h)
    for i, (frontend, _) in enumerate(clients[1:], 1):
        frontend.dataReceived(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
    requests = server.requests()
    assert h.connects() == 1
    assert [fields(r)[b":path"] for r in requests] == [b"/0", b"/1", b"/2"]
    assert [r.stream_id for r in requests] == [1, 3, 5]
    for request in reversed(requests):  # answered out of order
        server.respond(request.stream_id, body=fields(request)[b":path"])
    for i, (_, client) in enumerate(clients):
        assert client.value().endswith(b"\r\n\r\n%x\r\n/%d\r\n0\r\n\r\n" % (2, i))
    # And kept for the next request.
    clients[0][0].dataReceived(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 1 and len(server.requests()) == 4


def test_max_concurrent_streams_reached_opens_a_second_connection():
    h = h2Harness()
    first, _ = h.accept()
    first.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    one = serve(h, maxStreams=1)
    [r1] = one.requests()
    second, secondClient = h.accept()
    second.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 2  # the first connection is full
    two = serve(h, maxStreams=1)
    [r2] = two.requests()
    assert fields(r2)[b":path"] == b"/2"
    two.respond(r2.stream_id, body=b"2", headers=[(b"content-length", b"1")])
    assert secondClient.value().endswith(b"\r\n\r\n2")
    one.respond(r1.stream_id, body=b"1", headers=[(b"content-length", b"1")])
    third, _ = h.accept()
    third.dataReceived(b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 2  # room again on one of them
    assert len(one.requests()) + len(two.requests()) == 3


def test_requests_wait_for_the_connection_being_made_rather_than_open_more():
    h = h2Harness()
    for i in range(3):
        frontend, _ = h.accept()
        frontend.dataReceived(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
    assert h.connects() == 1
    server = serve(h)
    assert len(server.requests()) == 3


def test_goaway_drains_the_connection_and_untaken_streams_go_to_a_fresh_one():
    h = h2Harness()
    a, aClient = h.accept()
    b, bClient = h.accept()
    a.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    old = serve(h)
    b.dataReceived(b"DELETE /b HTTP/1.1\r\nHost: x\r\n\r\n")
    r1, r3 = old.requests()
    old.goAway(lastStreamId=r1.stream_id)
    assert h.connects() == 2  # /b was never taken: replayed on a fresh connection
    new = serve(h)
    [again] = new.requests()
    assert fields(again)[b":path"] == b"/b"
    new.respond(again.stream_id, status=204)
    assert bClient.value().startswith(b"HTTP/1.1 204 No Content")
    c, _ = h.accept()
    c.dataReceived(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.connects() == 2 and len(new.requests()) == 2  # new streams avoid the draining one
    assert not old.transport.disconnecting
    old.respond(r1.stream_id, body=b"ok", headers=[(b"content-length", b"2")])  # taken streams finish
    assert aClient.value().endswith(b"\r\n\r\nok")
    assert old.transport.disconnecting  # drained: closed


def test_goaway_replays_an_untaken_post():
    h = h2Harness(servers=2)
    a, aClient = h.accept()
    a.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    old = serve(h)
    b, bClient = h.accept()
    b.dataReceived(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    [r1] = old.requests()  # /b went to the other server
    other = serve(h)
    [rb] = other.requests()
    old.goAway(lastStreamId=0)
    assert old.transport.disconnecting  # nothing left on it
    # /a was not taken: even a POST may go again, on a fresh connection.
    assert h.connects() == 3
    fresh = serve(h)
    [again] = fresh.requests()
    assert fields(again)[b":path"] == b"/a"
    fresh.respond(again.stream_id, status=201)
    assert aClient.value().startswith(b"HTTP/1.1 201 Created")
    # Refused again there: then another server.


def test_refused_stream_is_retried():
    h = h2Harness()
    a, client = h.accept()
    a.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    server = serve(h)
    [r1] = server.requests()
    server.conn.reset_stream(r1.stream_id, ErrorCodes.REFUSED_STREAM)
    server.pump()
    assert h.connects() == 2  # replayed on a fresh connection, even a POST
    fresh = serve(h)
    [r2] = fresh.requests()
    fresh.respond(r2.stream_id, status=201)
    assert client.value().startswith(b"HTTP/1.1 201 Created")


def test_response_trailers_reach_an_http11_client_that_asked_for_them():
    h = h2Harness()
    frontend, client, server, request = firstStream(h, b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
    assert fields(request)[b"te"] == b"trailers"
    server.respond(request.stream_id, body=b"abc", trailers=[(b"grpc-status", b"0"), (b"x-sum", b"9")])
    assert client.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\n"
                                   b"x-sum: 9\r\n\r\n")


def test_response_trailers_are_dropped_for_a_client_that_did_not_ask():
    h = h2Harness()
    frontend, client, server, request = firstStream(h)
    assert b"te" not in fields(request)
    server.respond(request.stream_id, body=b"abc", trailers=[(b"x-sum", b"9")])
    assert client.value().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_request_trailers_from_the_exchange_end_the_stream():
    h = h2Harness()
    frontend, client, server, request = firstStream(
        h, b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    frontend.exchanges[0].requestTrailers = [(b"X-Checksum", b"1")]  # as an HTTP/2 client side sets them
    frontend.dataReceived(b"0\r\n\r\n")
    server.pump()
    assert server.body(request.stream_id) == b"abc"
    [trailers] = [e for e in server.events if isinstance(e, TrailersReceived)]
    assert trailers.headers == [(b"x-checksum", b"1")]
    assert server.ended(request.stream_id)


def test_chunked_and_sized_request_bodies_become_data_frames():
    h = h2Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n")
    server = serve(h)
    frontend.dataReceived(b"2\r\nde\r\n0\r\nTrailer-Field: x\r\n\r\n")
    [request] = server.requests()
    assert b"transfer-encoding" not in fields(request) and b"content-length" not in fields(request)
    assert server.body(request.stream_id) == b"abcde" and server.ended(request.stream_id)
    server.respond(request.stream_id, status=204)
    frontend.dataReceived(b"PUT /v HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123")
    frontend.dataReceived(b"456789")
    _, second = server.requests()
    assert fields(second)[b"content-length"] == b"10"
    assert server.body(second.stream_id) == b"0123456789" and server.ended(second.stream_id)


def test_a_slow_client_holds_back_its_own_stream_only():
    h = h2Harness()
    slow, slowClient = h.accept()
    fast, fastClient = h.accept()
    slow.dataReceived(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
    server = serve(h)
    fast.dataReceived(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
    r1, r2 = server.requests()
    server.respond(r1.stream_id, body=b"x" * 1000, end=False)
    assert isinstance(slowClient.producer, H2Stream)
    slowClient.producer.pauseProducing()  # its socket is full
    window = server.conn.local_flow_control_window(r1.stream_id)
    server.conn.send_data(r1.stream_id, b"y" * 15000)
    server.conn.send_data(r1.stream_id, b"y" * 15000)
    server.pump()
    # What was read is not handed back while the client does not read ...
    assert server.conn.local_flow_control_window(r1.stream_id) == window - 30000
    # ... and the other stream goes on.
    server.respond(r2.stream_id, body=b"small")
    assert fastClient.value().endswith(b"small\r\n0\r\n\r\n")
    slowClient.producer.resumeProducing()
    server.pump()
    assert server.conn.local_flow_control_window(r1.stream_id) >= window
    server.conn.end_stream(r1.stream_id)
    server.pump()
    assert slowClient.value().endswith(b"y" * 100 + b"\r\n0\r\n\r\n")
    assert slowClient.producer is None


def test_a_request_body_waits_for_the_servers_window_and_pauses_the_client():
    h = h2Harness()
    frontend, client = h.accept()
    size = 65535 + MAX_BUFFERED + 1000
    frontend.dataReceived(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (size + 10))
    server = serve(h)
    frontend.dataReceived(b"z" * size)
    [request] = server.requests()
    assert len(server.body(request.stream_id)) == 65535  # the default window
    assert client.producerState == "paused"
    server.conn.acknowledge_received_data(65535, request.stream_id)
    server.conn.increment_flow_control_window(10 ** 6)
    server.conn.increment_flow_control_window(10 ** 6, request.stream_id)
    server.pump()
    assert client.producerState == "producing"
    frontend.dataReceived(b"0123456789")
    server.pump()
    assert len(server.body(request.stream_id)) == size + 10 and server.ended(request.stream_id)


def test_a_backend_reset_mid_response_cuts_the_client_off():
    h = h2Harness()
    frontend, client, server, request = firstStream(h)
    server.respond(request.stream_id, body=b"part", end=False)
    server.conn.reset_stream(request.stream_id, ErrorCodes.INTERNAL_ERROR)
    server.pump()
    assert client.aborted
    other, otherClient = h.accept()
    other.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    _, r2 = server.requests()  # the connection goes on
    server.respond(r2.stream_id, status=204)
    assert otherClient.value().startswith(b"HTTP/1.1 204")


def test_the_connection_lost_before_an_answer_is_a_502_when_it_cannot_retry(events):
    h = h2Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
    server = serve(h)
    server.requests()
    server.backend.connectionLost(Failure(ConnectionDone()))
    status, _ = head(client.value())
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert json.loads(client.value().partition(b"\r\n\r\n")[2])["error"] == "s0 closed the connection"


def test_a_server_that_does_not_speak_http2_fails_the_connect(events):
    client, backend, transport = connecting()
    backend.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert transport.aborted
    backend.connectionLost(Failure(ConnectionDone()))
    assert "does not speak HTTP/2" in connectFailed(client, events)


def test_a_tls_server_that_does_not_choose_h2_in_alpn_fails_the_connect(events):
    # TLS itself is end to end in test_integration_grpc; here, what the
    # connection does once the handshake has ended without h2.
    for chosen, said in [(None, "it chose no protocol"), (b"http/1.1", "it chose http/1.1")]:
        client, backend, transport = connecting()
        transport.negotiatedProtocol = chosen
        backend.handshakeCompleted()
        assert transport.aborted
        backend.connectionLost(Failure(ConnectionDone()))
        why = connectFailed(client, events)
        assert f"s0 did not agree to h2 in TLS's ALPN ({said})" in why and 'protocol = "http/1.1"' in why


def test_a_tls_handshake_that_fails_says_why(events):
    client, backend, transport = connecting()
    backend.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    assert "TLS with s0 failed: certificate verify failed" in connectFailed(client, events)


def test_a_server_certificate_for_another_name_says_which_name_it_lacked(events):
    client, backend, transport = connecting()
    mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("grpc.internal"))])
    backend.connectionLost(Failure(mismatch))
    assert "TLS with s0 failed: the server's certificate is not for grpc.internal" in connectFailed(client, events)


def test_a_tls_server_that_closes_right_after_the_handshake_may_want_a_client_certificate(events):
    client, backend, transport = connecting()
    transport.negotiatedProtocol = b"h2"
    backend.handshakeCompleted()
    assert not transport.disconnecting
    backend.connectionLost(Failure(ConnectionLost()))
    assert ("s0 closed the connection right after the TLS handshake (does it want a client certificate?"
            in connectFailed(client, events))


def test_a_connection_without_streams_closes_after_the_idle_timeout():
    h = h2Harness()
    frontend, client, server, request = firstStream(h)
    server.respond(request.stream_id, status=204)
    h.reactor.advance(29)
    assert not server.transport.disconnecting
    h.reactor.advance(2)
    assert server.transport.disconnecting


def test_the_backend_timeout_resets_only_that_stream():
    h = h2Harness(backendTimeout=5.0)
    frontend, client, server, request = firstStream(h)
    h.reactor.advance(6)
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"
    server.pump()
    assert not server.transport.disconnecting
    assert h.connections.h2.connections(h.servers[0])[0].streams == {}


def test_a_grpc_client_with_no_server_gets_unavailable_in_grpc_terms(events):
    h = h2Harness()
    h.pool.setHealth(h.servers[0], ServerState.DOWN)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc+proto\r\n"
                          b"TE: trailers\r\nContent-Length: 0\r\n\r\n")
    status, answer = head(client.value())
    assert status == b"HTTP/1.1 200 OK"
    assert answer[b"grpc-status"] == [b"14"]
    assert b"no%20server" in answer[b"grpc-message"][0] or b"no server" in answer[b"grpc-message"][0]
    assert answer[b"content-type"] == [b"application/grpc"]
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["status"] == 503  # counted as txlb's failure


def test_grpc_helpers():
    assert isGrpc([(b"Content-Type", b"application/grpc")]) and isGrpc([(b"content-type", b"application/grpc-web")])
    assert not isGrpc([(b"content-type", b"application/json")])
    headers = dict(grpcErrorHeaders(504, "slow\nserver", "r1"))
    assert headers[b"grpc-status"] == b"4" and b"\n" not in headers[b"grpc-message"]


def test_an_upgrade_to_an_h2_pool_is_a_502():
    h = h2Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    serve(h)
    h.reactor.advance(0)
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


# The pieces.


@given(st.lists(st.binary(min_size=0, max_size=40), max_size=8), st.data())
@settings(max_examples=60)
def test_dechunk_undoes_chunked_framing_however_it_is_split(pieces, data):
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(framed)), max_size=6)))
    dechunk = _Dechunk()
    out = []
    last = 0
    for cut in cuts + [len(framed)]:
        out += dechunk.feed(framed[last:cut])
        last = cut
    assert b"".join(out) == b"".join(pieces) and dechunk.ended


def _frame(kind: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + sid.to_bytes(4, "big") + payload


@given(st.lists(st.tuples(st.sampled_from([0, 1, 4, 7, 8]), st.binary(max_size=30)), max_size=8), st.data())
@settings(max_examples=100)
def test_frame_splitter_takes_out_goaway_frames_only(frames, data):
    wire = b""
    expected_bytes = b""
    expected_goaways = []
    for kind, payload in frames:
        if kind == 7:
            payload = struct.pack("!LL", 5, 0) + payload
            expected_goaways.append((5, 0))
            wire += _frame(kind, 0, payload)
        else:
            frame = _frame(kind, 1, payload)
            wire += frame
            expected_bytes += frame
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    splitter = _FrameSplitter()
    passed, goaways = b"", []
    last = 0
    for cut in cuts + [len(wire)]:
        for part in splitter.feed(wire[last:cut]):
            if type(part) is tuple:
                goaways.append(part)
            else:
                passed += part
        last = cut
    assert passed == expected_bytes and goaways == expected_goaways


# The grpc health check.


def test_health_messages_by_hand():
    assert checkRequest("") == b"\x00\x00\x00\x00\x00"
    assert checkRequest("pkg.S") == b"\x00\x00\x00\x00\x07\x0a\x05pkg.S"
    assert servingStatus(b"\x00\x00\x00\x00\x02\x08\x01") == 1
    assert servingStatus(b"\x00\x00\x00\x00\x02\x08\x02") == 2
    assert servingStatus(b"\x00\x00\x00\x00\x00") == 0


def test_grpc_check_kind_is_built_in():
    assert healthCheckFactories()["grpc"] is grpcCheck
    check = grpcCheck({"service": "pkg.S"})
    assert verifyObject(IHealthCheck, check)
    assert check.alpn == (b"h2",)


class _Endpoint:
    def __init__(self) -> None:
        self.protocols: list = []

    def connect(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.protocols.append(protocol)
        return Deferred()


def _runCheck(answer):
    from txlb.balance.pool import Server

    endpoint = _Endpoint()
    results = []
    GRPCCheck("pkg.S").check(Server("g", "tcp:host=127.0.0.1:port=5"), endpoint, None).addBoth(results.append)
    return endpoint, results


def test_grpc_check_passes_on_serving_and_fails_otherwise():
    for body, trailers, ok, detail in [
        (b"\x00\x00\x00\x00\x02\x08\x01", [(b"grpc-status", b"0")], True, "SERVING"),
        (b"\x00\x00\x00\x00\x02\x08\x02", [(b"grpc-status", b"0")], False, "NOT_SERVING"),
        (b"", [(b"grpc-status", b"5"), (b"grpc-message", b"unknown service")], False,
         "grpc-status 5: unknown service"),
    ]:
        endpoint, results = _runCheck(None)
        [protocol] = endpoint.protocols
        transport = StringTransport()
        protocol.makeConnection(transport)
        server = H2Peer(protocol, transport, h2Connection(client=False))
        server.conn.initiate_connection()
        [request] = [e for e in server.flush() if isinstance(e, RequestReceived)]
        got = fields(request)
        assert got[b":path"] == b"/grpc.health.v1.Health/Check" and got[b"content-type"] == b"application/grpc"
        assert server.body(request.stream_id) == checkRequest("pkg.S")
        server.conn.send_headers(request.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        if body:
            server.conn.send_data(request.stream_id, body)
        server.conn.send_headers(request.stream_id, trailers, end_stream=True)
        server.flush()
        [result] = results
        assert (result.ok, result.detail) == (ok, detail)


def test_grpc_check_over_tls_fails_when_the_server_does_not_choose_h2():
    endpoint, results = _runCheck(None)
    [protocol] = endpoint.protocols
    transport = StringTransport()
    transport.negotiatedProtocol = b"http/1.1"
    protocol.makeConnection(transport)
    protocol.handshakeCompleted()
    [result] = results
    assert (result.ok, result.detail) == (False, "the server did not agree to h2 in TLS's ALPN (it chose http/1.1)")
    assert transport.disconnecting
