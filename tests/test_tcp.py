"""
Protocol tests for the TCP balancer, on a memory reactor: no sockets, no
waiting.  Connects are answered by hand, so every path (success, refusal,
timeout, client leaving early) is driven deterministically.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from txlb.endpoints import EndpointCache
from txlb.pool import Pool, Server
from txlb.schedulers.rotation import RoundRobin
from txlb.tcp import TCPBalancerFactory


class Transport(StringTransport):
    """A StringTransport that also records half-closes."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


class Harness:
    def __init__(self, servers: int = 3, retries: int = 2, idle: float = 0.0) -> None:
        self.reactor = MemoryReactorClock()
        self.servers = [Server(f"s{i}", f"tcp:host=127.0.0.{i + 1}:port=900{i}") for i in range(servers)]
        self.pool = Pool("p", "round_robin", RoundRobin(), self.servers, self.reactor,
                         retries=retries, connectTimeout=2.0)
        self.factory = TCPBalancerFactory("svc", self.pool, EndpointCache(self.reactor), self.reactor,
                                          idleTimeout=idle)

    def accept(self, client: str = "10.1.2.3"):
        frontend = self.factory.buildProtocol(IPv4Address("TCP", client, 5555))
        transport = Transport(peerAddress=IPv4Address("TCP", client, 5555))
        frontend.makeConnection(transport)
        return frontend, transport

    def pending(self):
        """The most recent connect attempt: (host, port, factory)."""
        host, port, factory, timeout, bind = self.reactor.tcpClients[-1]
        return host, factory

    def answer(self):
        host, factory = self.pending()
        backend = factory.buildProtocol(IPv4Address("TCP", host, 9000))
        transport = Transport()
        backend.makeConnection(transport)
        return backend, transport

    def refuse(self):
        _, factory = self.pending()
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))


def test_pauses_client_until_backend_connects():
    h = Harness()
    frontend, client = h.accept()
    assert client.producerState == "paused"
    assert h.pending()[0] == "127.0.0.1"
    backend, server = h.answer()
    assert client.producerState == "producing"


def test_bytes_flow_both_ways_and_are_counted():
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    frontend.dataReceived(b"hello")
    assert server.value() == b"hello"
    backend.dataReceived(b"world!")
    assert client.value() == b"world!"
    assert (frontend.bytesIn, frontend.bytesOut) == (5, 6)
    assert (h.servers[0].bytesIn, h.servers[0].bytesOut) == (5, 6)


def test_each_side_is_the_other_sides_producer():
    """
    Backpressure: a transport whose buffer fills pauses its producer, and
    the producer of each side is the other side's transport.
    """
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    assert server.producer is client and server.streaming
    assert client.producer is server and client.streaming
    # The backend socket's buffer is full: it pauses reading from the client.
    server.producer.pauseProducing()
    assert client.producerState == "paused"
    server.producer.resumeProducing()
    assert client.producerState == "producing"
    # And the other way: a slow client pauses reading from the backend.
    client.producer.pauseProducing()
    assert server.producerState == "paused"


def test_round_robin_across_connections():
    h = Harness()
    hosts = []
    for _ in range(6):
        h.accept()
        hosts.append(h.pending()[0])
        h.answer()
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"] * 2
    assert [s.active for s in h.servers] == [2, 2, 2]


def test_connect_failure_retries_a_different_server(events):
    h = Harness()
    frontend, client = h.accept()
    h.refuse()
    assert h.pending()[0] == "127.0.0.2"
    backend, server = h.answer()
    assert client.producerState == "producing"
    assert [s.active for s in h.servers] == [0, 1, 0]
    assert h.servers[0].failures == 1
    assert [e["server"] for e in events if e.get("event") == "connect_failed"] == ["s0"]


def test_every_server_failing_closes_the_client(events):
    h = Harness(retries=2)
    frontend, client = h.accept()
    for _ in range(3):
        h.refuse()
    assert len(h.reactor.tcpClients) == 3
    assert client.disconnecting
    assert [s.active for s in h.servers] == [0, 0, 0]
    frontend.connectionLost(Failure(ConnectionDone()))
    [event] = [e for e in events if e.get("event") == "connection"]
    assert event["error"] == "connect failed to s0, s1, s2"
    assert event["selectedServer"] is None


def test_retries_are_bounded():
    h = Harness(servers=5, retries=1)
    frontend, client = h.accept()
    h.refuse()
    h.refuse()
    assert len(h.reactor.tcpClients) == 2
    assert client.disconnecting


def test_connect_timeout_counts_as_a_failure():
    h = Harness()
    frontend, client = h.accept()
    h.reactor.advance(2.0)
    assert h.servers[0].failures == 1
    assert h.pending()[0] == "127.0.0.2"
    assert [s.active for s in h.servers] == [0, 1, 0]


def test_client_leaving_while_connecting_cancels_and_releases():
    h = Harness()
    frontend, client = h.accept()
    frontend.connectionLost(Failure(ConnectionDone()))
    assert h.reactor.connectors[-1].stoppedConnecting
    assert [s.active for s in h.servers] == [0, 0, 0]
    assert len(h.reactor.tcpClients) == 1  # no retry for a client that left
    assert h.servers[0].failures == 0


def test_no_eligible_server_closes_at_once(events):
    h = Harness(servers=0)
    frontend, client = h.accept()
    assert client.disconnecting
    frontend.connectionLost(Failure(ConnectionDone()))
    [event] = [e for e in events if e.get("event") == "connection"]
    assert event["error"] == "no server of pool p available"


