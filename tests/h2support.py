"""
The far side of an HTTP/2 connection in protocol tests: the C{h2} library
plays the peer (a client of txlb's front end, or a server behind an
C{h2} pool) over the C{StringTransport} txlb writes to.  It is an
independent implementation, so a test that passes here passes against a
real peer's framing, not against txlb's own idea of it.
"""

from __future__ import annotations

from typing import Optional

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded

#: Round trips one L{H2Peer.read} makes at most: settings, their
#: acknowledgements and window updates settle in two or three.
ROUNDS = 50


def h2Connection(client: bool, **config) -> H2Connection:
    """An h2 connection with bytes for header names and values."""
    return H2Connection(H2Configuration(client_side=client, header_encoding=None, **config))


class H2Peer:
    """
    One HTTP/2 connection's other end: C{conn} (an h2 connection) talks to
    C{protocol} (txlb's side), which writes to C{transport}.

    @param clock: advanced by zero before each read, for a protocol that
        sends its frames at the end of the reactor's turn.
    """

    def __init__(self, protocol, transport, conn: H2Connection, clock=None) -> None:
        self.protocol = protocol
        self.transport = transport
        self.conn = conn
        self.clock = clock
        self.events: list = []

    def flush(self) -> list:
        """Send what the peer has to send, then L{read}."""
        data = self.conn.data_to_send()
        if data:
            self.protocol.dataReceived(data)
        return self.read()

    def read(self) -> list:
        """
        Take what txlb wrote and answer it, until the peer has nothing more
        to send; the events this brought (also kept in C{events}).
        """
        new: list = []
        for _ in range(ROUNDS):
            if self.clock is not None:
                self.clock.advance(0)
            data = self.transport.value()
            self.transport.clear()
            if data:
                new += self.conn.receive_data(data)
            more = self.conn.data_to_send()
            if not more:
                break
            self.protocol.dataReceived(more)
        self.events += new
        return new

    def of(self, kind, sid: Optional[int] = None) -> list:
        """The events of type C{kind} so far (on stream C{sid})."""
        return [e for e in self.events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)]

    def body(self, sid: int) -> bytes:
        """The DATA received on stream C{sid} so far."""
        return b"".join(e.data for e in self.of(DataReceived, sid))

    def ended(self, sid: int) -> bool:
        """The other side ended stream C{sid}."""
        return bool(self.of(StreamEnded, sid))
