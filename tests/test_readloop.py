"""
L{txlb.net.readloop}: an adopted transport is read through txlb's epoll set,
and pausing, resuming, half-close and closing behave as Twisted's.
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
