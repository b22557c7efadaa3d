"""
L{txlb.net.wire}: bytes go straight to the socket when nothing is queued, and
through Twisted's buffer, in order, otherwise.
"""

from __future__ import annotations

import select
import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from txlb.net.wire import Cork, backlogged, noDelay, sendNow


@pytest.fixture
def pair():
    """A Twisted server transport on a real loopback connection, and the peer socket."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    listener.close()
    reactor = MemoryReactor()
    transport = tcp.Server(accepted, Protocol(), address, None, 1, reactor)
    peer.settimeout(5)
    yield transport, peer, reactor
    peer.close()
    accepted.close()


def _receive(peer: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = peer.recv(n - len(got))
        assert chunk, "connection closed early"
        got += chunk
    return got


def test_sent_at_once(pair) -> None:
    transport, peer, reactor = pair
    sendNow(transport, b"hello")
    assert _receive(peer, 5) == b"hello"
    assert transport not in reactor.getWriters()


def test_queued_behind_buffered_bytes(pair) -> None:
    """Bytes already in Twisted's buffer go first."""
    transport, peer, reactor = pair
    transport.write(b"first ")
    sendNow(transport, b"second")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    peer.setblocking(True)
    transport.doWrite()
    assert _receive(peer, 12) == b"first second"


def test_full_socket_leaves_the_rest_to_twisted(pair) -> None:
    transport, peer, reactor = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes
    sendNow(transport, data)
    assert transport in reactor.getWriters()
    got = bytearray()
    while len(got) < len(data):
        readable, writable, _ = select.select([peer], [transport.socket], [], 5)
        assert readable or writable, "stalled"
        if writable:
            transport.doWrite()
        if readable:
            got += peer.recv(1 << 20)
    assert bytes(got) == data


def test_other_transports_use_write() -> None:
    transport = StringTransport()
    sendNow(transport, b"x")
    assert transport.value() == b"x"


def test_cork_gathers_then_sends_once() -> None:
    transport = StringTransport()
    writes = []
    transport.write = writes.append
    cork = Cork(transport)
    assert cork.hold()
    assert not cork.hold()  # already held: the outer holder flushes
    cork.write(b"head ")
    cork.write(b"body")
    assert writes == []
    cork.flush()
    assert writes == [b"head body"]
    cork.write(b"direct")
    assert writes == [b"head body", b"direct"]


def test_a_client_backlog_is_seen_through_a_wrapper(pair) -> None:
    """What the body stall timeout reads to blame the client, not the backend."""
    transport, peer, reactor = pair

    class Wrapper:  # as TLS wraps the TCP transport
        pass

    wrapper = Wrapper()
    wrapper.transport = transport
    assert not backlogged(transport) and not backlogged(wrapper)
    transport.write(b"queued")  # not sent until the reactor's next turn
    assert backlogged(transport) and backlogged(wrapper)
    assert not backlogged(StringTransport())


def test_no_delay_reaches_the_tcp_transport_under_wrappers(pair) -> None:
    transport, _, _ = pair

    class Wrapper:
        def __init__(self, transport) -> None:
            self.transport = transport

    for wrapped in (transport, Wrapper(Wrapper(transport))):
        transport.setTcpNoDelay(False)
        noDelay(wrapped)
        assert transport.getTcpNoDelay()
    noDelay(StringTransport())  # nothing to set: nothing happens
