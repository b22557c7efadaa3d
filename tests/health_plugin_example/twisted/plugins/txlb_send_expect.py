"""
A txlb health-check plugin: "send_expect" connects, sends options.send
(if any) and passes when the server's answer starts with options.expect,
e.g. a Redis PING answered by +PONG.
"""

from typing import Mapping

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from txlb.interfaces import (
    CheckResult,
    HealthCheckOptionsError,
    IHealthCheck,
    IHealthCheckFactory,
)


class SendExpect(Protocol):
    def __init__(self, send: bytes, expect: bytes, done: Deferred) -> None:
        self.send, self.expect, self.done = send, expect, done
        self.received = b""

    def connectionMade(self) -> None:
        if self.done.called:  # cancelled while connecting
            self.transport.abortConnection()
        elif self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.expect) or not self.expect.startswith(self.received):
            self.transport.loseConnection()
            self.finish()

    def connectionLost(self, reason) -> None:
        self.finish()

    def finish(self) -> None:
        if not self.done.called:
            ok = self.received.startswith(self.expect)
            answer = self.received[:60].decode("utf-8", "replace").strip()
            self.done.callback(CheckResult(ok, f"answered {answer!r}"))


@implementer(IHealthCheck)
class SendExpectCheck:
    def __init__(self, send: bytes, expect: bytes) -> None:
        self.send, self.expect = send, expect

    def check(self, server, endpoint, config) -> Deferred:
        def cancel(done: Deferred) -> None:
            # txlb cancels at health.timeout and when it stops: close up.
            connecting.cancel()
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        done = Deferred(cancel)
        protocol = SendExpect(self.send, self.expect, done)
        connecting = connectProtocol(endpoint, protocol)
        connecting.addErrback(lambda failure: done.called or done.errback(failure))
        return done


@implementer(IPlugin, IHealthCheckFactory)
class SendExpectFactory:
    name = "send_expect"
    description = "send options.send; pass when the answer starts with options.expect"

    def __call__(self, options: Mapping[str, object]) -> IHealthCheck:
        unknown = set(options) - {"send", "expect"}
        if unknown:
            raise HealthCheckOptionsError(f"unknown option {', '.join(sorted(unknown))}")
        send, expect = options.get("send", ""), options.get("expect")
        if not isinstance(expect, str) or not expect:
            raise HealthCheckOptionsError("expect must be a non-empty string")
        if not isinstance(send, str):
            raise HealthCheckOptionsError("send must be a string")
        return SendExpectCheck(send.encode(), expect.encode())


sendExpect = SendExpectFactory()
