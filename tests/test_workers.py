"""
Worker processes, piece by piece: the control channel, the state a worker
takes from the master, adding up the workers' figures, the shared sockets.
(C{tests.test_integration_workers} runs the whole thing.)
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from tests.support import freePort
from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.rotation import RoundRobin
from txlb.config import parse
from txlb.control.channel import ChannelClosed, ControlChannel, RemoteError
from txlb.control.reload import serversOnly
from txlb.observe.aggregate import applyServerFigures, mergeDecisions, mergeExpositions, serverFigures
from txlb.observe.metrics import Metrics
from txlb.observe.stats import Window, latencyBucket
from txlb.service.worker import Worker, applyState
from txlb.service.workers import bindShared, poolState


def pair(handleA=lambda m: None, handleB=lambda m: None):
    """Two channel ends wired to each other, delivering a few bytes at a time."""
    a: ControlChannel
    b: ControlChannel

    def toB(data: bytes) -> None:
        for i in range(0, len(data), 7):
            b.dataReceived(data[i:i + 7])

    def toA(data: bytes) -> None:
        a.dataReceived(data)

    a = ControlChannel(toB, handleA)
    b = ControlChannel(toA, handleB)
    return a, b


def result(d):
    out: list = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


# The control channel.


def test_requests_are_answered_and_notices_are_not():
    seen = []

    def handle(message):
        seen.append(message)
        if message["op"] == "add":
            return message["a"] + message["b"]

    a, _ = pair(handleB=handle)
    assert result(a.request({"op": "add", "a": 2, "b": 3})) == 5
    a.notify({"op": "note", "text": "line\nbreak"})
    assert seen[-1] == {"op": "note", "text": "line\nbreak"}


def test_a_failed_request_fails_with_the_peers_message():
    def handle(message):
        raise ValueError("no such thing")

    a, _ = pair(handleB=handle)
    failure = result(a.request({"op": "x"}))
    assert failure.check(RemoteError) and failure.getErrorMessage() == "no such thing"


def test_requests_in_flight_fail_when_the_peer_goes():
    a = ControlChannel(lambda data: None, lambda m: None)
    d = a.request({"op": "x"})
    a.connectionLost()
    assert result(d).check(ChannelClosed)
    assert result(a.request({"op": "y"})).check(ChannelClosed)


def test_a_late_answer_is_dropped():
    sent = []
    a = ControlChannel(sent.append, lambda m: None)
    d = a.request({"op": "x"})
    d.cancel()  # what a timeout does
    assert result(d).check(CancelledError)
    a.dataReceived(b'{"reply": 1, "result": 3}\n')
    assert not a.closed


def test_garbage_closes_the_channel():
    closed = []
    a = ControlChannel(lambda data: None, lambda m: None, lambda: closed.append(True))
    d = a.request({"op": "x"})
    a.dataReceived(b"not json\n")
    assert closed == [True] and a.closed
    assert result(d).check(ChannelClosed)


# The state a worker takes from the master.


def pool(*servers: Server, passive=None) -> Pool:
    return Pool("p", "round_robin", RoundRobin(), servers, Clock(), passive=passive)


def test_a_worker_takes_the_masters_servers():
    master = pool(Server("a", "tcp:host=h:port=1"), Server("b", "tcp:host=h:port=2", 2), Server("c", "tcp:host=h:port=3"))
    master.setHealth(master.server("a"), ServerState.DOWN)
    master.drain(master.server("b"))
    master.setWeight(master.server("c"), 5)
    master.add(Server("d", "tcp:host=h:port=4"))
    worker = pool(Server("a", "tcp:host=h:port=1"), Server("b", "tcp:host=h:port=2", 2),
                  Server("c", "tcp:host=h:port=9"), Server("gone", "tcp:host=h:port=5"))
    applyState(worker, poolState(master))
    assert [(s.name, s.address, s.configuredWeight, s.state) for s in worker] == [
        (s.name, s.address, s.configuredWeight, s.state) for s in master
    ]
    assert [s.name for s in worker.eligible()] == ["c", "d"]
    # Undone as the master undoes it.
    master.enable(master.server("b"))
    master.setHealth(master.server("a"), ServerState.UP)
    applyState(worker, poolState(master))
    assert [s.name for s in worker.eligible()] == ["a", "b", "c", "d"]


def test_a_server_the_master_ejected_is_down_in_a_worker():
    master = pool(Server("a", "tcp:host=h:port=1"), passive=(1, 30.0))
    master.eject(master.server("a"), "seen by a worker")
    assert master.server("a").state is ServerState.EJECTED
    worker = pool(Server("a", "tcp:host=h:port=1"), passive=(1, 30.0))
    worker.server("a").active = 3
    applyState(worker, poolState(master))
    assert worker.eligible() == [] and worker.server("a").active == 3


def test_a_worker_hands_pool_events_to_the_master(events):
    class Service:
        pools: dict = {}
        logged: list = []

        def logObserver(self, event):
            self.logged.append(event)

    sent = []
    worker = Worker(Service(), Clock(), 1)
    worker.channel = ControlChannel(sent.append, lambda m: None)
    worker.observe({"event": "server_ejected", "pool": "p", "server": "a", "reason": "5xx"})
    worker.observe({"event": "server_drained", "pool": "p", "server": "a"})
    worker.observe({"event": "server_state", "pool": "p", "server": "a"})
    worker.observe({"event": "request", "log_line": {"event": "request"}})
    assert [m.split(b'"op":')[1][:10] for m in sent] == [b'"ejected",', b'"drained",']
    assert Service.logged == [{"event": "request", "worker": 1, "log_line": {"event": "request", "worker": 1}}]


# Adding up.


def test_windows_merge_exactly():
    a, b, both = Window(10), Window(10), Window(10)
    for window, seconds in ((a, (0.001, 0.002)), (b, (0.004,))):
        for s in seconds:
            window.add(100, latencyBucket(s), False)
            both.add(100, latencyBucket(s), False)
    b.add(101, None, True)
    both.add(101, None, True)
    merged = Window(10)
    merged.merge(a.slots())
    # As JSON carries them: histogram keys as strings.
    merged.merge([[s[0], s[1], s[2], {str(k): v for k, v in s[3].items()}] for s in b.slots()])
    assert merged.count(101, 10) == both.count(101, 10) == (4, 1)
    assert merged.percentiles(101, 10, (0.5, 0.99)) == both.percentiles(101, 10, (0.5, 0.99))


def test_expositions_add_up_but_server_states_are_the_masters():
    def metrics(up: bool, requests: int) -> bytes:
        p = pool(Server("a", "tcp:host=h:port=1"))
        if not up:
            p.setHealth(p.server("a"), ServerState.DOWN)
        m = Metrics({"p": p}, Clock())
        m.addService("web", "http", ("p",))
        for _ in range(requests):
            m.request("web", p, p.server("a"), 200, 0.002, 10, 20)
        m.healthCheck("p", "a", up)
        return m.exposition()

    master = metrics(False, 0)
    text = mergeExpositions(master, [metrics(True, 2).decode(), metrics(True, 3).decode()]).decode()
    assert 'txlb_requests_total{code="200",pool="p",server="a",service="web"} 5.0' in text
    assert 'txlb_request_duration_seconds_count{pool="p",service="web"} 5.0' in text
    assert 'txlb_bytes_total{direction="out",service="web"} 100.0' in text
    assert 'txlb_server_up{pool="p",server="a"} 0.0' in text
    assert 'txlb_health_checks_total{pool="p",result="failed",server="a"} 1.0' in text
    assert 'result="passed"' not in text
    from txlb import __version__
    assert f'txlb_build_info{{version="{__version__}"}} 1.0' in text  # once, not once per worker


def test_server_figures_add_up_and_finish_drains():
    workers = [pool(Server("a", "tcp:host=h:port=1"), Server("b", "tcp:host=h:port=2")) for _ in range(2)]
    for w, (active, total, rt) in zip(workers, ((1, 10, 0.01), (0, 30, 0.03))):
        a = w.server("a")
        a.active, a.total, a.responseTime = active, total, rt
    master = pool(Server("a", "tcp:host=h:port=1"), Server("b", "tcp:host=h:port=2"))
    replies = [serverFigures({"p": w}, 0.0) for w in workers]
    assert applyServerFigures({"p": master}, replies, 0.0) == []
    a = master.server("a")
    assert (a.active, a.total, round(a.responseTime, 4)) == (1, 40, 0.025)
    master.drain(a)
    assert a.state is ServerState.DRAINING
    workers[0].server("a").active = 0
    replies = [serverFigures({"p": w}, 0.0) for w in workers]
    assert applyServerFigures({"p": master}, replies, 0.0) == [(master, a)]


def test_decisions_merge_newest_first():
    assert mergeDecisions([[{"time": 3}, {"time": 1}], [{"time": 2}]], 2) == [{"time": 3}, {"time": 2}]


def test_a_reload_of_servers_only():
    base = '[pools.p]\nservers = [{ name = "a", address = "127.0.0.1:1" }]\n'
    old = parse(base)
    assert serversOnly(old, parse(base.replace(":1", ":2")))
    assert not serversOnly(old, parse(base))
    assert not serversOnly(old, parse(base + 'retries = 5\n'))


# Shared sockets.


def test_tcp_sockets_share_one_port_one_per_worker():
    reactor = MemoryReactorClock()
    shared = bindShared(reactor, "tcp:0:interface=127.0.0.1", 3)
    try:
        ports = {skt.getsockname()[1] for skt in shared.sockets}
        assert len(ports) == 1 and len({shared.socketFor(i)[0] for i in range(3)}) == 3
        # Bound, not listening: nothing connects before a worker accepts.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports.pop()), timeout=5)
        fd, family = shared.socketFor(1)
        assert family == socket.AF_INET
        assert socket.socket(fileno=os.dup(fd)).getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        shared.stopListening()


def test_a_port_in_use_cannot_be_shared():
    port = freePort()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        from twisted.internet.error import CannotListenError

        with pytest.raises(CannotListenError):
            bindShared(MemoryReactorClock(), f"tcp:{port}:interface=127.0.0.1", 2)


def test_a_unix_socket_is_shared_by_all(tmp_path):
    shared = bindShared(MemoryReactorClock(), f"unix:{tmp_path / 's.sock'}", 2)
    try:
        assert shared.socketFor(0) == shared.socketFor(1)
        assert shared.socketFor(0)[1] == socket.AF_UNIX
    finally:
        shared.stopListening()


def test_udp_sockets_share_one_port_and_keep_each_client_on_one():
    shared = bindShared(MemoryReactorClock(), "udp:0:interface=127.0.0.1", 2)
    clients = []
    try:
        ports = {skt.getsockname()[1] for skt in shared.sockets}
        assert len(ports) == 1 and shared.backlog == 0
        assert {skt.type for skt in shared.sockets} == {socket.SOCK_DGRAM}
        port = ports.pop()
        for i in range(16):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            clients.append(c)
            for n in range(3):
                c.sendto(b"%d" % n, ("127.0.0.1", port))
        where: dict[tuple, set] = {}
        for slot, skt in enumerate(shared.sockets):
            while True:
                try:
                    _, address = skt.recvfrom(100)
                except BlockingIOError:
                    break
                where.setdefault(address, set()).add(slot)
        assert len(where) == 16
        assert all(len(slots) == 1 for slots in where.values()), "the kernel hashes a client to one socket"
        assert set().union(*where.values()) == {0, 1}
    finally:
        shared.stopListening()
        for c in clients:
            c.close()
