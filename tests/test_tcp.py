"""
Protocol tests for the TCP balancer, on a memory reactor: no sockets, no
waiting.  Connects are answered by hand, so every path (success, refusal,
timeout, client leaving early) is driven deterministically.
"""

from __future__ import annotations

import gc
import select
import socket
import time
import weakref

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from txlb.balance.pool import Pool, Server
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.net import splice
from txlb.net.endpoints import EndpointCache
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


def test_idle_connections_are_closed_by_the_periodic_check():
    """
    One check per eighth of the idle timeout closes the connections idle
    for the whole timeout, and only those.
    """
    h = Harness(idle=60.0)
    idle, idleClient = h.accept()
    _, idleServer = h.answer()
    timers = len(h.reactor.getDelayedCalls())
    busy, busyClient = h.accept()
    h.answer()
    assert len(h.reactor.getDelayedCalls()) == timers  # no timer per connection
    idle._lastActivity -= 59.0  # monotonic time moved on with no bytes
    h.reactor.advance(7.5)
    assert not idleClient.disconnected
    idle._lastActivity -= 1.0
    h.reactor.advance(7.5)
    assert idleClient.disconnected and idleServer.disconnected
    assert idle.error == "idle timeout"
    assert not busyClient.disconnected


def test_the_idle_check_stops_with_the_last_connection():
    h = Harness(idle=60.0)
    frontend, client = h.accept()
    backend, server = h.answer()
    h.reactor.advance(60)  # bytes flowed just now: nothing to close
    assert not client.disconnected
    assert len(h.reactor.getDelayedCalls()) == 1  # the idle check (the connect timeout is over)
    backend.connectionLost(Failure(ConnectionDone()))
    frontend.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(7.5)
    assert h.reactor.getDelayedCalls() == []


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


def test_a_client_in_the_queue_is_bounded_by_queue_timeout_not_the_idle_check():
    h = Harness(servers=1, idle=60.0)
    h.pool.maxConnections = 1
    h.pool.queueTimeout = 30.0
    h.accept()
    h.answer()
    waiting, client = h.accept()
    h.reactor.advance(7.5)  # the first idle check: no bytes yet, but none expected
    assert not client.disconnecting
    h.reactor.advance(22.5)
    assert client.disconnecting
    assert "max_connections" in waiting.error


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


def test_with_client_certificates_no_server_is_picked_before_the_handshake(events):
    """
    A TLS service that asks for client certificates connects the backend
    only once the handshake (the certificate) passed; the bytes that came
    with the handshake's end go first.  A refused handshake never reaches
    a server, and its connection event says why.
    """
    h = Harness()
    h.factory.clientCerts = True
    frontend, client = h.accept()
    assert h.reactor.tcpClients == [] and client.producerState == "producing"
    frontend.dataReceived(b"early ")
    frontend.handshakeCompleted()
    assert h.pending()[0] == "127.0.0.1"
    frontend.dataReceived(b"bytes ")
    backend, server = h.answer()
    frontend.dataReceived(b"later")
    assert server.value() == b"early bytes later" and frontend.bytesIn == len(b"early bytes later")
    refused, _ = h.accept("10.9.9.9")
    refused.refused = "client_cert"  # what txlb.net.tls sets when it ends the handshake
    refused.connectionLost(Failure(ConnectionDone()))
    assert len(h.reactor.tcpClients) == 1
    [event] = [e for e in events if e.get("event") == "connection" and e["client"] == "10.9.9.9"]
    assert (event["refused"], event["selectedServer"]) == ("client_cert", None)


# The direct road: a plaintext service with splice, real loopback sockets, a
# memory reactor that only records what is watched, and a small loop that
# calls doRead/doWrite as the reactor would (every wait bounded).


