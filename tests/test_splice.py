"""
The splice(2) path driven by hand: real loopback TCP sockets, a reactor
stand-in that records what is watched, and the splice loop's epoll set
polled (with bounded waits) as the reactor would.
"""

from __future__ import annotations

import os
import select
import socket

import pytest

from tests.support import tcpPair
from txlb.net import splice

pytestmark = pytest.mark.skipif(not splice.available, reason="no os.splice on this platform")


class Watching:
    """A reactor stand-in: what is watched, nothing more."""

    def __init__(self) -> None:
        self.readers: set = set()

    def addReader(self, s) -> None:
        self.readers.add(s)

    def removeReader(self, s) -> None:
        self.readers.discard(s)


def turn(pair: splice.SplicePair, timeout: float = 1.0) -> bool:
    """One turn of the reactor for the splice loop: wait (bounded) for events, handle them."""
    ready, _, _ = select.select([pair.loop], [], [], timeout)
    if ready:
        pair.loop.doRead()
    return bool(ready)


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


def test_the_reactor_watches_one_set_for_every_pair(spliced):
    pair, reactor, client, server, counted, ended = spliced
    other = splice.SplicePair(reactor, *tcpPair(), lambda up, down: None, lambda error: None)
    other.start()
    assert reactor.readers == {pair.loop} and other.loop is pair.loop
    assert set(pair.loop.sockets) == {pair.client.fd, pair.server.fd, other.client.fd, other.server.fd}
    other.close(None)
    assert set(pair.loop.sockets) == {pair.client.fd, pair.server.fd}


def test_bytes_move_both_ways_and_are_counted(spliced):
    pair, reactor, client, server, counted, ended = spliced
    client.sendall(b"hello")
    assert turn(pair)
    assert readAll(server) == b"hello"
    server.sendall(b"world!")
    assert turn(pair)
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
        turn(pair, 0.2)
        if not pair.client.wantRead:
            break
    assert not pair.client.wantRead  # backpressure: no more reading
    assert pair.server.wantWrite     # waiting for the server to drain
    assert pair.loop.sockets[pair.server.fd] is pair.server
    received = 0
    for _ in range(10_000):
        if received >= sent:
            break
        select.select([server], [], [], 1.0)
        received += len(readAll(server))
        turn(pair, 0)
    assert received == sent
    assert pair.client.wantRead and not pair.server.wantWrite


def test_half_close_is_passed_on_and_both_ends_close(spliced):
    pair, reactor, client, server, counted, ended = spliced
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert turn(pair)  # the bytes and the EOF behind them, in one turn
    assert readAll(server) == b"request"
    assert server.recv(10) == b""  # the EOF came through
    assert ended == []
    assert pair.client.fd not in pair.loop.sockets  # nothing more to read from it: not watched
    server.sendall(b"answer")
    assert turn(pair)
    assert readAll(client) == b"answer"
    server.shutdown(socket.SHUT_WR)
    assert turn(pair)
    assert ended == [None]
    assert pair.loop.sockets == {}


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
    assert turn(pair)
    assert pair.client.pipe is None
    [pipe] = pair.pool.free
    server.sendall(b"world!")
    assert turn(pair)
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
        turn(pair, 0.2)
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


def test_a_failing_handler_closes_its_pair_and_is_logged(spliced, events):
    pair, reactor, client, server, counted, ended = spliced

    def broken(up: int, down: int) -> None:
        raise RuntimeError("accounting broke")

    pair.count = broken
    client.sendall(b"hello")
    assert turn(pair)
    assert ended == ["internal error"]
    assert pair.loop.sockets == {}
    assert any(e.get("log_failure") and e["log_failure"].check(RuntimeError) for e in events)
