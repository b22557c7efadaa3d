# -*- test-case-name: tests.test_splice -*-
"""
Zero-copy TCP forwarding with C{splice(2)}: once a plaintext TCP service has
connected a client to a server, the kernel moves the bytes between the two
sockets through a pipe, and Python only decides when.

Each socket is read for one direction and written for the other, so each
gets one L{_Socket} object that does both, and all of them are watched by one
epoll set (L{SpliceLoop}) that the reactor sees as a single reader.  The
rules are those of the userspace path in L{txlb.tcp}: a direction reads only while its pipe is
empty (backpressure: a slow reader stops the writer, and nothing is held in
txlb's memory), an EOF is passed on as a half-close once the pipe is
drained, and both sockets close when both directions are done or either
fails.

A direction holds a pipe only while bytes are in it.  Bytes read from a
socket are usually written out to the other at once, leaving the pipe
empty, so it goes back to a shared L{PipePool} straight away: the pipes in
use are those of the directions stalled on a slow receiver, not one pair
per connection, and a new connection costs no C{pipe2}, C{fcntl} or
C{close} calls.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import weakref
from typing import Callable, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

_log = Logger(namespace="txlb.net.splice")

#: Bytes asked of one splice call, and the pipe size asked for: a full pipe
#: is what one call moves.
CHUNK = 1 << 20
#: A read this large probably left more behind: read again in the same
#: turn rather than wait for the reactor's next poll.
_MORE = 1 << 16
#: Reads (each written out) per readiness event, so that one busy
#: connection cannot keep the reactor from the others.
_ROUNDS = 8
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"

available = hasattr(os, "splice") and hasattr(select, "epoll")


def spliceable(transport) -> bool:
    """
    A plain TCP transport whose socket we can take over: Twisted's own (or
    one L{txlb.net.readloop} reads), not speaking TLS.
    """
    return available and isinstance(transport, (tcp.Server, tcp.Client)) and not transport.TLS


class PipePool:
    """
    Empty pipes, kept for the next direction that has bytes to move.

    A pipe is only ever returned here empty, so whoever takes one can fill
    it at once.  At most C{keep} are kept; beyond that, returned pipes are
    closed.  Pipes count against a user's pipe budget whether full or not
    (C{/proc/sys/fs/pipe-user-pages-soft}, 64 MiB by default, past which
    new pipes get two pages and cannot grow), so few are kept: traffic that
    is not stalled needs one or two.

    @param size: the capacity asked for a new pipe (C{F_SETPIPE_SZ}); the
        system's default stands if it refuses.
    """

    def __init__(self, size: int = CHUNK, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        """An empty pipe: C{(read end, write end)}, both non-blocking."""
        if self.free:
            return self.free.pop()
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(write, _F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # the system's default pipe size will do
        return read, write

    def put(self, pipe: tuple[int, int]) -> None:
        """Take back a pipe that is empty."""
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes nobody will read."""
        os.close(pipe[0])
        os.close(pipe[1])

    def clear(self) -> None:
        """Close every kept pipe."""
        free, self.free = self.free, []
        for pipe in free:
            self.discard(pipe)


#: The pool every L{SplicePair} shares unless it is given another.
pipes = PipePool()


class _Socket:
    """
    One socket, and the direction it is the source of: its reads feed that
    direction (to C{peer}), its writes drain the peer's.
    """

    #: The pipe of this direction, while bytes are in it.
    pipe: Optional[tuple[int, int]] = None
    #: Bytes in the pipe, not yet written to the peer.
    pending = 0
    #: This socket sent EOF and it was passed on.
    done = False
    #: Read it (its direction is neither stalled nor done).
    wantRead = False
    #: Write to it (its peer's direction is stalled on it).
    wantWrite = False
    #: What the loop's epoll set watches it for (0: not in the set).
    mask = 0
    #: Bytes given to L{SplicePair.start} not yet in the pipe.
    head = b""
    peer: "_Socket"

    def __init__(self, pair: "SplicePair", sock: socket.socket, upstream: bool) -> None:
        self.pair = pair
        self.sock = sock
        self.fd = sock.fileno()
        #: The client's socket: what it sends is counted as C{toServer}.
        self.upstream = upstream

    def ready(self, events: int) -> None:
        """What the loop's epoll set reported for this socket."""
        pair = self.pair
        if events & _READY_OUT and self.wantWrite:
            pair._writable(self.peer)
        if events & _READY_IN and self.wantRead and not pair.closed:
            pair._pump(self, events & _HUP)

    def abandon(self) -> None:
        """L{ready} failed: give up on the pair."""
        if self.pair is not None:
            self.pair.close("internal error")


