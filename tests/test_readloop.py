"""
L{txlb.net.readloop}: an adopted transport is read through txlb's epoll set,
and pausing, resuming, half-close and closing behave as Twisted's; what
L{txlb.net.wire.sendNow} is given during the loop's turn leaves at its end.
"""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet import epollreactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from txlb.net.readloop import adopt
from txlb.net.splice import loopFor
from txlb.net.wire import buffered, release, sendNow


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = None

    def connectionMade(self) -> None:
        self.adopted = adopt(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    eof = False

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class _Factory:
    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


@pytest.fixture
def reactor():
    r = epollreactor.EPollReactor()
    yield r
    r.disconnectAll()


def _turn(reactor, until, seconds: float = 5.0) -> None:
    """Run the reactor's iterations until C{until()} holds (bounded)."""
    deadline = time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, "condition not reached"
        reactor.iterate(0.05)


def _connected(reactor, protocol):
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    peer.settimeout(5)
    reactor.adoptStreamConnection(accepted.fileno(), socket.AF_INET, _Factory(protocol))
    accepted.close()  # Twisted holds its own duplicate
    return peer


def test_reads_through_the_loop_not_the_reactor(reactor) -> None:
    protocol = Recorder()
    peer = _connected(reactor, protocol)
    assert protocol.adopted
    transport = protocol.transport
    assert transport not in reactor.getReaders()
    assert loopFor(reactor).sockets[transport.fileno()] is transport
    peer.sendall(b"hello")
    _turn(reactor, lambda: protocol.data == b"hello")
    peer.close()


def test_pause_and_resume(reactor) -> None:
    protocol = Recorder()
    peer = _connected(reactor, protocol)
    protocol.transport.pauseProducing()
    peer.sendall(b"waiting")
    for _ in range(5):
        reactor.iterate(0.02)
    assert protocol.data == b""
    protocol.transport.resumeProducing()
    _turn(reactor, lambda: protocol.data == b"waiting")
    peer.close()


def test_eof_closes_and_leaves_the_set(reactor) -> None:
    protocol = Recorder()
    peer = _connected(reactor, protocol)
    fd = protocol.transport.fileno()
    peer.close()
    _turn(reactor, lambda: protocol.lost is not None)
    assert fd not in loopFor(reactor).sockets


def test_half_close_reaches_a_half_closeable_protocol(reactor) -> None:
    protocol = HalfCloser()
    peer = _connected(reactor, protocol)
    peer.sendall(b"last words")
    peer.shutdown(socket.SHUT_WR)
    _turn(reactor, lambda: protocol.lost is not None)
    assert protocol.eof and protocol.data == b"last words"
    assert peer.recv(10) == b"bye"
    assert peer.recv(10) == b""
    peer.close()


def test_only_plain_tcp_on_a_known_reactor() -> None:
    assert not adopt(StringTransport())


class Echo(Recorder):
    """Answers each read with sendNow, and notes what its peer could see meanwhile."""

    def __init__(self, then=None) -> None:
        super().__init__()
        self.then = then
        self.seenDuringTurn = None
        self.bufferedDuringTurn = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        sendNow(self.transport, b"<" + data)
        sendNow(self.transport, b">")
        self.bufferedDuringTurn = buffered(self.transport)
        if self.then is not None:
            self.then(self)
        self.peer.setblocking(False)
        try:
            self.seenDuringTurn = self.peer.recv(100)
        except BlockingIOError:
            self.seenDuringTurn = b""
        finally:
            self.peer.setblocking(True)


def _echo(reactor, then=None):
    protocol = Echo(then)
    protocol.peer = _connected(reactor, protocol)
    assert protocol.adopted
    return protocol


def test_sends_in_a_turn_leave_together_at_its_end(reactor) -> None:
    """Bytes sendNow is given while the loop handles its events wait for the turn's end, joined, in order."""
    first, second = _echo(reactor), _echo(reactor)
    first.peer.sendall(b"a")
    second.peer.sendall(b"b")
    _turn(reactor, lambda: first.data and second.data)
    assert first.seenDuringTurn == second.seenDuringTurn == b""
    assert first.bufferedDuringTurn and second.bufferedDuringTurn
    assert first.peer.recv(100) == b"<a>"
    assert second.peer.recv(100) == b"<b>"
    assert first.transport.queued is None and not buffered(first.transport)


def test_outside_a_turn_bytes_leave_at_once(reactor) -> None:
    protocol = _echo(reactor)
    sendNow(protocol.transport, b"now")
    assert protocol.peer.recv(100) == b"now"


def test_release_sends_what_the_turn_gathered(reactor) -> None:
    """What moves bytes past the transport (a spliced body) releases them first."""
    protocol = _echo(reactor, then=lambda p: release(p.transport))
    protocol.peer.sendall(b"x")
    _turn(reactor, lambda: protocol.data)
    assert protocol.seenDuringTurn == b"<x>"


def test_closing_in_the_turn_still_delivers_what_was_gathered(reactor) -> None:
    protocol = _echo(reactor, then=lambda p: p.transport.loseConnection())
    protocol.peer.sendall(b"last")
    _turn(reactor, lambda: protocol.lost is not None)
    got = b""
    while True:
        chunk = protocol.peer.recv(100)
        if not chunk:
            break
        got += chunk
    assert got == b"<last>"


def test_a_failing_turn_end_call_leaves_the_others(reactor) -> None:
    def boom(_) -> None:
        raise RuntimeError("boom")

    protocol = _echo(reactor, then=lambda p: loopFor(reactor).atTurnEnd(boom, None))
    other = _echo(reactor)
    protocol.peer.sendall(b"1")
    other.peer.sendall(b"2")
    _turn(reactor, lambda: protocol.data and other.data)
    assert protocol.peer.recv(100) == b"<1>"
    assert other.peer.recv(100) == b"<2>"
