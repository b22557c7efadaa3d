# -*- test-case-name: tests.test_http_splice -*-
"""
A response body moved by the kernel: once the head of a response with a
C{Content-Length} has gone to the client, the rest of the body goes from
the backend's socket to the client's through a pipe with C{splice(2)},
without passing through Python's memory.

The sockets stay Twisted's transports' own: L{BodySplice} watches them in
the reactor's one L{txlb.net.splice.SpliceLoop} (the epoll set that TCP
splicing and L{txlb.net.readloop} use too) while it moves exactly the bytes it
was told to, and takes them out of that set before it reports the end.
The transports must not be reading or writing meanwhile: the caller
pauses them first and resumes them after.

Backpressure is L{txlb.net.splice}'s: the backend is read only while the pipe
is empty, so a slow client stops the backend and nothing piles up in txlb.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional

from txlb.net.splice import READY_IN, READY_OUT, WATCH_IN, WATCH_OUT, available, loopFor, pipes, spliceable

__all__ = ["BodySplice", "CLOSED", "MIN_SPLICE", "SINK", "SOURCE", "available", "spliceable"]

#: Bodies with fewer bytes than this still to come are copied as usual: a
#: pipe and the reactor's registrations cost more than they save.
MIN_SPLICE = 64 * 1024

#: Bytes asked of one splice call: the size of the shared pool's pipes
#: (L{txlb.net.splice.pipes}); 1 MiB costs a third of the CPU time of 64 KiB
#: per byte moved.
CHUNK = 1 << 20

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Which side an error came from, as L{BodySplice}'s C{ended} is told.
SOURCE = "source"
SINK = "sink"
#: The error when the source ends before the body does.
CLOSED = "closed the connection"


class _End:
    """One socket of the splice, as the loop's epoll set watches it."""

    #: What the loop watches it for now (0: not in the set).
    mask = 0

    def __init__(self, splice: "BodySplice", sock: socket.socket, side: str) -> None:
        self.splice = splice
        self.sock = sock
        self.side = side
        self.fd = sock.fileno()

    def ready(self, events: int) -> None:
        """What the loop's epoll set reported for this socket."""
        if self.side == SOURCE:
            if events & READY_IN:
                self.splice._readable()
        elif events & READY_OUT:
            self.splice._writable()

    def abandon(self) -> None:
        """L{ready} failed: end the splice."""
        self.splice._fail(self.side, "internal error")


class BodySplice:
    """
    Moves exactly C{length} bytes from socket C{source} to socket C{sink}.

    @param reactor: the reactor whose L{txlb.net.splice.SpliceLoop} watches
        the sockets.
    @param moved: C{moved(n)} for every C{n} bytes written to C{sink}.
    @param ended: called once, after this splice's registrations are gone,
        with C{(None, None)} when all C{length} bytes were written, else an
        error message and the side it came from (L{SOURCE}: the source
        ended early or failed; L{SINK}: writing failed).  Neither socket is
        closed here.
    """

    def __init__(self, reactor, source: socket.socket, sink: socket.socket, length: int,
                 moved: Callable[[int], None], ended: Callable[[Optional[str], Optional[str]], None]) -> None:
        self.loop = loopFor(reactor)
        self.source = _End(self, source, SOURCE)
        self.sink = _End(self, sink, SINK)
        self.left = length  # still to read from the source
        self.pending = 0  # read, in the pipe, not yet written
        self.moved = moved
        self.ended = ended
        self.done = False
        self.pipe: Optional[tuple[int, int]] = None

    @property
    def waitingForSink(self) -> bool:
        """The pipe holds bytes the sink has not taken (else: waiting for the source)."""
        return self.pending > 0

    @property
    def started(self) -> bool:
        return self.pipe is not None or self.done

    def start(self) -> None:
        self.pipe = pipes.get()  # an empty pipe, shared with the TCP services' splicing
        self.loop.watch(self.source, WATCH_IN)

    def _readable(self) -> None:
        if self.done:
            return
        try:
            n = os.splice(self.source.fd, self.pipe[1], min(CHUNK, self.left), flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(SOURCE, e.strerror)
            return
        if n == 0:
            self._fail(SOURCE, CLOSED)
            return
        self.left -= n
        self.pending += n
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                n = os.splice(self.pipe[0], self.sink.fd, self.pending, flags=_FLAGS)
            except BlockingIOError:
                # The sink is slow: read nothing more until it drains.
                self.loop.watch(self.source, 0)
                self.loop.watch(self.sink, WATCH_OUT)
                return
            except OSError as e:
                self._fail(SINK, e.strerror)
                return
            self.pending -= n
            self.moved(n)
        if not self.left:
            self._end(None, None)

    def _writable(self) -> None:
        if self.done:
            return
        self._flush()
        if not self.pending and not self.done:
            self.loop.watch(self.sink, 0)
            self.loop.watch(self.source, WATCH_IN)

    def _fail(self, side: str, message: str) -> None:
        self._end(message or "connection lost", side)

    def _end(self, error: Optional[str], side: Optional[str]) -> None:
        if self.done:
            return
        self.stop()
        self.ended(error, side)

    def stop(self) -> None:
        """Give the sockets back and close the pipe, telling nobody."""
        if self.done:
            return
        self.done = True
        for end in (self.source, self.sink):
            if end.sock.fileno() == -1:
                # Closed meanwhile, which took it out of the set; its number
                # may already be another socket's.
                self.loop.forget(end)
            else:
                self.loop.watch(end, 0)
        if self.pipe is not None:
            if self.pending:
                pipes.discard(self.pipe)  # bytes nobody will read
            else:
                pipes.put(self.pipe)
            self.pipe = None