def test_client_half_close_is_passed_on():
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    frontend.dataReceived(b"request")
    frontend.readConnectionLost()
    assert server.writeClosed and not server.disconnecting
    assert server.producer is None  # the client will produce no more
    # The backend still answers over the open direction.
    backend.dataReceived(b"answer")
    assert client.value() == b"answer"
    assert not client.disconnecting
    backend.readConnectionLost()
    assert client.disconnecting and server.disconnecting


def test_server_half_close_is_passed_on():
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    backend.dataReceived(b"greeting")
    backend.readConnectionLost()
    assert client.writeClosed and not client.disconnecting
    frontend.dataReceived(b"more")
    assert server.value() == b"more"
    frontend.readConnectionLost()
    assert client.disconnecting and server.disconnecting


def test_backend_closing_closes_client_and_logs_once(events):
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    frontend.dataReceived(b"abc")
    backend.dataReceived(b"defg")
    h.reactor.advance(0.25)
    backend.connectionLost(Failure(ConnectionDone()))
    assert client.disconnecting
    assert h.servers[0].active == 0
    frontend.connectionLost(Failure(ConnectionDone()))
    [event] = [e for e in events if e.get("event") == "connection"]
    assert event["selectedServer"] == "s0"
    assert (event["bytesIn"], event["bytesOut"]) == (3, 4)
    assert event["durationMs"] == 250.0
    assert event["client"] == "10.1.2.3"


def test_client_closing_closes_backend():
    h = Harness()
    frontend, client = h.accept()
    backend, server = h.answer()
    frontend.connectionLost(Failure(ConnectionDone()))
    assert server.disconnecting
    backend.connectionLost(Failure(ConnectionDone()))
    assert h.servers[0].active == 0


def test_time_to_first_byte_is_the_response_time():
    h = Harness()
    frontend, client = h.accept()
    h.reactor.advance(0.1)
    backend, server = h.answer()
    h.reactor.advance(0.2)
    backend.dataReceived(b"x")
    h.reactor.advance(5)
    backend.dataReceived(b"y")
    assert h.servers[0].responseTime == pytest.approx(0.3)


def test_idle_connections_are_closed():
    h = Harness(idle=60.0)
    frontend, client = h.accept()
    backend, server = h.answer()
    h.reactor.advance(30)
    assert not client.disconnected
    frontend._lastActivity -= 60  # monotonic time moved on with no bytes
    h.reactor.advance(30)
    assert client.disconnected and server.disconnected
    assert frontend.error == "idle timeout"


def test_activity_postpones_the_idle_timeout():
    h = Harness(idle=60.0)
    frontend, client = h.accept()
    backend, server = h.answer()
    h.reactor.advance(60)  # bytes flowed just now: the check re-arms
    assert not client.disconnected
    assert h.reactor.getDelayedCalls()


def test_drain_waits_for_open_connections_then_aborts_the_rest():
    h = Harness()
    first, firstClient = h.accept()
    firstBackend, _ = h.answer()
    second, secondClient = h.accept()
    backend, server = h.answer()
    done = []
    h.factory.drain(30.0).addCallback(done.append)
    first.connectionLost(Failure(ConnectionDone()))
    firstBackend.connectionLost(Failure(ConnectionDone()))
    assert h.factory.open.open == {second}
    h.reactor.advance(10)
    assert done == [] and not secondClient.disconnected
    h.reactor.advance(20)
    assert secondClient.disconnected and server.disconnected
    assert second.error == "shutdown timeout"
    backend.connectionLost(Failure(ConnectionDone()))
    second.connectionLost(Failure(ConnectionDone()))
    assert done == [None]


def test_drain_with_nothing_open_is_immediate():
    h = Harness()
    done = []
    h.factory.drain(30.0).addCallback(done.append)
    assert done == [None]


def test_over_max_connections_waits_for_a_free_server():
    h = Harness(servers=2)
    h.pool.maxConnections = 1
    first, _ = h.accept()
    firstBackend, _ = h.answer()
    second, _ = h.accept()
    h.answer()
    third, thirdClient = h.accept()
    assert len(h.reactor.tcpClients) == 2  # queued, not connecting
    firstBackend.connectionLost(Failure(ConnectionDone()))  # s0 frees up
    assert len(h.reactor.tcpClients) == 3
    assert h.reactor.tcpClients[-1][0] == "127.0.0.1"


def test_queue_timeout_closes_the_client(events):
    h = Harness(servers=1)
    h.pool.maxConnections = 1
    h.pool.queueTimeout = 5.0
    h.accept()
    h.answer()
    waiting, client = h.accept()
    h.reactor.advance(5)
    assert client.disconnecting
    waiting.connectionLost(Failure(ConnectionDone()))
    [event] = [e for e in events if e.get("event") == "connection" and e.get("error")]
    assert "max_connections" in event["error"]


def test_client_leaving_the_queue_is_forgotten():
    h = Harness(servers=1)
    h.pool.maxConnections = 1
    h.accept()
    backend, _ = h.answer()
    waiting, client = h.accept()
    waiting.connectionLost(Failure(ConnectionDone()))
    backend.connectionLost(Failure(ConnectionDone()))
    assert len(h.reactor.tcpClients) == 1
    assert h.servers[0].active == 0
