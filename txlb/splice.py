# -*- test-case-name: tests.test_splice -*-
"""
Zero-copy TCP forwarding with C{splice(2)}: once a plaintext TCP service has
connected a client to a server, the kernel moves the bytes between the two
sockets through a pipe per direction, and Python only decides when.

Twisted's epoll reactor keeps one selectable per file descriptor, and each
socket here is read for one direction and written for the other, so each
socket gets one L{_Socket} object that does both.  The rules are those of the
userspace path in L{txlb.tcp}: a direction reads only while its pipe is
empty (backpressure: a slow reader stops the writer, and nothing is held in
txlb's memory), an EOF is passed on as a half-close once the pipe is
drained, and both sockets close when both directions are done or either
fails.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Callable, Optional

from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

#: Bytes asked of one splice call, and the pipe size asked for.
CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

available = hasattr(os, "splice")


def spliceable(transport) -> bool:
    """A plain TCP transport whose socket we can take over."""
    return available and type(transport).__module__ == "twisted.internet.tcp" and hasattr(transport, "socket")


@implementer(IReadWriteDescriptor)
class _Socket:
    """One socket: its reads feed one direction, its writes drain the other."""

    def __init__(self, pair: "SplicePair", sock: socket.socket) -> None:
        self.pair = pair
        self.sock = sock
        self.fd = sock.fileno()

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "txlb-splice"

    def doRead(self) -> None:
        self.pair._readable(self)

    def doWrite(self) -> None:
        self.pair._writable(self)

    def connectionLost(self, reason) -> None:
        self.pair._fail(reason.getErrorMessage())


class _Direction:
    """Bytes from C{src} to C{dst} through one pipe."""

    def __init__(self, src: _Socket, dst: _Socket, count: Callable[[int], None]) -> None:
        self.src = src
        self.dst = dst
        self.count = count
        self.read, self.write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # the system's default pipe size will do
        self.pending = 0
        self.eof = False
        self.done = False


class SplicePair:
    """
    Splices two connected sockets together until both directions end.

    @param count: C{count(toServer, toClient)} for every chunk moved.
    @param ended: called once with L{None} or an error message, after both
        sockets are closed.
    """

    def __init__(self, reactor, client: socket.socket, server: socket.socket,
                 count: Callable[[int, int], None], ended: Callable[[Optional[str]], None]) -> None:
        self.reactor = reactor
        self.ended = ended
        self.client = _Socket(self, client)
        self.server = _Socket(self, server)
        self.upstream = _Direction(self.client, self.server, lambda n: count(n, 0))
        self.downstream = _Direction(self.server, self.client, lambda n: count(0, n))
        self.closed = False

    def start(self) -> None:
        self.reactor.addReader(self.client)
        self.reactor.addReader(self.server)

    def _from(self, side: _Socket) -> _Direction:
        return self.upstream if side is self.client else self.downstream

    def _to(self, side: _Socket) -> _Direction:
        return self.downstream if side is self.client else self.upstream

    def _readable(self, side: _Socket) -> None:
        d = self._from(side)
        try:
            n = os.splice(side.fd, d.write, CHUNK, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(e.strerror)
            return
        if n == 0:
            d.eof = True
            self.reactor.removeReader(side)
            self._drained(d)
            return
        d.pending += n
        d.count(n)
        self._flush(d)

    def _flush(self, d: _Direction) -> None:
        while d.pending:
            try:
                n = os.splice(d.read, d.dst.fd, d.pending, flags=_FLAGS)
            except BlockingIOError:
                # The receiver is slow: stop reading until it drains.
                self.reactor.removeReader(d.src)
                self.reactor.addWriter(d.dst)
                return
            except OSError as e:
                self._fail(e.strerror)
                return
            d.pending -= n
        self._drained(d)

    def _writable(self, side: _Socket) -> None:
        d = self._to(side)
        self.reactor.removeWriter(side)
        self._flush(d)
        if not d.pending and not d.eof and not self.closed:
            self.reactor.addReader(d.src)

    def _drained(self, d: _Direction) -> None:
        """The pipe is empty: pass an EOF on as a half-close."""
        if d.eof and not d.pending and not d.done:
            d.done = True
            try:
                d.dst.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if self.upstream.done and self.downstream.done:
                self.close(None)

    def _fail(self, message: str) -> None:
        self.close(message or "connection lost")

    def close(self, error: Optional[str]) -> None:
        """Close both sockets and pipes now; C{ended} is told once."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            self.reactor.removeReader(side)
            self.reactor.removeWriter(side)
        for d in (self.upstream, self.downstream):
            os.close(d.read)
            os.close(d.write)
        for side in (self.client, self.server):
            try:
                side.sock.close()
            except OSError:
                pass
        self.ended(error)

    def abort(self, why: str) -> None:
        """Reset both connections (shutdown, idle timeout)."""
        for side in (self.client, self.server):
            try:
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        self.close(why)