class Direct:
    """
    A balancer whose servers are real loopback listeners (or any address
    given), fed with real client connections wrapped in Twisted's own TCP
    transport, so that the direct road (L{txlb.net.connect}, L{txlb.net.splice}) is
    the one taken.
    """

    def __init__(self, addresses: list, retries: int = 2, idle: float = 0.0) -> None:
        self.reactor = MemoryReactorClock()
        self.servers = [Server(f"s{i}", f"tcp:host={host}:port={port}") for i, (host, port) in enumerate(addresses)]
        self.pool = Pool("p", "round_robin", RoundRobin(), self.servers, self.reactor,
                         retries=retries, connectTimeout=2.0)
        self.factory = TCPBalancerFactory("svc", self.pool, EndpointCache(self.reactor), self.reactor,
                                          idleTimeout=idle)
        self.front = socket.socket()
        self.front.bind(("127.0.0.1", 0))
        self.front.listen()

    def accept(self):
        client = socket.create_connection(self.front.getsockname(), timeout=5)
        sock, addr = self.front.accept()
        frontend = self.factory.buildProtocol(IPv4Address("TCP", *addr))
        transport = tcp.Server(sock, frontend, addr, None, 1, self.reactor)
        frontend.makeConnection(transport)
        return frontend, client

    def turn(self, timeout: float = 0.5) -> None:
        """One pass of the reactor: whatever is ready is read or written."""
        readers, writers = list(self.reactor.readers), list(self.reactor.writers)
        if not readers and not writers:
            return
        readable, writable, _ = select.select(readers, writers, [], timeout)
        for r in readable:
            if r in self.reactor.readers:
                r.doRead()
        for w in writable:
            if w in self.reactor.writers:
                w.doWrite()

    def until(self, condition, what: str, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.turn()
        return condition()

    def close(self) -> None:
        self.front.close()


@pytest.fixture
def listeners():
    made = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        made.append(s)
    yield made
    for s in made:
        s.close()


def served(listener: socket.socket) -> socket.socket:
    listener.settimeout(5)
    conn, _ = listener.accept()
    conn.settimeout(5)
    return conn


def atEOF(sock: socket.socket) -> bool:
    """The peer's EOF is here (checked without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""


def recvExactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


@pytest.mark.skipif(not splice.available, reason="no os.splice on this platform")
class TestDirect:
    def test_connects_and_splices_without_twisteds_connector(self, listeners, events):
        d = Direct([s.getsockname() for s in listeners])
        frontend, client = d.accept()
        assert d.reactor.tcpClients == []  # no connector, no Deferred
        d.until(lambda: frontend.spliced, "the connect")
        server = served(listeners[0])
        client.sendall(b"hello")
        d.until(lambda: frontend.bytesIn == 5, "the request")
        assert recvExactly(server, 5) == b"hello"
        server.sendall(b"world!")
        d.until(lambda: frontend.bytesOut == 6, "the answer")
        assert recvExactly(client, 6) == b"world!"
        assert d.servers[0].active == 1
        server.close()
        d.until(lambda: atEOF(client), "the server's EOF at the client")
        client.close()
        d.until(lambda: frontend.closed, "both sides to close")
        assert d.servers[0].active == 0
        assert (d.servers[0].bytesIn, d.servers[0].bytesOut) == (5, 6)
        assert d.factory.open.open == set()
        [event] = [e for e in events if e.get("event") == "connection"]
        assert (event["selectedServer"], event["splice"], event["bytesIn"], event["bytesOut"]) == ("s0", True, 5, 6)
        loop = splice.loopFor(d.reactor)
        assert d.reactor.readers == {loop} and not d.reactor.writers  # the splice loop, empty
        assert loop.sockets == {}
        d.close()

    def test_a_refused_connect_tries_another_server(self, listeners, events):
        with socket.socket() as dead:
            dead.bind(("127.0.0.1", 0))  # bound, not listening: refused
            d = Direct([dead.getsockname(), listeners[1].getsockname()])
            frontend, client = d.accept()
            d.until(lambda: frontend.spliced, "the second server")
        served(listeners[1]).close()
        assert frontend.server is d.servers[1]
        assert d.servers[0].failures == 1 and d.servers[0].active == 0
        [failed] = [e for e in events if e.get("event") == "connect_failed"]
        assert (failed["server"], failed["why"]) == ("s0", "Connection refused")
        client.close()
        d.close()

    def test_a_connect_that_hangs_times_out_and_the_next_server_is_tried(self, listeners, fullListener, events):
        d = Direct([fullListener.getsockname(), listeners[1].getsockname()])
        frontend, client = d.accept()
        assert not frontend.spliced
        assert frontend.transport not in d.reactor.readers  # nothing is read from the client meanwhile
        d.reactor.advance(1.9)
        assert d.servers[0].failures == 0
        d.reactor.advance(0.1)
        assert d.servers[0].failures == 1 and d.servers[0].active == 0
        [failed] = [e for e in events if e.get("event") == "connect_failed"]
        assert failed["why"] == "timed out after 2s"
        d.until(lambda: frontend.spliced, "the second server")
        assert frontend.server is d.servers[1]
        client.close()
        d.close()

    def test_a_slow_connect_is_spliced_once_it_completes(self, listeners, fullListener):
        d = Direct([fullListener.getsockname()])
        frontend, client = d.accept()
        assert frontend._connecting is not None and not frontend.spliced
        fullListener.accept()[0].close()  # room in the queue: the handshake is retried
        d.until(lambda: frontend.spliced, "the slow connect", timeout=10.0)
        server = served(fullListener)
        loop = splice.loopFor(d.reactor)
        assert loop.sockets[frontend.splice.server.fd] is frontend.splice.server
        assert len(d.factory.connecting) == 0 and d.servers[0].failures == 0
        client.sendall(b"late but here")
        d.until(lambda: frontend.bytesIn == 13, "the request")
        assert recvExactly(server, 13) == b"late but here"
        server.close()
        client.close()
        d.until(lambda: frontend.closed, "both sides to close")
        d.close()

    def test_a_client_leaving_while_connecting_releases_the_server(self, listeners, fullListener, events):
        d = Direct([fullListener.getsockname(), listeners[1].getsockname()])
        frontend, client = d.accept()
        pending = frontend._connecting
        frontend.connectionLost(Failure(ConnectionDone()))
        assert pending.sock.fileno() == -1
        assert [s.active for s in d.servers] == [0, 0]
        assert d.servers[0].failures == 0
        assert len(d.factory.connecting) == 0
        assert not [e for e in events if e.get("event") == "connect_failed"]
        d.reactor.advance(5)
        assert d.servers[1].total == 0  # no retry for a client that left
        client.close()
        d.close()

    def test_idle_spliced_connections_are_reset(self, listeners, events):
        d = Direct([s.getsockname() for s in listeners], idle=8.0)
        frontend, client = d.accept()
        d.until(lambda: frontend.spliced, "the connect")
        server = served(listeners[0])
        frontend._lastActivity -= 8.0
        d.reactor.advance(1.0)
        assert frontend.closed and frontend.error == "idle timeout"
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        assert d.servers[0].active == 0
        server.close()
        client.close()
        d.close()

    def test_an_ended_connection_is_freed_without_the_cyclic_collector(self, listeners):
        """
        Nothing of a finished connection points back at itself, so its
        objects go as soon as the last reference does: no garbage piles up
        for the collector between connections.
        """
        d = Direct([s.getsockname() for s in listeners])
        gc.disable()
        try:
            frontend, client = d.accept()
            d.until(lambda: frontend.spliced, "the connect")
            server = served(listeners[0])
            pair = frontend.splice
            refs = [weakref.ref(o) for o in (frontend, frontend.transport, pair, pair.client, pair.server)]
            del pair
            server.sendall(b"bye")
            server.close()
            d.until(lambda: frontend.bytesOut == 3, "the answer")
            assert recvExactly(client, 3) == b"bye"
            client.close()
            d.until(lambda: frontend.closed, "both sides to close")
            frontend = None
            assert [r() for r in refs] == [None] * 5
        finally:
            gc.enable()
            d.close()