_EPOLLIN, _EPOLLOUT, _EPOLLERR, _EPOLLHUP, _EPOLLRDHUP = (
    getattr(select, name, bit) for name, bit in
    (("EPOLLIN", 0x1), ("EPOLLOUT", 0x4), ("EPOLLERR", 0x8), ("EPOLLHUP", 0x10), ("EPOLLRDHUP", 0x2000))
)
_IN = _EPOLLIN | _EPOLLRDHUP
_OUT = _EPOLLOUT
_HUP = _EPOLLRDHUP | _EPOLLHUP
_READY_IN = _IN | _EPOLLHUP | _EPOLLERR
_READY_OUT = _OUT | _EPOLLHUP | _EPOLLERR
#: What L{SpliceLoop.watch} watches for (C{EPOLLIN} with C{EPOLLRDHUP},
#: C{EPOLLOUT}), and the events that make a socket worth reading or
#: writing (a hang-up or an error included: the call then tells what).
WATCH_IN, WATCH_OUT, READY_IN, READY_OUT = _IN, _OUT, _READY_IN, _READY_OUT
#: Events handled per turn of the reactor.
_BATCH = 256


@implementer(IReadDescriptor)
class SpliceLoop:
    """
    One epoll set for every spliced socket of a reactor, which watches the
    set itself as a single reader.

    Twisted's reactor runs each event of each descriptor inside a logging
    context and turns a change of interest into a removal and an addition;
    for a spliced socket, whose handler is two system calls, that was most
    of the Python time of a small exchange.  Here an event costs a
    dictionary lookup and a change of interest one C{epoll_ctl}, and the
    C{EPOLLRDHUP} flag tells a reader that the peer's EOF is already there,
    to be read in the same turn.  A socket leaves the set when it is closed
    (the kernel drops it), so closing costs no call either.

    The events of one turn are handled one after the other, and what they
    leave for the turn's end (L{atTurnEnd}: the writes L{txlb.net.wire.sendNow}
    gathers) is done once they all are.
    """

    #: The events of a turn are being handled (L{atTurnEnd} calls wait).
    turning = False

    def __init__(self, reactor) -> None:
        self.epoll = select.epoll()
        #: What handles each watched file descriptor (a L{_Socket}, or a
        #: L{txlb.net.connect.PendingConnect}).
        self.sockets: dict[int, object] = {}
        self._atTurnEnd: list[tuple[Callable[[object], None], object]] = []
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def logPrefix(self) -> str:
        return "txlb-splice"

    def update(self, side: _Socket) -> None:
        """Watch C{side} for what it wants now."""
        self.watch(side, (_IN if side.wantRead else 0) | (_OUT if side.wantWrite else 0))

    def watch(self, handler, mask: int) -> None:
        """
        Watch C{handler.fd} for the events of C{mask} (0: not at all), and
        call C{handler.ready(events)} when they come.  One handler per file
        descriptor: a new one takes over the old one's place in the set (a
        connected socket goes from L{txlb.net.connect.PendingConnect} to its
        pair), with one C{epoll_ctl}.
        """
        fd = handler.fd
        old = self.sockets.get(fd)
        if old is not None and old is not handler:
            self._takeOver(old, handler, mask)
            return
        if mask == handler.mask:
            return
        if not handler.mask:
            self.epoll.register(fd, mask)
            self.sockets[fd] = handler
        elif mask:
            self.epoll.modify(fd, mask)
        else:
            # Hang-ups are reported whatever the mask: out of the set.
            self.epoll.unregister(fd)
            del self.sockets[fd]
        handler.mask = mask

    def _takeOver(self, old, handler, mask: int) -> None:
        """
        C{handler} has C{old}'s file descriptor: the same socket passed on,
        or a new one that got the number of a socket closed while C{old}
        watched it (the kernel then dropped it from the set).  Which one is
        not known here, so the kernel is asked.
        """
        fd = handler.fd
        old.mask = 0
        del self.sockets[fd]
        try:
            if mask:
                self.epoll.modify(fd, mask)
            else:
                self.epoll.unregister(fd)
        except FileNotFoundError:
            if mask:
                self.epoll.register(fd, mask)
        handler.mask = mask
        if mask:
            self.sockets[fd] = handler

    def forget(self, handler) -> None:
        """C{handler}'s socket is about to be closed, which takes it out of the set."""
        if handler.mask:
            handler.mask = 0
            if self.sockets.get(handler.fd) is handler:
                del self.sockets[handler.fd]

    def atTurnEnd(self, f: Callable[[object], None], arg: object) -> None:
        """Call C{f(arg)} once this turn's events are handled (only while L{turning})."""
        self._atTurnEnd.append((f, arg))

    def doRead(self) -> None:
        sockets = self.sockets
        self.turning = True
        try:
            for fd, events in self.epoll.poll(0, _BATCH):
                handler = sockets.get(fd)
                if handler is None:
                    continue  # closed by an earlier event of this turn
                try:
                    handler.ready(events)
                except Exception:
                    _log.failure("splicing failed")
                    handler.abandon()
        finally:
            self.turning = False
            if self._atTurnEnd:
                self._endTurn()

    def _endTurn(self) -> None:
        calls, self._atTurnEnd = self._atTurnEnd, []
        for f, arg in calls:
            try:
                f(arg)
            except Exception:
                _log.failure("the end of a read loop's turn failed")

    def connectionLost(self, reason) -> None:
        """The reactor stops: close what is left."""
        for handler in list(self.sockets.values()):
            handler.abandon()
        self.epoll.close()
        for reactor, loop in list(_loops.items()):
            if loop is self:
                del _loops[reactor]


