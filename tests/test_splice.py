"""
The splice(2) path driven by hand: real loopback TCP sockets, a reactor
stand-in that records what is watched, and doRead/doWrite called as the
reactor would.
"""

from __future__ import annotations

import os
import select
import socket

import pytest

from txlb import splice

pytestmark = pytest.mark.skipif(not splice.available, reason="no os.splice on this platform")


def tcpPair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    for s in (outer, inner):
        s.setblocking(False)
    return outer, inner


class Watching:
    def __init__(self) -> None:
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, s) -> None:
        self.readers.add(s)

    def removeReader(self, s) -> None:
        self.readers.discard(s)

    def addWriter(self, s) -> None:
        self.writers.add(s)

    def removeWriter(self, s) -> None:
        self.writers.discard(s)


@pytest.fixture
def spliced():
    """client <-> [txlb's client socket | txlb's server socket] <-> server"""
    client, txlbClient = tcpPair()
    txlbServer, server = tcpPair()
    reactor = Watching()
    counted, ended = [], []
    pair = splice.SplicePair(reactor, txlbClient, txlbServer, lambda up, down: counted.append((up, down)),
                             ended.append, pool=splice.PipePool())
    pair.start()
    yield pair, reactor, client, server, counted, ended
    for s in (client, server):
        s.close()
    pair.close(None)
    pair.pool.clear()


def readAll(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_bytes_move_both_ways_and_are_counted(spliced):
    pair, reactor, client, server, counted, ended = spliced
    client.sendall(b"hello")
    pair.client.doRead()
    assert readAll(server) == b"hello"
    server.sendall(b"world!")
    pair.server.doRead()
    assert readAll(client) == b"world!"
    assert counted == [(5, 0), (0, 6)]


def test_a_slow_receiver_stops_reading_the_sender(spliced):
    """
    The server reads nothing: once the kernel's buffers and the pipe are
    full, txlb stops reading the client and waits for the server instead;
    when the server reads, everything arrives.
    """
    pair, reactor, client, server, counted, ended = spliced
    block = b"x" * (1 << 20)
    sent = 0
    for _ in range(256):  # bounded: the buffers between are a few MiB
        try:
            sent += client.send(block)
        except BlockingIOError:
            select.select([], [client], [], 0.2)
        if pair.client not in reactor.readers:
            break
        select.select([pair.client], [], [], 0.2)
        pair.client.doRead()
    assert pair.client not in reactor.readers  # backpressure: no more reading
    assert pair.server in reactor.writers      # waiting for the server to drain
    received = 0
    for _ in range(10_000):
        if received >= sent:
            break
        select.select([server], [], [], 1.0)
        received += len(readAll(server))
        if pair.server in reactor.writers:
            pair.server.doWrite()
        if pair.client in reactor.readers:
            pair.client.doRead()
    assert received == sent
    assert pair.client in reactor.readers and pair.server not in reactor.writers


def test_half_close_is_passed_on_and_both_ends_close(spliced):
    pair, reactor, client, server, counted, ended = spliced
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    pair.client.doRead()
    pair.client.doRead()  # EOF
    assert readAll(server) == b"request"
    assert server.recv(10) == b""  # the EOF came through
    assert ended == []
    server.sendall(b"answer")
    pair.server.doRead()
    assert readAll(client) == b"answer"
    server.shutdown(socket.SHUT_WR)
    pair.server.doRead()
    assert ended == [None]
    assert not reactor.readers and not reactor.writers


def test_abort_resets_both(spliced):
    pair, reactor, client, server, counted, ended = spliced
    pair.abort("idle timeout")
    assert ended == ["idle timeout"]
    with pytest.raises(ConnectionResetError):
        client.setblocking(True)
        client.settimeout(5)
        client.recv(10)


def isOpen(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_pipe_is_held_only_while_bytes_are_in_it(spliced):
    """
    Bytes written straight through leave the pipe empty: it goes back to
    the pool, and the next chunk, either way, reuses it.
    """
    pair, reactor, client, server, counted, ended = spliced
    client.sendall(b"hello")
    pair.client.doRead()
    assert pair.client.pipe is None
    [pipe] = pair.pool.free
    server.sendall(b"world!")
    pair.server.doRead()
    assert pair.pool.free == [pipe]
    assert readAll(client) == b"world!"


def test_a_stalled_direction_keeps_its_pipe_and_closing_discards_it(spliced):
    pair, reactor, client, server, counted, ended = spliced
    block = b"x" * (1 << 20)
    for _ in range(256):  # bounded: the buffers between are a few MiB
        try:
            client.send(block)
        except BlockingIOError:
            pass
        select.select([pair.client], [], [], 0.2)
        pair.client.doRead()
        if pair.client.pending:
            break
    assert pair.client.pending and pair.client.pipe is not None
    held = pair.client.pipe
    assert pair.pool.free == []
    pair.close(None)
    assert not isOpen(held[0]) and not isOpen(held[1])  # bytes nobody will read: not reused
    assert pair.pool.free == []


def test_the_pool_keeps_a_bounded_number_of_empty_pipes():
    pool = splice.PipePool(keep=2)
    taken = [pool.get() for _ in range(3)]
    assert len({fd for pipe in taken for fd in pipe}) == 6
    for pipe in taken:
        pool.put(pipe)
    assert pool.free == taken[:2]
    assert not isOpen(taken[2][0]) and not isOpen(taken[2][1])
    assert pool.get() == taken[1]  # reused, not made anew
    pool.discard(taken[1])
    pool.clear()
    assert not isOpen(taken[0][0])
