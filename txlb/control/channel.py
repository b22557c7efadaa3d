# -*- test-case-name: tests.test_workers -*-
"""
The control channel between the master process and a worker process
(C{[txlb] workers > 1}): one JSON object per line, both ways.

Two kinds of message share the channel:

  - a notice, C{{"op": ...}}, that expects no answer (the master's pool
    state, a worker's ejection of a server);
  - a request, C{{"op": ..., "id": N}}, answered by C{{"reply": N,
    "result": ...}} or C{{"reply": N, "error": "..."}} (the master asking
    a worker for its figures).

JSON never holds a raw newline, so a line is a message; a message longer
than L{MAX_MESSAGE} means the peer is broken, and the channel closes.  The
channel only frames and matches: what the messages mean is
L{txlb.service.workers} (master) and L{txlb.service.worker} (worker).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger(namespace="txlb.control.channel")

#: The longest line accepted; a worker's Prometheus text for thousands of
#: servers stays far below it.
MAX_MESSAGE = 64 * 1024 * 1024

#: Events about servers that the master logs (its pools decide); a worker
#: logging them too would say everything N + 1 times.
POOL_EVENTS = frozenset({
    "server_state", "server_added", "server_draining", "server_drained", "server_removed",
    "server_ejected", "server_enabled",
})

#: The file descriptor a worker writes its control messages to.
CONTROL_FD = 3

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class ChannelClosed(Exception):
    """The peer went away before answering."""


class RemoteError(Exception):
    """The peer could not answer a request; the message says why."""


class ControlChannel:
    """
    One end of the channel.

    @param write: sends bytes to the peer (a transport's C{write}).
    @param handle: called with each request or notice received; for a
        request, its result (or a L{Deferred} of it) is the answer.
    @param close: called when the peer sent something unreadable.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        handle: Callable[[dict], Any],
        close: Optional[Callable[[], None]] = None,
    ) -> None:
        self.write = write
        self.handle = handle
        self.close = close
        self._buffer = b""
        self._pending: dict[int, Deferred] = {}
        self._next = 0
        self.closed = False

    # Sending.

    def notify(self, message: dict) -> None:
        """Send C{message}; nothing comes back."""
        if not self.closed:
            self.write(_encode(message).encode("utf-8") + b"\n")

    def request(self, message: dict) -> Deferred:
        """
        Send C{message} and fire with the peer's result, or fail with
        L{RemoteError} or L{ChannelClosed}.  The caller adds its own
        timeout (C{Deferred.addTimeout}); a late answer is then dropped.
        """
        if self.closed:
            return _failed(ChannelClosed())
        self._next += 1
        ident = self._next
        d = Deferred(lambda _: self._pending.pop(ident, None))
        self._pending[ident] = d
        self.notify({**message, "id": ident})
        return d

    # Receiving.

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        if b"\n" not in data:
            self._buffer = buffer
            if len(buffer) > MAX_MESSAGE:
                self._broken("a message longer than the limit")
            return
        *lines, self._buffer = buffer.split(b"\n")
        for line in lines:
            if self.closed:
                return
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                self._broken("a line that is not JSON")
                return
            if not isinstance(message, dict):
                self._broken("a message that is not an object")
                return
            self._received(message)

    def _received(self, message: dict) -> None:
        if "reply" in message:
            d = self._pending.pop(message["reply"], None)
            if d is None:
                return  # answered after its request timed out
            if "error" in message:
                d.errback(RemoteError(str(message["error"])))
            else:
                d.callback(message.get("result"))
            return
        ident = message.get("id")
        d = maybeDeferred(self.handle, message)
        if ident is None:
            d.addErrback(lambda f: _log.failure("control message {op}", f, op=message.get("op")))
            return
        d.addCallbacks(
            lambda result: self.notify({"reply": ident, "result": result}),
            lambda f: self._answerError(ident, message, f),
        )

    def _answerError(self, ident: int, message: dict, failure: Failure) -> None:
        _log.failure("control request {op}", failure, op=message.get("op"))
        self.notify({"reply": ident, "error": failure.getErrorMessage()})

    def _broken(self, what: str) -> None:
        _log.error("control channel: the peer sent {what}; closing it", what=what, event="control_broken")
        self.connectionLost()
        if self.close is not None:
            self.close()

    def connectionLost(self) -> None:
        """The peer is gone: every request waiting for it fails."""
        self.closed = True
        self._buffer = b""
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ChannelClosed())


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
