# -*- test-case-name: tests.test_wire -*-
"""
Writing to a TCP connection now rather than on the reactor's next turn.

Twisted's C{transport.write} queues the bytes, asks epoll to watch the
socket for writing, and sends on the reactor's next iteration, which then
asks epoll to stop watching: two C{epoll_ctl} calls and a trip round the
loop for every write.  On a proxy's hot path (one request head to the
backend, one response to the client) that costs about as much as the
proxying itself.  L{sendNow} sends at once when nothing is queued ahead,
and hands Twisted only what the socket would not take, so ordering,
buffering and producer flow control stay Twisted's.

Sending at once is not sending one at a time, though.  A read of 100
HTTP/2 requests makes 100 request heads for 100 backend connections, and
each C{send} to a peer that sleeps in C{epoll_wait} wakes it: a wake-up
costs the sender more than the send (in a virtual machine, an
inter-processor interrupt and an exit to the hypervisor), and with
Python's work between two sends the peer is asleep again for the next.
So while txlb's read loop handles the events of one turn
(L{txlb.net.splice.SpliceLoop}), what L{sendNow} is given for a connection
the loop reads waits, joined per connection, and leaves at the end of
the turn, the sends back to back: the backend, and the client of many
responses, wake once for the lot.  Nothing waits beyond the turn, and
nothing but the loop's own events gathers.

What a transport holds is not in Twisted's public API: L{txlb.net.fastpath}
reads it, and when the fast path is off every write goes through
C{transport.write} and a transport is taken to hold bytes (so that
nothing is spliced past them).
"""

from __future__ import annotations

from txlb.net import fastpath
from txlb.net.readloop import LOOPED as _LOOPED, PLAIN as _PLAIN


def buffered(transport) -> bool:
    """Twisted (or this turn's gathering) may still hold bytes to write on this plain TCP C{transport}."""
    if type(transport) in _LOOPED and transport.queued is not None:
        return True
    return fastpath.buffered(transport) if fastpath.enabled() else True


def backlogged(transport) -> bool:
    """
    A connection holds bytes it could not send yet: its plain TCP
    transport, under TLS (or another wrapper) if there is one, has a
    backlog.  False for transports with no socket beneath (a test's).
    """
    while type(transport) not in _PLAIN:
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    if fastpath.enabled():
        return fastpath.buffered(transport)
    # The public sign: the transport paused its producer, its buffer full.
    return bool(transport.producerPaused)


def sendNow(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to its socket when its buffer
    is empty, the rest (if the socket is full) through C{transport.write};
    at the end of the read loop's turn when one is being handled.
    """
    if type(transport) in _LOOPED:
        queued = transport.queued
        if queued is not None:
            queued.append(data)
            return
        loop = transport._loop
        if loop.turning:
            transport.queued = [data]
            loop.atTurnEnd(release, transport)
            return
    _send(transport, data)


def release(transport) -> None:
    """
    Send now what L{sendNow} gathered for C{transport} in this turn: before
    anything else moves bytes to its socket (the kernel splicing a body).
    """
    if type(transport) in _LOOPED:
        queued = transport.queued
        if queued is not None:
            transport.queued = None
            _send(transport, queued[0] if len(queued) == 1 else b"".join(queued))


def _send(transport, data: bytes) -> None:
    # Plain TCP only: a TLS transport's bytes must go through OpenSSL; a
    # test's StringTransport has no socket.
    if (
        type(transport) not in _PLAIN
        or not fastpath.enabled()
        or fastpath.buffered(transport)
        or transport.disconnecting
        or not transport.connected
        or fastpath.writeShut(transport)
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        # Twisted finds the same error on its own write and reports it as
        # connection loss, as it would have without us.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


class Cork:
    """
    Bytes for one transport gathered while an event is handled, then sent
    with one L{sendNow}: a response head and a small body read together
    leave in one segment, as HAProxy's and nginx's do.
    """

    __slots__ = ("transport", "out")

    def __init__(self, transport) -> None:
        self.transport = transport
        self.out: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        out = self.out
        if out is None:
            sendNow(self.transport, data)
        else:
            out.append(data)

    def hold(self) -> bool:
        """Gather writes from now on; true if this call started gathering."""
        if self.out is None:
            self.out = []
            return True
        return False

    def flush(self) -> None:
        """Send what was gathered, and write directly from now on."""
        out, self.out = self.out, None
        if out:
            sendNow(self.transport, out[0] if len(out) == 1 else b"".join(out))


def noDelay(transport) -> None:
    """
    C{TCP_NODELAY} on the TCP connection under C{transport} (through TLS,
    or another wrapper).  For a connection that writes one message in
    several pieces (a body compressed as it streams): with Nagle's
    algorithm on, a piece smaller than a segment waits for the ACK of the
    one before it, which a client sends only when its delayed-ACK timer
    fires (40 ms on Linux) once it is past a connection's first exchange.
    """
    for _ in range(4):
        setNoDelay = getattr(transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return
