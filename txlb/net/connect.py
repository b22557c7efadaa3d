# -*- test-case-name: tests.test_tcp -*-
"""
Connecting a TCP balancer's backend socket without Twisted's connector,
and timing out many connects with one timer.

A plaintext TCP service splices its two sockets together
(L{txlb.net.splice}), so the Twisted transport, protocol, factory wrapper and
L{Deferred} that C{endpoint.connect} builds for the backend would only be
thrown away once connected.  For a server address that is a literal IP
(L{txlb.net.endpoints.EndpointCache.plainTCP}) L{connectSocket} makes the
socket itself; on loopback and fast networks the handshake is over by the
time C{connect} returns, and a second C{connect} says so without a trip
through the reactor.  Otherwise L{PendingConnect} watches the socket, in
the epoll set where it will be spliced (L{txlb.net.splice.SpliceLoop}), until
it is writable.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections import deque
from typing import Callable, Hashable, Optional


_CONNECTED = frozenset({0, errno.EISCONN})
_PENDING = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN})
_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


def connectSocket(family: int, address: tuple) -> tuple[Optional[socket.socket], int]:
    """
    Start connecting a non-blocking TCP socket to C{address}.

    @return: C{(sock, 0)} when connected already, C{(sock, EINPROGRESS)}
        while the handshake goes on, C{(None, errno)} when it failed (the
        socket is closed).
    """
    try:
        sock = socket.SocketType(family, socket.SOCK_STREAM | _FLAGS)
    except OSError as e:
        return None, e.errno or errno.EMFILE
    if not _FLAGS:
        sock.setblocking(False)
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        # Asking again costs one system call and, when the handshake is
        # already over, saves registering, polling and unregistering.
        err = sock.connect_ex(address)
    if err in _CONNECTED:
        return sock, 0
    if err in _PENDING:
        return sock, errno.EINPROGRESS
    sock.close()
    return None, err


class PendingConnect:
    """
    A socket whose connect is under way, watched until it is writable in a
    L{txlb.net.splice.SpliceLoop} (where the connected socket will be spliced).

    Exactly one of C{connected(sock)} or C{failed(why)} is called: when the
    handshake ends, or when L{cancel} gives up on it (the socket is closed
    first).  C{connected} may hand the socket's place in the loop to its
    new handler; if it does not, the socket leaves the loop.
    """

    mask = 0

    def __init__(self, loop, sock: socket.socket, connected: Callable[[socket.socket], None],
                 failed: Callable[[str], None]) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.connected = connected
        self.failed = failed
        self.done = False

    def start(self) -> None:
        self.loop.watch(self, select.EPOLLOUT)

    def ready(self, events: int) -> None:
        """Writable, or an error or hang-up: C{SO_ERROR} says which."""
        if self.done:
            return
        self.done = True
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.loop.forget(self)
            self.sock.close()
            self.failed(os.strerror(err))
            return
        try:
            self.connected(self.sock)
        finally:
            if self.loop.sockets.get(self.fd) is self:
                self.loop.watch(self, 0)

    def abandon(self) -> None:
        self.cancel("internal error")

    def cancel(self, why: str = "connect cancelled") -> None:
        """Stop waiting: close the socket and report C{why} as the failure."""
        if self.done:
            return
        self.done = True
        self.loop.forget(self)
        self.sock.close()
        self.failed(why)


class Deadlines:
    """
    Timeouts for many waits with one timer: C{expire()} is called for a key
    that was not L{discard}ed within its time.

    Waits of the same length (one pool's connect timeout) end in the order
    they began, so each length keeps a first-in first-out queue, and the one
    timer is set for the earliest end among the queues' heads.  Adding and
    discarding cost a queue entry and a dictionary entry, not a timer.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self._queues: dict[float, deque[tuple[float, Hashable]]] = {}
        self._waiting: dict[Hashable, tuple[tuple[float, Hashable], Callable[[], None]]] = {}
        self._call = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, key: Hashable, seconds: float, expire: Callable[[], None]) -> None:
        """Call C{expire()} in C{seconds} unless C{key} is discarded first (or added again)."""
        when = self.clock.seconds() + seconds
        entry = (when, key)
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = deque()
        queue.append(entry)
        self._waiting[key] = (entry, expire)
        call = self._call
        if call is None:
            self._call = self.clock.callLater(seconds, self._expire)
        elif when < call.getTime():
            call.reset(seconds)

    def discard(self, key: Hashable) -> None:
        """C{key} finished in time."""
        self._waiting.pop(key, None)

    def _expire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        waiting = self._waiting
        expired = []
        earliest = None
        for seconds, queue in list(self._queues.items()):
            while queue:
                entry = queue[0]
                when, key = entry
                current = waiting.get(key)
                if current is None or current[0] is not entry:
                    queue.popleft()  # discarded, or added again since
                elif when <= now:
                    queue.popleft()
                    del waiting[key]
                    expired.append(current[1])
                else:
                    if earliest is None or when < earliest:
                        earliest = when
                    break
            else:
                del self._queues[seconds]
        if earliest is not None:
            self._call = self.clock.callLater(earliest - now, self._expire)
        for expire in expired:
            expire()
