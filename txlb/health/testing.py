# -*- test-case-name: tests.test_health -*-
"""
Test doubles for people who write txlb health checks.

A check is driven exactly as txlb drives it -- C{check(server, endpoint,
config)} with an endpoint parsed from the server's address -- but on a
L{MemoryReactorClock}, the server's side played by the test through a
L{StringTransport}: no sockets, no waiting.

    from txlb.health.testing import CheckHarness, verifyHealthCheckFactory

    verifyHealthCheckFactory(myFactory)
    h = CheckHarness(myFactory({"send": "PING\\r\\n", "expect": "+PONG"}))
    h.connect()                 # the server accepts
    assert h.sent() == b"PING\\r\\n"
    h.receive(b"+PONG\\r\\n")     # and answers
    assert h.result.ok
"""

from __future__ import annotations

from typing import Optional, Union

from twisted.internet import error
from twisted.internet.endpoints import clientFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from txlb.balance.pool import Server
from txlb.config import HealthConfig
from txlb.interfaces import CheckResult, IHealthCheck, IHealthCheckFactory

__all__ = ["CheckHarness", "verifyHealthCheckFactory"]


class CheckHarness:
    """
    One run of a check against a pretend server.

    @param check: the L{IHealthCheck} under test.
    @param config: the pool's health config; C{HealthConfig(kind="test")}
        by default.
    @param address: the server's address (a TCP endpoint string).
    @ivar results: what the check's Deferred fired with (a L{CheckResult}
        or a L{Failure}); empty while the check is under way.
    """

    def __init__(
        self,
        check: IHealthCheck,
        config: Optional[HealthConfig] = None,
        address: str = "tcp:host=10.0.0.5:port=8080",
        name: str = "server-1",
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.server = Server(name, address)
        self.config = config or HealthConfig(kind="test")
        self.transport = StringTransport()
        self.protocol = None
        self.results: list[Union[CheckResult, Failure]] = []
        endpoint = clientFromString(self.reactor, address)
        self.deferred = check.check(self.server, endpoint, self.config)
        self.deferred.addBoth(self._done)

    def _done(self, result):
        self.results.append(result)
        return None

    @property
    def result(self) -> Union[CheckResult, Failure, None]:
        """The check's outcome, or L{None} while it is under way."""
        if len(self.results) > 1:
            raise AssertionError(f"the check answered {len(self.results)} times")
        return self.results[0] if self.results else None

    def connect(self) -> "CheckHarness":
        """The server accepts the connection the check asked for."""
        factory = self.reactor.tcpClients[-1][2]
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return self

    def refuse(self) -> "CheckHarness":
        """The connection attempt is refused."""
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(error.ConnectionRefusedError())
        )
        return self

    def sent(self) -> bytes:
        """What the check has written so far."""
        return self.transport.value()

    def receive(self, data: bytes) -> "CheckHarness":
        """The server sends C{data}."""
        self.protocol.dataReceived(data)
        return self

    def close(self) -> "CheckHarness":
        """The server closes the connection."""
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        return self

    def cancel(self) -> "CheckHarness":
        """txlb gives up on the check (its timeout, or shutdown)."""
        self.deferred.cancel()
        return self

    @property
    def stoppedConnecting(self) -> bool:
        """The check gave up a connection attempt still under way."""
        return bool(self.reactor.connectors) and self.reactor.connectors[-1].stoppedConnecting

    @property
    def closed(self) -> bool:
        """The check closed (or aborted) its connection."""
        return self.transport.disconnecting or self.transport.disconnected


def verifyHealthCheckFactory(factory: IHealthCheckFactory, options: Optional[dict] = None) -> IHealthCheck:
    """
    The contract every health-check factory keeps: it provides
    L{IHealthCheckFactory} with a text C{name} and C{description}, and makes
    an L{IHealthCheck} from C{options}.  Returns that check.
    """
    verifyObject(IHealthCheckFactory, factory)
    if not isinstance(factory.name, str) or not factory.name or factory.name == "none":
        raise AssertionError(f"{factory!r}: name must be a non-empty string other than 'none'")
    if not isinstance(factory.description, str):
        raise AssertionError(f"{factory!r}: description must be a string")
    check = factory(options or {})
    verifyObject(IHealthCheck, check)
    return check