_loops: "weakref.WeakKeyDictionary[object, SpliceLoop]" = weakref.WeakKeyDictionary()


def loopFor(reactor) -> SpliceLoop:
    """The reactor's L{SpliceLoop}, made (and watched) on first use."""
    loop = _loops.get(reactor)
    if loop is None:
        loop = _loops[reactor] = SpliceLoop(reactor)
    return loop


class SplicePair:
    """
    Splices two connected sockets together until both directions end.

    @param count: C{count(toServer, toClient)} for every chunk moved.
    @param ended: called once with L{None} or an error message, after both
        sockets are closed.
    @param pool: where pipes come from and go back to (L{pipes}).
    """

    def __init__(self, reactor, client: socket.socket, server: socket.socket,
                 count: Callable[[int, int], None], ended: Callable[[Optional[str]], None],
                 pool: Optional[PipePool] = None) -> None:
        self.loop = loopFor(reactor)
        self.count = count
        self.ended = ended
        self.pool = pipes if pool is None else pool
        self.client = _Socket(self, client, True)
        self.server = _Socket(self, server, False)
        self.client.peer = self.server
        self.server.peer = self.client
        self.closed = False

    def start(self, toServer: bytes = b"") -> None:
        """
        Start moving bytes.  C{toServer}: bytes for the server ahead of any
        the client sends from now on (what came with its PROXY header, a
        PROXY header of our own).  They wait in the client direction's pipe
        as bytes a slow server has not taken yet do, so the client is read
        once they are written.
        """
        client, server = self.client, self.server
        if toServer:
            # Usually the new connection's socket buffer takes them all at once.
            try:
                toServer = toServer[server.sock.send(toServer):]
            except OSError:
                pass  # full, or broken: the pipe's splice finds out which
        if toServer:
            client.head = toServer
            self._refill(client)
            server.wantWrite = True
        else:
            client.wantRead = True
        server.wantRead = True
        self.loop.update(client)
        self.loop.update(server)

    def _refill(self, src: _Socket) -> None:
        """Move what of C{src.head} its direction's (empty) pipe takes into it."""
        if src.pipe is None:
            src.pipe = self.pool.get()
        head = src.head
        try:
            n = os.write(src.pipe[1], head)
        except BlockingIOError:
            n = 0
        src.head = head[n:]
        src.pending += n

    def _pump(self, src: _Socket, hangup: int = 0) -> None:
        """
        C{src} is readable (and its pipe empty): move what it has to its
        peer, a few chunks at most, until it has no more, the peer is full,
        or an EOF.  With C{hangup} (the peer's EOF has arrived) read on to it.
        """
        pipe = src.pipe
        if pipe is None:
            pipe = src.pipe = self.pool.get()
        readEnd, writeEnd = pipe
        srcFd = src.fd
        dst = src.peer
        dstFd = dst.fd
        splice = os.splice
        for _ in range(_ROUNDS):
            try:
                n = splice(srcFd, writeEnd, CHUNK, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self._fail(e.strerror)
                return
            if n == 0:
                self._eof(src)
                return
            if src.upstream:
                self.count(n, 0)
            else:
                self.count(0, n)
            pending = n
            while pending:
                try:
                    pending -= splice(readEnd, dstFd, pending, flags=_FLAGS)
                except BlockingIOError:
                    # The receiver is slow: stop reading until it drains.
                    src.pending = pending
                    src.wantRead = False
                    self.loop.update(src)
                    dst.wantWrite = True
                    self.loop.update(dst)
                    return
                except OSError as e:
                    src.pending = pending
                    self._fail(e.strerror)
                    return
            if (n < _MORE and not hangup) or self.closed:
                break
        src.pipe = None
        self.pool.put(pipe)
        if not src.wantRead and not self.closed:
            src.wantRead = True
            self.loop.update(src)

    def _eof(self, src: _Socket) -> None:
        """C{src} sent EOF (its pipe is empty): pass it on as a half-close."""
        src.done = True
        self.pool.put(src.pipe)
        src.pipe = None
        if src.peer.done:
            # Closing both sockets ends this direction too: no shutdown needed.
            self.close(None)
            return
        src.wantRead = False
        self.loop.update(src)
        try:
            src.peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _writable(self, src: _Socket) -> None:
        """
        The peer of C{src}, whose direction stalled, has room again: write
        what the pipe holds, then read on at once (a sender held back by
        backpressure has more waiting) rather than after another poll.
        """
        dst = src.peer
        readEnd = src.pipe[0]
        dstFd = dst.fd
        pending = src.pending
        while True:
            while pending:
                try:
                    pending -= os.splice(readEnd, dstFd, pending, flags=_FLAGS)
                except BlockingIOError:
                    src.pending = pending
                    return
                except OSError as e:
                    src.pending = pending
                    self._fail(e.strerror)
                    return
            src.pending = 0
            if not src.head:
                break
            # More of what start() was given than the pipe took at once.
            self._refill(src)
            pending = src.pending
        dst.wantWrite = False
        self.loop.update(dst)
        self._pump(src)

    def _fail(self, message: str) -> None:
        self.close(message or "connection lost")

    def close(self, error: Optional[str]) -> None:
        """Close both sockets now; C{ended} is told once."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            self.loop.forget(side)
            if side.pipe is not None:
                # Bytes nobody will read: this pipe cannot be reused.
                self.pool.discard(side.pipe)
                side.pipe = None
            try:
                side.sock.close()
            except OSError:
                pass
            side.pair = side.peer = None
        ended, self.ended, self.count = self.ended, None, None
        ended(error)

    def abort(self, why: str) -> None:
        """Reset both connections (shutdown, idle timeout)."""
        for side in (self.client, self.server):
            try:
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.close(why)
