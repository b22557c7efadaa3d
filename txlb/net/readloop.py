# -*- test-case-name: tests.test_readloop -*-
"""
Reading plaintext TCP connections through txlb's own epoll set.

Twisted's reactor calls each readable descriptor's C{doRead} inside a
logging context (C{callWithLogger}: a prefix lookup and a context pushed
and popped), several Python calls per event.  An HTTP request through the
proxy is two read events (the client's request, the backend's answer), and
those calls were about a fifth of the proxy's Python time per request.

L{adopt} moves a plain Twisted TCP transport's reading into the epoll set
of L{txlb.net.splice.loopFor}, which the reactor watches as a single reader:
an event then costs a dictionary lookup and the transport's own C{doRead}.
Everything else stays Twisted's: the transport object, its write buffer
(written through the reactor as before), producers, half-close and
closing.  Only where the transport asks to start or stop reading changes,
which is why the transport's class becomes a subclass that overrides
those two methods; and the subclass holds the bytes that
L{txlb.net.wire.sendNow} gathers for it while the loop handles a turn's
events.
"""

from __future__ import annotations

import select

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger

from txlb.net import fastpath
from txlb.net.splice import available, loopFor

_log = Logger(namespace="txlb.net.readloop")

_IN = getattr(select, "EPOLLIN", 0x1)
_READY = _IN | getattr(select, "EPOLLHUP", 0x10) | getattr(select, "EPOLLERR", 0x8)


class _LoopReading:
    """
    What an adopted transport does differently: C{startReading} and
    C{stopReading} watch it in the loop's epoll set, and the set's events
    call C{doRead} as the reactor would.
    """

    #: What the loop's epoll set watches this socket for (0: nothing).
    mask = 0
    #: Bytes L{txlb.net.wire.sendNow} gathered for this connection in the
    #: loop's current turn, sent at its end; L{None}: none.
    queued: "list[bytes] | None" = None

    def startReading(self) -> None:
        self._loop.watch(self, _IN)

    def stopReading(self) -> None:
        if self.mask:
            self._loop.watch(self, 0)

    def ready(self, events: int) -> None:
        """The loop's epoll set says the socket is readable (or broke)."""
        if not (events & _READY and self.mask):
            return
        try:
            why = self.doRead()
        except Exception as e:
            _log.failure("reading {transport} failed", transport=self)
            why = e
        if why is not None:
            self._lost(why)

    def _lost(self, why) -> None:
        # As the reactor ends a descriptor whose doRead returned a reason
        # (a half-close when the protocol takes one).
        self.stopReading()
        fastpath.endOfRead(self.reactor, self, why)

    def abandon(self) -> None:
        """The loop is going away (the reactor stops): the connection ends."""
        if self.connected:
            self._lost(ConnectionLost("txlb's read loop stopped"))


class _LoopServer(_LoopReading, tcp.Server):
    """An accepted connection read through the loop."""


class _LoopClient(_LoopReading, tcp.Client):
    """A connection to a backend read through the loop."""


_ADOPTED = {tcp.Server: _LoopServer, tcp.Client: _LoopClient}
#: The classes of transports read through the loop.
LOOPED = frozenset(_ADOPTED.values())
#: The classes of transports whose socket is plain TCP, adopted or not.
PLAIN = frozenset((*_ADOPTED, *LOOPED))


def adopt(transport) -> bool:
    """
    Read C{transport} through the loop from now on, if it is a plain
    Twisted TCP transport on a reactor with epoll and the fast path is on
    (L{txlb.net.fastpath}); true if it is (or already was).  Call it where the
    transport is reading (a protocol's C{connectionMade}).
    """
    cls = _ADOPTED.get(type(transport))
    if cls is None:
        return isinstance(transport, _LoopReading)
    reactor = transport.reactor
    reads = fastpath.readingSet(reactor)
    if not available or reads is None or not transport.connected or transport.disconnecting:
        return False
    reading = transport.fileno() in reads
    transport.stopReading()  # out of the reactor's own set
    transport.__class__ = cls
    transport.fd = transport.fileno()
    transport._loop = loopFor(reactor)
    if reading:
        transport.startReading()
    return True
