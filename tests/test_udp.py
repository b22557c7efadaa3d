"""
Protocol tests for UDP services (L{txlb.udp}): a L{Clock} for time, fake
datagram sockets on both sides, so that flows, expiry, limits, events and
the pool's accounting are driven deterministically.  The real server
sockets (L{txlb.udp.ServerSocket}) are tested on loopback, read by hand.
"""

from __future__ import annotations

import json
import socket

import pytest
from twisted.internet.task import Clock

from txlb import udp
from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.hashing import IPHash
from txlb.balance.schedulers.least import LeastConnections
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.net.splice import SpliceLoop
from txlb.observe.aggregate import MergedMetrics, statsPart
from txlb.observe.metrics import Metrics
from txlb.udp import IDLE_CHECKS, ServerSocket, UDPBalancer, UDPListener, openServerSocket


class FakeServerSocket:
    """What a flow sends to its server, recorded."""

    def __init__(self, family: int, address: tuple, flow) -> None:
        self.family = family
        self.address = address
        self.flow = flow
        self.sent: list[bytes] = []
        self.closed = False
        self.error: Exception | None = None

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append(data)
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeHandle:
    """The listening socket: what goes back to clients, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, address: tuple) -> int:
        self.sent.append((data, address))
        return len(data)


class FakePort:
    def __init__(self) -> None:
        self.handle = FakeHandle()

    def getHandle(self) -> FakeHandle:
        return self.handle


class Harness:
    def __init__(self, servers: int = 2, scheduler=None, idle: float = 8.0, maxFlows: int = 100,
                 metrics: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(1000)  # a time of day, as the stats windows expect
        self.servers = [Server(f"s{i}", f"tcp:host=10.0.0.{i + 1}:port=53") for i in range(servers)]
        self.pool = Pool("p", "x", scheduler or RoundRobin(), self.servers, self.clock,
                         passive=(2, 10.0))
        self.sockets: list[FakeServerSocket] = []
        self.metrics = Metrics({"p": self.pool}, self.clock) if metrics else None
        self.balancer = UDPBalancer("dns", self.pool, self.clock, self.open, idleTimeout=idle,
                                    maxFlows=maxFlows, metrics=self.metrics)
        if self.metrics is not None:
            self.metrics.addService("dns", "udp", ("p",), self.balancer)
        self.listener = UDPListener()
        self.listener.switch(self.balancer)
        self.port = FakePort()
        self.listener.makeConnection(self.port)

    def open(self, family: int, address: tuple, flow) -> FakeServerSocket:
        sock = FakeServerSocket(family, address, flow)
        self.sockets.append(sock)
        return sock

    def send(self, data: bytes, client=("192.0.2.1", 4000)) -> None:
        self.listener.datagramReceived(data, client)

    def answer(self, sock: FakeServerSocket, data: bytes) -> None:
        sock.flow.fromServer(data)


def flowEvents(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") == "udp_flow"]


def test_a_flow_keeps_its_server_and_answers_come_back_from_the_listener():
    h = Harness()
    for i in range(3):
        h.send(b"q%d" % i)
    [sock] = h.sockets
    assert sock.address == ("10.0.0.1", 53)
    assert sock.family == socket.AF_INET
    assert sock.sent == [b"q0", b"q1", b"q2"]
    h.answer(sock, b"a0")
    assert h.port.handle.sent == [(b"a0", ("192.0.2.1", 4000))]


def test_each_client_address_and_port_is_a_flow_spread_by_the_scheduler():
    h = Harness()
    clients = [("192.0.2.1", 4000), ("192.0.2.1", 4001), ("192.0.2.2", 4000), ("192.0.2.3", 9)]
    for _ in range(3):
        for client in clients:
            h.send(b"x", client)
    assert len(h.sockets) == 4
    assert [s.address[0] for s in h.sockets] == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
    assert all(len(s.sent) == 3 for s in h.sockets)


def test_a_flow_is_one_active_connection_until_it_ends():
    h = Harness(scheduler=LeastConnections())
    h.send(b"x", ("192.0.2.1", 1))
    h.send(b"x", ("192.0.2.1", 2))
    h.send(b"x", ("192.0.2.1", 3))
    assert [s.active for s in h.servers] == [2, 1]
    assert [s.total for s in h.servers] == [2, 1]
    h.balancer.drain(0)
    assert [s.active for s in h.servers] == [0, 0]
    assert all(s.closed for s in h.sockets)


def test_ip_hash_keeps_a_client_ip_on_one_server_across_ports():
    h = Harness(servers=4, scheduler=IPHash())
    for port in range(20):
        h.send(b"x", ("198.51.100.7", 1000 + port))
    assert len({s.address for s in h.sockets}) == 1
    assert len(h.sockets) == 20


def test_idle_flows_end_after_the_idle_timeout_with_their_event(events):
    h = Harness(idle=8.0)
    h.send(b"abc")
    [sock] = h.sockets
    h.answer(sock, b"hello")
    h.answer(sock, b"x")
    h.clock.pump([0.5] * 10)
    h.send(b"de")  # activity at t=5: the flow lives on
    h.clock.pump([0.5] * 16)
    assert not sock.closed and not flowEvents(events)
    h.clock.pump([0.5] * (2 * (1 + 8 // IDLE_CHECKS)))
    assert sock.closed
    [event] = flowEvents(events)
    assert event["service"] == "dns"
    assert event["pool"] == "p"
    assert event["selectedServer"] == "s0"
    assert event["client"] == "192.0.2.1"
    assert event["clientPort"] == 4000
    assert (event["datagramsIn"], event["datagramsOut"]) == (2, 2)
    assert (event["bytesIn"], event["bytesOut"]) == (5, 6)
    assert event["ended"] == "idle"
    assert 13000 <= event["durationMs"] <= 15000
    assert h.servers[0].active == 0
    assert not h.listener.flows


def test_an_idle_flow_ends_within_one_check_past_the_timeout():
    h = Harness(idle=8.0)
    h.send(b"x")
    [sock] = h.sockets
    h.clock.pump([1.0] * 8)  # 8 s idle: not yet
    assert not sock.closed
    h.clock.pump([1.0] * 2)
    assert sock.closed


def test_one_timer_for_all_flows_and_none_when_there_are_none():
    h = Harness(idle=8.0)
    for port in range(50):
        h.send(b"x", ("192.0.2.1", port + 1))
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.pump([1.0] * 10)
    assert not h.balancer.open
    assert h.clock.getDelayedCalls() == []
    h.send(b"x")  # a new flow starts the check again
    assert len(h.clock.getDelayedCalls()) == 1


def test_a_new_flow_after_expiry_is_picked_again():
    h = Harness()
    h.send(b"x")
    h.clock.pump([1.0] * 10)
    h.send(b"x")
    assert [s.address[0] for s in h.sockets] == ["10.0.0.1", "10.0.0.2"]


def test_flows_beyond_max_flows_are_dropped_and_counted(events):
    h = Harness(maxFlows=3, metrics=True)
    for port in range(5):
        h.send(b"x", ("192.0.2.1", port + 1))
    assert len(h.sockets) == 3
    assert h.balancer.dropped["max_flows"] == 2
    # An existing flow still goes through.
    h.send(b"again", ("192.0.2.1", 1))
    assert h.sockets[0].sent == [b"x", b"again"]
    assert b'txlb_udp_dropped_total{reason="max_flows",service="dns"} 2.0' in h.metrics.exposition()
    h.clock.advance(1.0)
    [report] = [e for e in events if e.get("event") == "udp_dropped"]
    assert report["dropped"] == {"max_flows": 2}
    # Room again once flows end.
    h.clock.pump([1.0] * 10)
    h.send(b"x", ("192.0.2.1", 5))
    assert len(h.sockets) == 4


def test_no_server_drops_the_datagram():
    h = Harness()
    for s in h.servers:
        h.pool.setState(s, ServerState.DOWN)
    h.send(b"x")
    assert h.sockets == []
    assert h.balancer.dropped["no_server"] == 1
    assert not h.balancer.open


def test_a_server_that_goes_down_loses_its_flows_at_their_next_datagram(events):
    h = Harness()
    h.send(b"1", ("192.0.2.1", 1))
    h.send(b"2", ("192.0.2.1", 2))
    first, second = h.sockets
    h.pool.setState(h.servers[0], ServerState.DOWN)
    h.send(b"2b", ("192.0.2.1", 2))  # on s1: unaffected
    assert second.sent == [b"2", b"2b"]
    assert not first.closed
    h.send(b"1b", ("192.0.2.1", 1))
    assert first.closed
    assert h.sockets[2].address == ("10.0.0.2", 53)
    assert h.sockets[2].sent == [b"1b"]
    [event] = flowEvents(events)
    assert event["selectedServer"] == "s0"
    assert event["ended"] == "server_down"
    assert h.servers[0].active == 0
    assert h.servers[1].active == 2


def test_a_drained_server_keeps_its_flows_until_they_go_idle():
    h = Harness()
    h.send(b"1", ("192.0.2.1", 1))
    [sock] = h.sockets
    h.pool.drain(h.servers[0])
    assert h.servers[0].state is ServerState.DRAINING
    h.send(b"1b", ("192.0.2.1", 1))
    assert sock.sent == [b"1", b"1b"]
    h.send(b"new", ("192.0.2.1", 2))
    assert h.sockets[1].address == ("10.0.0.2", 53)
    h.clock.pump([1.0] * 10)
    assert h.servers[0].state is ServerState.DRAINED


def test_a_server_removed_from_the_pool_ends_its_flows(events):
    h = Harness()
    h.send(b"1")
    h.pool.remove(h.servers[0])
    assert h.sockets[0].closed
    assert flowEvents(events)[0]["ended"] == "server_removed"


def test_port_unreachable_counts_against_the_server_and_ejects_it():
    h = Harness()
    h.send(b"1", ("192.0.2.1", 1))
    [sock] = h.sockets
    sock.flow.refused("port unreachable")
    sock.error = ConnectionRefusedError()
    h.send(b"1b", ("192.0.2.1", 1))  # the second failure: passive=(2, ...) ejects s0
    assert h.servers[0].state is ServerState.EJECTED
    h.send(b"1c", ("192.0.2.1", 1))  # the flow moves to s1
    assert h.sockets[1].address == ("10.0.0.2", 53)
    assert h.sockets[1].sent == [b"1c"]


def test_an_answer_resets_failures_and_records_the_response_time():
    h = Harness()
    h.send(b"1")
    [sock] = h.sockets
    h.servers[0].consecutiveFailures = 1
    h.clock.advance(0.25)
    h.answer(sock, b"a")
    assert h.servers[0].consecutiveFailures == 0
    assert h.servers[0].responseTime == pytest.approx(0.25)


def test_a_full_socket_buffer_drops_the_datagram():
    h = Harness()
    h.send(b"1")
    [sock] = h.sockets
    sock.error = BlockingIOError()
    h.send(b"2")
    assert h.balancer.dropped["send"] == 1
    assert sock.flow.datagramsIn == 1


def test_a_socket_that_cannot_be_opened_releases_the_server(events):
    h = Harness()

    def refuse(family, address, flow):
        raise OSError(24, "Too many open files")

    h.balancer.openSocket = refuse
    h.send(b"1")
    assert h.balancer.dropped["socket"] == 1
    assert [s.active for s in h.servers] == [0, 0]
    [warning] = [e for e in events if e.get("event") == "udp_socket_failed"]
    assert warning["server"] == "s0"


def test_a_server_without_an_ip_address_cannot_take_flows():
    h = Harness()
    h.servers[0].address = "tcp:host=dns.example:port=53"
    h.send(b"1")
    assert h.balancer.dropped["socket"] == 1
    assert h.servers[0].active == 0


def test_ipv6_servers_get_ipv6_sockets():
    h = Harness()
    h.servers[0].address = "tcp:host=\\:\\:1:port=5353"
    h.send(b"1")
    assert h.sockets[0].family == socket.AF_INET6
    assert h.sockets[0].address == ("::1", 5353)


def test_metrics_count_datagrams_and_bytes_per_server_live_and_ended():
    h = Harness(metrics=True)
    h.send(b"abc", ("192.0.2.1", 1))
    h.send(b"de", ("192.0.2.1", 2))
    h.answer(h.sockets[0], b"12345")
    text = h.metrics.exposition()
    assert b'txlb_udp_datagrams_total{direction="in",pool="p",server="s0",service="dns"} 1.0' in text
    assert b'txlb_udp_bytes_total{direction="out",pool="p",server="s0",service="dns"} 5.0' in text
    assert b'txlb_udp_bytes_total{direction="in",pool="p",server="s1",service="dns"} 2.0' in text
    assert h.metrics.stats(history=False)["services"][0]["activeConnections"] == 2
    h.clock.pump([1.0] * 10)
    h.send(b"f", ("192.0.2.1", 1))
    text = h.metrics.exposition()  # s0: one ended flow and one live one
    assert b'txlb_udp_datagrams_total{direction="in",pool="p",server="s0",service="dns"} 2.0' in text
    assert b'txlb_udp_datagrams_total{direction="in",pool="p",server="s1",service="dns"} 1.0' in text
    stats = h.metrics.stats(history=False)["services"][0]
    assert stats["connectionsTotal"] == 3
    assert stats["protocol"] == "udp"
    assert h.servers[0].bytesIn == 4 and h.servers[0].bytesOut == 5


def test_switching_the_listener_to_another_service_ends_the_old_flows(events):
    h = Harness()
    h.send(b"1")
    other = UDPBalancer("other", h.pool, h.clock, h.open)
    h.listener.switch(other)
    assert h.sockets[0].closed
    assert flowEvents(events)[0]["ended"] == "service changed"
    h.send(b"2")
    assert other.open and not h.balancer.open


def test_stopping_the_listener_ends_its_flows():
    h = Harness()
    h.send(b"1")
    h.listener.doStop()
    assert h.sockets[0].closed
    assert h.servers[0].active == 0


def test_without_access_log_no_event_but_still_counted(events):
    h = Harness(metrics=True)
    h.balancer.accessLog = False
    h.send(b"1")
    h.balancer.drain(0)
    assert flowEvents(events) == []
    assert h.metrics.stats(history=False)["services"][0]["requests"] == 1


def test_a_reload_moves_new_flows_to_the_new_pool():
    h = Harness()
    h.send(b"1", ("192.0.2.1", 1))
    other = Pool("q", "x", RoundRobin(), [Server("t0", "tcp:host=10.9.9.9:port=53")], h.clock)
    h.balancer.setPool(other)
    h.send(b"2", ("192.0.2.1", 2))
    assert h.sockets[1].address == ("10.9.9.9", 53)
    h.balancer.drain(0)
    assert h.servers[0].active == 0 and other.server("t0").active == 0


# The real server sockets, on loopback.


class FakeReactor:
    """Records what a ServerSocket asks of the reactor when it has no loop."""

    def __init__(self) -> None:
        self.readers: set = set()

    def addReader(self, reader) -> None:
        self.readers.add(reader)

    def removeReader(self, reader) -> None:
        self.readers.discard(reader)


class RecordingFlow:
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.refusals: list[str] = []
        self.ends: list[str] = []
        self.error = None

    def fromServer(self, data: bytes) -> None:
        self.received.append(data)

    def refused(self, why: str) -> None:
        self.refusals.append(why)

    def end(self, why: str) -> None:
        self.ends.append(why)


@pytest.fixture
def echoServer():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s


@pytest.mark.parametrize("useLoop", [True, False], ids=["epoll-loop", "reactor-reader"])
def test_server_socket_sends_and_reads_on_loopback(echoServer, useLoop):
    if useLoop and not udp._epoll:
        pytest.skip("no epoll here")
    reactor = FakeReactor()
    flow = RecordingFlow()
    open_ = openServerSocket(reactor, loop=useLoop)
    sock = open_(socket.AF_INET, echoServer.getsockname(), flow)
    if useLoop:
        assert sock._loop is not None and reactor.readers == {sock._loop}
    else:
        assert reactor.readers == {sock}
    sock.send(b"ping")
    data, peer = echoServer.recvfrom(100)
    assert data == b"ping"
    for i in range(3):
        echoServer.sendto(b"pong%d" % i, peer)
    if useLoop:
        sock._loop.doRead()
    else:
        sock.doRead()
    assert flow.received == [b"pong0", b"pong1", b"pong2"]
    sock.close()
    assert sock.sock is None
    if not useLoop:
        assert reactor.readers == set()
    else:
        assert sock.fd not in sock._loop.sockets


def test_server_socket_reports_port_unreachable():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()
    # Nothing listens there now: loopback answers with ICMP port unreachable.
    reactor = FakeReactor()
    flow = RecordingFlow()
    sock = ServerSocket(reactor, None, socket.AF_INET, address, flow)
    sock.send(b"anyone?")
    sock.doRead()
    assert flow.refusals == ["port unreachable"]
    sock.close()


def test_server_socket_reads_a_bounded_batch_per_event(echoServer):
    reactor = FakeReactor()
    flow = RecordingFlow()
    sock = ServerSocket(reactor, None, socket.AF_INET, echoServer.getsockname(), flow)
    sock.send(b"hi")
    _, peer = echoServer.recvfrom(10)
    for i in range(udp.READ_BATCH + 5):
        echoServer.sendto(b"%d" % i, peer)
    sock.doRead()
    assert len(flow.received) == udp.READ_BATCH
    sock.doRead()
    assert len(flow.received) == udp.READ_BATCH + 5
    sock.close()


def test_a_loop_that_goes_away_ends_the_flow(echoServer):
    if not udp._epoll:
        pytest.skip("no epoll here")
    loop = SpliceLoop(FakeReactor())
    flow = RecordingFlow()
    sock = ServerSocket(FakeReactor(), loop, socket.AF_INET, echoServer.getsockname(), flow)
    loop.connectionLost(None)
    assert flow.ends == ["shutdown"]
    sock.close()


def test_stats_show_flows_datagrams_and_bytes_per_server():
    h = Harness(metrics=True)
    h.send(b"abc", ("192.0.2.1", 1))
    h.send(b"de", ("192.0.2.1", 2))
    h.send(b"fgh", ("192.0.2.1", 1))
    h.answer(h.sockets[0], b"12345")
    assert h.balancer.figures() == {("p", "s0"): [1, 2, 1, 6, 5], ("p", "s1"): [1, 1, 0, 2, 0]}
    [service] = h.metrics.stats(history=False)["services"]
    seen = service["udp"]
    totals = (seen["flows"], seen["datagramsIn"], seen["datagramsOut"], seen["bytesIn"], seen["bytesOut"])
    assert totals == (2, 3, 1, 8, 5)
    assert seen["servers"] == [
        {"pool": "p", "server": "s0", "flows": 1, "datagramsIn": 2, "datagramsOut": 1, "bytesIn": 6, "bytesOut": 5},
        {"pool": "p", "server": "s1", "flows": 1, "datagramsIn": 1, "datagramsOut": 0, "bytesIn": 2, "bytesOut": 0},
    ]
    assert seen["droppedTotal"] == 0 and set(seen["dropped"]) == set(udp.DROP_REASONS)
    # Ended flows keep their counts; only the live ones count as flows.
    h.clock.pump([1.0] * 10)
    h.send(b"i", ("192.0.2.1", 3))
    seen = h.metrics.stats(history=False)["services"][0]["udp"]
    assert (seen["flows"], seen["datagramsIn"], seen["bytesIn"]) == (1, 4, 9)
    assert [(s["server"], s["flows"]) for s in seen["servers"]] == [("s0", 1), ("s1", 0)]


def test_stats_of_tcp_and_http_services_have_no_udp_part():
    h = Harness(metrics=True)
    h.metrics.addService("web", "http", ("p",))
    services = {s["name"]: s for s in h.metrics.stats(history=False)["services"]}
    assert "udp" in services["dns"] and "udp" not in services["web"]


def test_a_master_adds_up_its_workers_udp_figures():
    """What each worker sends (L{statsPart}) is summed by server in the master's L{MergedMetrics}."""
    workers = [Harness(metrics=True), Harness(metrics=True, maxFlows=1)]
    workers[0].send(b"abc", ("192.0.2.1", 1))
    workers[0].answer(workers[0].sockets[0], b"1234")
    workers[1].send(b"de", ("192.0.2.1", 2))
    workers[1].send(b"f", ("192.0.2.1", 3))  # over max_flows: dropped
    parts = [json.loads(json.dumps(statsPart(w.metrics))) for w in workers]  # as the channel carries them
    master = Harness(metrics=True)
    merged = MergedMetrics(master.metrics, parts).stats(history=False)
    [service] = merged["services"]
    assert service["activeConnections"] == 2
    seen = service["udp"]
    totals = (seen["flows"], seen["datagramsIn"], seen["datagramsOut"], seen["bytesIn"], seen["bytesOut"])
    assert totals == (2, 2, 1, 5, 4)
    assert seen["servers"] == [
        {"pool": "p", "server": "s0", "flows": 2, "datagramsIn": 2, "datagramsOut": 1, "bytesIn": 5, "bytesOut": 4},
    ]
    assert seen["dropped"]["max_flows"] == 1 and seen["droppedTotal"] == 1
