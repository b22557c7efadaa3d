# -*- test-case-name: tests.test_tcp -*-
"""
Open connections of one listener, and waiting for them to end: what a
graceful shutdown (and later a reload) needs from every kind of service.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

C = TypeVar("C")


class OpenConnections(Generic[C]):
    """
    The set of open connections, with L{drain} to wait for it to empty.

    @param abort: called on each connection still open when a drain's
        time is up.
    """

    def __init__(self, clock, abort: Callable[[C], None]) -> None:
        self.clock = clock
        self.abort = abort
        self.open: set[C] = set()
        self._waiting: list[Deferred] = []

    def __len__(self) -> int:
        return len(self.open)

    def add(self, conn: C) -> None:
        self.open.add(conn)

    def remove(self, conn: C) -> None:
        self.open.discard(conn)
        if not self.open and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred:
        """
        Fire once every open connection has ended, aborting those still
        open after C{timeout} seconds.
        """
        if not self.open:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        call = self.clock.callLater(timeout, self._abortAll)
        d.addBoth(lambda result: call.cancel() if call.active() else None)
        return d

    def _abortAll(self) -> None:
        for conn in list(self.open):
            self.abort(conn)
