"""
Protocol tests for the HTTP proxy on a memory reactor: requests are written
into the client transport by hand, backend connects are answered by hand,
and time is a Clock.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from txlb.balance.pool import Pool, Server
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.http.backend import BackendConnections
from txlb.http.frontend import HTTPProxyFactory, HTTPService
from txlb.http.routing import Route, Router
from txlb.net.endpoints import EndpointCache


class Transport(StringTransport):
    def loseWriteConnection(self) -> None:
        self.writeClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Harness:
    def __init__(self, servers: int = 3, retries: int = 2, routes=(), **settings) -> None:
        self.reactor = MemoryReactorClock()
        self.servers = [Server(f"s{i}", f"tcp:host=127.0.0.{i + 1}:port=900{i}") for i in range(servers)]
        self.pool = Pool("p", "round_robin", RoundRobin(), self.servers, self.reactor,
                         retries=retries, connectTimeout=2.0)
        self.other = Pool("q", "round_robin", RoundRobin(), [Server("q0", "tcp:host=127.0.1.1:port=1")],
                          self.reactor)
        self.connections = BackendConnections(EndpointCache(self.reactor), self.reactor)
        self.service = HTTPService("web", {"p": self.pool, "q": self.other}, Router("p", routes),
                                   self.connections, self.reactor, **settings)
        self.factory = HTTPProxyFactory(self.service)
        self.backends: list = []

    def accept(self, client: str = "10.1.2.3"):
        frontend = self.factory.buildProtocol(IPv4Address("TCP", client, 5555))
        transport = Transport(peerAddress=IPv4Address("TCP", client, 5555))
        frontend.makeConnection(transport)
        return frontend, transport

    def connects(self) -> int:
        return len(self.reactor.tcpClients)

    def answer(self, index: int = -1):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = Transport()
        backend.makeConnection(transport)
        self.backends.append((backend, transport))
        return backend, transport

    def refuse(self, index: int = -1):
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(ConnectionRefusedError()))


def head(data: bytes) -> tuple[bytes, dict]:
    text, _, _ = data.partition(b"\r\n\r\n")
    lines = text.split(b"\r\n")
    fields: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    return lines[0], fields


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_get_is_rewritten_forwarded_and_answered(events):
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(
        b"GET /a?b=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 1.1.1.1\r\nAccept: */*\r\n\r\n"
    )
    backend, server = h.answer()
    line, fields = head(server.value())
    assert line == b"GET /a?b=1 HTTP/1.1"
    assert fields[b"host"] == [b"shop.example"]
    assert fields[b"x-forwarded-for"] == [b"1.1.1.1, 10.1.2.3"]
    assert fields[b"x-forwarded-proto"] == [b"http"]
    assert fields[b"x-forwarded-host"] == [b"shop.example"]
    assert b"x-secret" not in fields and b"keep-alive" not in fields and b"connection" not in fields
    [rid] = fields[b"x-request-id"]
    backend.dataReceived(OK)
    status, answer = head(client.value())
    assert status == b"HTTP/1.1 200 OK"
    assert answer[b"x-request-id"] == [rid]
    assert client.value().endswith(b"\r\n\r\nhello")
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["requestId"] == rid.decode()
    assert (event["status"], event["selectedServer"], event["path"], event["method"]) == (200, "s0", "/a", "GET")
    assert event["reason"] == "round robin"
    assert h.servers[0].active == 0


def test_keep_alive_reuses_the_backend_connection_and_schedules_per_request():
    h = Harness(servers=1)
    frontend, client = h.accept()
    for i in range(3):
        frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        if i == 0:
            backend, server = h.answer()
        backend.dataReceived(OK)
    assert h.connects() == 1
    assert client.value().count(b"HTTP/1.1 200 OK") == 3
    assert h.servers[0].total == 3 and h.servers[0].active == 0


def test_each_request_is_scheduled_on_its_own():
    h = Harness()
    frontend, client = h.accept()
    hosts = []
    for _ in range(3):
        frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        hosts.append(h.reactor.tcpClients[-1][0])
        backend, _ = h.answer()
        backend.dataReceived(OK)
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_pipelined_requests_are_answered_in_order():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 1
    assert client.producerState == "paused"  # the second waits: read no more
    backend, server = h.answer()
    assert server.value().count(b"GET") == 1
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert server.value().count(b"GET /2") == 1  # the same connection, reused
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    body = client.value()
    assert body.index(b"\r\n\r\n1") < body.index(b"\r\n\r\n2")
    assert client.producerState == "producing"


def test_request_bodies_are_reframed():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n")
    backend, server = h.answer()
    frontend.dataReceived(b"2\r\nde\r\n0\r\nTrailer-Field: x\r\n\r\n")
    sent = server.value()
    line, fields = head(sent)
    assert fields[b"transfer-encoding"] == [b"chunked"]
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert b"Trailer-Field" not in sent and b"ext=1" not in sent


def test_content_length_body_streams_with_backpressure():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123")
    assert client.producerState == "paused"  # connecting: leave the rest in the kernel
    backend, server = h.answer()
    assert client.producerState == "producing"
    assert server.producer is not None
    server.producer.pauseProducing()  # the backend's buffer is full
    assert client.producerState == "paused"
    server.producer.resumeProducing()
    frontend.dataReceived(b"456789")
    assert server.value().endswith(b"Content-Length: 10\r\n\r\n0123456789")
    assert server.producer is None


def test_response_streams_with_backpressure_and_chunked_is_kept():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert client.producer is server
    client.producer.pauseProducing()
    assert server.producerState == "paused"
    client.producer.resumeProducing()
    backend.dataReceived(b"0\r\n\r\n")
    assert client.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert client.producer is None


def test_http10_client_gets_a_close_delimited_body():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    status, fields = head(client.value())
    assert fields[b"connection"] == [b"close"]
    assert client.value().endswith(b"\r\n\r\nhello")
    assert client.disconnecting


def test_head_and_304_have_no_body():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert client.value().endswith(b"Content-Length: 1000\r\n\r\n")
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    assert client.value().count(b"HTTP/1.1") == 2
    assert h.connects() == 1


def test_close_delimited_response_is_chunked_to_an_http11_client():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nabc")
    backend.connectionLost(Failure(ConnectionDone()))
    assert client.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert not client.disconnecting


def test_expect_100_continue_is_relayed():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    backend, server = h.answer()
    assert b"Expect: 100-continue" in server.value()
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert client.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    frontend.dataReceived(b"hi")
    backend.dataReceived(OK)
    assert client.value().endswith(b"hello")


@pytest.mark.parametrize(
    "request_, status",
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400),
        (b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 40000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests_are_refused_and_nothing_is_forwarded(request_, status, events):
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(request_)
    assert h.connects() == 0
    line, fields = head(client.value())
    assert line.startswith(b"HTTP/1.1 %d " % status)
    assert fields[b"connection"] == [b"close"]
    body = json.loads(client.value().partition(b"\r\n\r\n")[2])
    assert body["requestId"] == fields[b"x-request-id"][0].decode()
    assert client.disconnecting
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 0  # nothing more is read from that client


def test_body_over_the_limit_is_413():
    h = Harness(maxBody=10)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert head(client.value())[0].startswith(b"HTTP/1.1 413")
    assert h.connects() == 0


def test_chunked_body_over_the_limit_is_413():
    h = Harness(maxBody=10)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    backend, server = h.answer()
    frontend.dataReceived(b"b\r\n0123456789a\r\n")
    assert head(client.value())[0].startswith(b"HTTP/1.1 413")
    assert server.aborted
    assert h.servers[0].active == 0


def test_no_server_is_503():
    h = Harness(servers=0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head(client.value())[0] == b"HTTP/1.1 503 Service Unavailable"
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client.value().count(b"503") == 2  # keep-alive survives an error


def test_connect_failures_retry_other_servers_then_502(events):
    h = Harness(retries=2)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.refuse()
    h.refuse()
    assert [c[0] for c in h.reactor.tcpClients] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    h.refuse()
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    assert [s.active for s in h.servers] == [0, 0, 0]


def test_one_dead_server_costs_no_error():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    h.refuse()
    backend, server = h.answer()
    backend.dataReceived(OK)
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"


def test_backend_timeout_is_504():
    h = Harness(backendTimeout=5.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    h.reactor.advance(5)
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"
    assert server.aborted
    assert h.servers[0].active == 0


def test_idempotent_request_is_replayed_when_the_backend_closes_without_answering():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.connectionLost(Failure(ConnectionDone()))
    assert h.connects() == 2 and h.reactor.tcpClients[-1][0] == "127.0.0.2"
    backend, server = h.answer()
    backend.dataReceived(OK)
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"


def test_post_is_not_replayed():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    backend, server = h.answer()
    backend.connectionLost(Failure(ConnectionDone()))
    assert h.connects() == 1
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"


def test_stale_idle_connection_is_replaced_transparently():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(OK)
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.connectionLost(Failure(ConnectionDone()))  # the server had timed it out
    backend2, _ = h.answer()
    backend2.dataReceived(OK)
    assert client.value().count(b"200 OK") == 2
    assert h.servers[0].failures == 0


def test_broken_response_is_502_and_mid_body_failure_cuts_the_client():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 2xx Broken\r\n\r\n")
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    h2 = Harness()
    frontend, client = h2.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h2.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    backend.connectionLost(Failure(ConnectionDone()))
    assert client.aborted


def test_routes_choose_the_pool():
    h = Harness(routes=[Route("q", path_prefix="/api/")])
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.reactor.tcpClients[-1][0] == "127.0.1.1"


def test_header_timeout_is_408_and_idle_timeout_closes():
    h = Harness(clientTimeout=10.0, idleTimeout=75.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.reactor.advance(10)
    assert head(client.value())[0].startswith(b"HTTP/1.1 408")
    assert client.disconnecting
    frontend, client = h.accept()
    h.reactor.advance(74)
    assert not client.disconnecting
    h.reactor.advance(1)
    assert client.disconnecting and client.value() == b""


def test_client_leaving_releases_everything(events):
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    frontend.connectionLost(Failure(ConnectionDone()))
    assert server.aborted
    assert h.servers[0].active == 0
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["status"] == 499


def test_websocket_upgrade_becomes_a_pipe():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\nearly"
    )
    backend, server = h.answer()
    line, fields = head(server.value())
    assert fields[b"upgrade"] == [b"websocket"] and fields[b"connection"] == [b"upgrade"]
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: y\r\n\r\nfrom-server")
    assert client.value().endswith(b"\r\n\r\nfrom-server")
    assert server.value().endswith(b"early")
    frontend.dataReceived(b"from-client")
    assert server.value().endswith(b"from-client")
    assert h.servers[0].active == 1
    backend.connectionLost(Failure(ConnectionDone()))
    assert client.disconnecting
    frontend.connectionLost(Failure(ConnectionDone()))
    assert h.servers[0].active == 0


def test_backend_timeout_counts_from_the_end_of_a_long_upload():
    h = Harness(backendTimeout=5.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    backend, server = h.answer()
    for byte in b"0123456789":  # one byte every 4s: 40s of upload, never 5s quiet
        h.reactor.advance(4)
        frontend.dataReceived(bytes([byte]))
    assert client.value() == b""
    h.reactor.advance(4.9)
    assert client.value() == b""
    h.reactor.advance(0.1)
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"


def test_a_stalled_upload_times_out():
    h = Harness(backendTimeout=5.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01")
    backend, server = h.answer()
    h.reactor.advance(5)
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"
    assert server.aborted


def test_bytes_sent_after_an_upgrade_request_wait_for_the_answer():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert client.producerState == "paused"
    frontend.dataReceived(b"sent-early")  # already on its way before the pause took effect
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert client.producerState == "producing"
    frontend.dataReceived(b"-and-later")
    assert server.value().endswith(b"\r\n\r\nsent-early-and-later")


def test_a_refused_upgrade_closes_the_connection():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                          b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert head(client.value())[0] == b"HTTP/1.1 400 Bad Request"
    assert client.disconnecting
    assert b"/next" not in server.value()


@pytest.mark.parametrize(
    "request_, status",
    [
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
        (b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ],
)
def test_unsupported_requests_are_refused(request_, status):
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(request_)
    assert h.connects() == 0
    assert head(client.value())[0].startswith(b"HTTP/1.1 %d " % status)
    assert client.disconnecting


def test_absolute_form_is_forwarded_in_origin_form_and_routed_by_its_host():
    h = Harness(routes=[Route("q", host="api.example")])
    frontend, client = h.accept()
    frontend.dataReceived(b"GET http://API.example:8080?x=1 HTTP/1.1\r\nHost: www.example\r\n\r\n")
    assert h.reactor.tcpClients[-1][0] == "127.0.1.1"
    backend, server = h.answer()
    line, fields = head(server.value())
    assert line == b"GET /?x=1 HTTP/1.1"
    assert fields[b"host"] == [b"API.example:8080"]
    assert fields[b"x-forwarded-host"] == [b"API.example:8080"]


def test_options_asterisk_is_forwarded():
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    assert server.value().startswith(b"OPTIONS * HTTP/1.1\r\n")


def test_http10_request_without_host_gets_an_empty_host():
    import h11

    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    backend, server = h.answer()
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(server.value())
    request = parser.next_event()
    assert isinstance(request, h11.Request)
    assert dict(request.headers)[b"host"] == b""
    assert b"x-forwarded-host" not in dict(request.headers)


def test_endless_trailers_are_refused():
    h = Harness(maxHeaderBytes=1024)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: ")
    backend, server = h.answer()
    for _ in range(200):
        if client.disconnecting:
            break
        frontend.dataReceived(b"y" * 1024)
    assert head(client.value())[0].startswith(b"HTTP/1.1 431 ")
    assert server.aborted


def test_long_chunked_bodies_are_not_mistaken_for_trailers():
    h = Harness(maxHeaderBytes=1024)
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    backend, server = h.answer()
    for _ in range(200):
        frontend.dataReceived(b"400\r\n" + b"z" * 1024 + b"\r\n")
    frontend.dataReceived(b"0\r\n\r\n")
    backend.dataReceived(OK)
    assert head(client.value())[0] == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked"])
def test_a_response_transfer_coding_other_than_chunked_is_502(coding):
    h = Harness()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n")
    assert head(client.value())[0] == b"HTTP/1.1 502 Bad Gateway"
    assert server.aborted


def test_over_max_connections_requests_wait_then_503():
    h = Harness(servers=1)
    h.pool.maxConnections = 1
    h.pool.queueTimeout = 5.0
    first, firstClient = h.accept()
    first.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    second, secondClient = h.accept()
    second.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    third, thirdClient = h.accept()
    third.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.connects() == 1  # both wait
    backend.dataReceived(OK)  # the first answer frees the server: the second goes, on the same connection
    assert server.value().count(b"GET / HTTP/1.1") == 2
    h.reactor.advance(5)
    assert head(thirdClient.value())[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"max_connections" in thirdClient.value()


def test_client_leaving_the_queue_is_forgotten():
    h = Harness(servers=1)
    h.pool.maxConnections = 1
    first, _ = h.accept()
    first.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    second, _ = h.accept()
    second.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    second.connectionLost(Failure(ConnectionDone()))
    backend.dataReceived(OK)
    assert server.value().count(b"GET") == 1
    assert h.servers[0].active == 0


def test_5xx_answers_feed_passive_ejection():
    h = Harness(servers=1)
    h.pool.passive = (2, 30.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    assert h.servers[0].state.value == "up"
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    assert h.servers[0].state.value == "ejected"
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert client.value().count(b"HTTP/1.1 503 Service Unavailable") == 1
    h.reactor.advance(30)
    assert h.servers[0].state.value == "up"


def test_keep_alive_requests_set_no_timer_each():
    """The idle, header and backend timeouts move one deadline, not timers."""
    h = Harness(servers=1)
    calls = []
    callLater = h.reactor.callLater
    h.reactor.callLater = lambda *a, **kw: calls.append(a[0]) or callLater(*a, **kw)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(OK)
    before = len(calls)
    for _ in range(20):
        frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        backend.dataReceived(OK)
    assert client.value().count(b"200 OK") == 21
    assert len(calls) - before == 0


def test_a_timeout_armed_later_still_fires_on_time():
    h = Harness(servers=1, clientTimeout=10.0, idleTimeout=75.0, backendTimeout=5.0)
    frontend, client = h.accept()
    h.reactor.advance(70)  # the idle timer (75 s) is still pending
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    h.reactor.advance(5)  # backend timeout at 75 s: on time, not late
    assert head(client.value())[0] == b"HTTP/1.1 504 Gateway Timeout"


def test_idle_backend_connections_are_closed_by_a_sweep():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(OK)
    h.reactor.advance(h.connections.idleTimeout / 2)
    assert not server.disconnecting
    h.reactor.advance(h.connections.idleTimeout / 2)
    assert server.disconnecting


def test_a_body_that_stops_coming_times_out_after_the_backend_timeout(events):
    h = Harness(backendTimeout=5.0, clientTimeout=60.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
    h.reactor.advance(4)
    backend.dataReceived(b"more")  # progress: the backend's clock starts again
    h.reactor.advance(4)
    assert not getattr(client, "aborted", False)
    h.reactor.advance(1)
    assert client.aborted and server.aborted
    frontend.connectionLost(Failure(ConnectionDone()))  # what the aborted transport reports
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["error"] == "s0 sent nothing for 5s"
    assert h.servers[0].active == 0


def test_a_streamed_body_keeps_the_connection_while_bytes_flow():
    h = Harness(backendTimeout=5.0)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
    for _ in range(10):
        h.reactor.advance(3)
        backend.dataReceived(b"abc")
    assert not getattr(client, "aborted", False)
    assert client.value().endswith(b"abc" * 10)
    h.reactor.advance(100)  # then the keep-alive idle timeout, not a body timeout
    assert client.disconnecting and not getattr(client, "aborted", False)


class _TLSHandle:
    """What a TLS transport's C{getHandle()} answers about the client's certificate."""

    def __init__(self, cert) -> None:
        self.cert = cert

    def get_peer_certificate(self, as_cryptography: bool = False):
        return self.cert


class TLSTransport(Transport):
    def __init__(self, cert, **kw) -> None:
        super().__init__(**kw)
        self.handle = _TLSHandle(cert)

    def getHandle(self) -> _TLSHandle:
        return self.handle


@pytest.mark.parametrize("clientCerts", [True, False])
def test_each_request_carries_what_the_tls_handshake_proved(clientCerts):
    """
    Once the handshake is done the connection knows what its certificate
    proved; every request says so to the backend, and what the client
    wrote under those names is gone.
    """
    import trustme
    from cryptography import x509

    alice = x509.load_pem_x509_certificate(
        trustme.CA().issue_cert("alice@example.com", common_name="alice").cert_chain_pems[0].bytes())
    h = Harness(servers=1, clientCerts=clientCerts)
    forged = b"X-Client-Cert-Subject: CN=admin\r\nX-Client-Cert-Verified: SUCCESS\r\n"
    for cert, expected in ((alice, {b"x-client-cert-verified": [b"SUCCESS"]}),
                           (None, {b"x-client-cert-verified": [b"NONE"]})):
        frontend = h.factory.buildProtocol(IPv4Address("TCP", "10.1.2.3", 5555))
        frontend.makeConnection(TLSTransport(cert, peerAddress=IPv4Address("TCP", "10.1.2.3", 5555)))
        frontend.handshakeCompleted()
        for _ in range(2):
            frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n" + forged + b"\r\n")
            if h.connects() > len(h.backends):
                h.answer()
            backend, server = h.backends[-1]  # one server, its connection kept alive
            line, fields = head(server.value())
            assert line == b"GET / HTTP/1.1"
            server.clear()
            got = {n: v for n, v in fields.items() if n.startswith(b"x-client-cert-")}
            if not clientCerts:
                assert got == {}
            elif cert is None:
                assert got == expected
            else:
                [subject] = got.pop(b"x-client-cert-subject")
                assert subject.startswith(b"CN=alice,") and got == expected
            backend.dataReceived(OK)
