"""
Connecting a backend socket directly, and one timer for many connect
timeouts: real loopback sockets with bounded waits, time on a C{Clock}.
"""

from __future__ import annotations

import errno
import select
import socket

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from txlb.net.connect import Deadlines, PendingConnect, connectSocket
from txlb.net.endpoints import EndpointCache
from txlb.net.splice import SpliceLoop, available, loopFor

needsLoop = pytest.mark.skipif(not available, reason="no epoll or splice on this platform")


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


@pytest.fixture
def closedPort():
    """A port bound but not listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()


def pendingTo(listener: socket.socket):
    """A connect to C{listener} (whose queue is full) watched by a loop, reporting into C{outcome}."""
    loop = loopFor(MemoryReactorClock())
    sock, err = connectSocket(socket.AF_INET, listener.getsockname())
    assert err == errno.EINPROGRESS
    outcome: list = []
    pending = PendingConnect(loop, sock, outcome.append, outcome.append)
    pending.start()
    return loop, sock, pending, outcome


def finish(loop: SpliceLoop, pending: PendingConnect, timeout: float = 5.0) -> None:
    """Wait (bounded) for the loop to report the pending socket, as the reactor would."""
    assert loop.sockets[pending.fd] is pending
    readable, _, _ = select.select([loop], [], [], timeout)
    assert readable, "the connect did not finish in time"
    loop.doRead()


def test_a_loopback_connect_is_usually_over_at_once(listener):
    sock, err = connectSocket(socket.AF_INET, listener.getsockname())
    try:
        assert sock is not None and err in (0, errno.EINPROGRESS)
        assert sock.getblocking() is False
        if not err:
            assert sock.getpeername() == listener.getsockname()
    finally:
        sock.close()


@needsLoop
def test_a_pending_connect_reports_connected(fullListener):
    loop, sock, pending, outcome = pendingTo(fullListener)
    conn, _ = fullListener.accept()  # room in the queue: the handshake is retried and completes
    try:
        finish(loop, pending, timeout=10.0)
        assert outcome == [sock]
        assert loop.sockets == {}  # nobody took the socket over: it left the set
    finally:
        conn.close()
        sock.close()


@needsLoop
def test_the_connected_socket_keeps_its_place_in_the_loop(fullListener):
    """
    The handler that takes the socket over (its splice pair) inherits its
    registration: one change of interest, not a removal and an addition.
    """
    loop = loopFor(MemoryReactorClock())
    sock, err = connectSocket(socket.AF_INET, fullListener.getsockname())
    assert err == errno.EINPROGRESS

    class Next:
        mask = 0
        fd = sock.fileno()

    successor = Next()
    pending = PendingConnect(loop, sock, lambda s: loop.watch(successor, select.EPOLLIN), lambda why: None)
    pending.start()
    conn, _ = fullListener.accept()
    try:
        finish(loop, pending, timeout=10.0)
        assert loop.sockets == {sock.fileno(): successor} and successor.mask == select.EPOLLIN
        assert pending.mask == 0
    finally:
        conn.close()
        sock.close()


@needsLoop
def test_refused_is_reported(closedPort):
    loop = loopFor(MemoryReactorClock())
    sock, err = connectSocket(socket.AF_INET, closedPort)
    if sock is None:
        assert err == errno.ECONNREFUSED
        return
    outcome = []
    pending = PendingConnect(loop, sock, lambda s: outcome.append("connected"), outcome.append)
    pending.start()
    finish(loop, pending)
    assert outcome == ["Connection refused"]
    assert sock.fileno() == -1  # closed


@needsLoop
def test_cancel_closes_and_reports_once(fullListener):
    loop, sock, pending, outcome = pendingTo(fullListener)
    pending.cancel("timed out after 2s")
    pending.cancel("again")
    pending.ready(select.EPOLLOUT)
    assert outcome == ["timed out after 2s"]
    assert sock.fileno() == -1
    assert loop.sockets == {}


class TestDeadlines:
    def test_expires_after_its_time_not_before(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []
        deadlines.add("a", 2.0, lambda: expired.append("a"))
        clock.advance(1.999)
        assert expired == []
        clock.advance(0.001)
        assert expired == ["a"]
        assert len(deadlines) == 0

    def test_discarded_waits_never_expire(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []
        deadlines.add("a", 2.0, lambda: expired.append("a"))
        deadlines.add("b", 2.0, lambda: expired.append("b"))
        deadlines.discard("a")
        clock.advance(5)
        assert expired == ["b"]
        assert clock.getDelayedCalls() == []

    def test_one_timer_for_many_waits(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []
        for i in range(100):
            deadlines.add(i, 2.0, lambda i=i: expired.append(i))
            clock.advance(0.01)
            if i % 2:
                deadlines.discard(i)
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(2.0)
        assert expired == list(range(0, 100, 2))

    def test_a_shorter_wait_after_longer_ones_expires_on_time(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []
        deadlines.add("long", 10.0, lambda: expired.append("long"))
        deadlines.add("short", 1.0, lambda: expired.append("short"))
        clock.advance(1.0)
        assert expired == ["short"]
        clock.advance(9.0)
        assert expired == ["short", "long"]

    def test_adding_again_restarts_the_time(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []
        deadlines.add("a", 2.0, lambda: expired.append("first"))
        clock.advance(1.5)
        deadlines.add("a", 2.0, lambda: expired.append("second"))
        clock.advance(1.0)
        assert expired == []
        clock.advance(1.0)
        assert expired == ["second"]

    def test_an_expiry_may_start_another_wait(self):
        clock = Clock()
        deadlines = Deadlines(clock)
        expired = []

        def retry():
            expired.append("first")
            deadlines.add("a", 2.0, lambda: expired.append("retry"))

        deadlines.add("a", 2.0, retry)
        clock.advance(2.0)
        assert expired == ["first"]
        clock.advance(2.0)
        assert expired == ["first", "retry"]


def test_only_literal_ip_tcp_addresses_are_connected_directly():
    """
    L{EndpointCache.plainTCP}: what L{connectSocket} may be given; anything
    needing a resolver, TLS or another transport goes through Twisted.
    """
    cache = EndpointCache(MemoryReactorClock())
    assert cache.plainTCP("tcp:host=127.0.0.1:port=9001") == (socket.AF_INET, ("127.0.0.1", 9001), 30)
    assert cache.plainTCP("tcp:host=127.0.0.1:port=9001:timeout=1")[2] == 1
    assert cache.plainTCP(r"tcp:host=\:\:1:port=9001") == (socket.AF_INET6, ("::1", 9001, 0, 0), 30)
    assert cache.plainTCP("tcp:host=localhost:port=9001") is None
    assert cache.plainTCP(r"tcp:host=127.0.0.1:port=9001:bindAddress=127.0.0.1\:0") is None
    assert cache.plainTCP("unix:/run/app.sock") is None
    assert cache.plainTCP("tcp:host=127.0.0.1:port=9001", tls=object()) is None
