# -*- test-case-name: tests.test_udp -*-
"""
UDP services: datagrams balanced by flow.

A flow is everything one client address and port sends to one of the
service's listening sockets.  Its first datagram asks the pool for a server
(L{txlb.balance.pool.Pool.pick}, as a TCP connection does: health, drain, weights,
slow start, connection limits and every scheduler apply, and C{ip_hash} or
C{consistent_hash} hash the client's IP address); the flow then keeps that
server, through a datagram socket of its own connected to the server.  What
the server sends back on that socket goes to the client from the listening
socket the client wrote to, so the client sees its answers come from the
address it asked.

A flow counts as one active connection of its server while it lives, so
C{least_connections} spreads flows, and ends when nothing has moved either
way for C{timeouts.idle}: one check per service, run eight times per idle
timeout, expires them (between one and 1 1/8 idle timeouts after the last
datagram), rather than a timer per datagram.  At most C{limits.max_flows}
flows live at once; a datagram that would start one more is dropped and
counted, as are datagrams no server can take.

When a flow's server goes down (its health checks fail, or passive
detection ejects it), the flow's next datagram ends the flow and starts a
new one on a server picked afresh.  A drained server keeps its flows until
they go idle, as a drained TCP server keeps its open connections.  When a
flow ends it logs a C{udp_flow} event.

Datagrams are never queued: UDP has no backpressure, and a datagram that
the kernel will not take (a full socket buffer) is dropped and counted, as
the network would have dropped it.
"""

from __future__ import annotations

import errno
import resource
import select
import socket
from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from txlb.balance.pool import Pool, Server, ServerState
from txlb.interfaces import PickContext
from txlb.net.endpoints import EndpointError, udpTarget
from txlb.net.splice import available as _epoll, loopFor
from txlb.observe.logs import emit
from txlb.policy.access import DENY

_log = Logger(namespace="txlb.udp")

#: The idle check runs this many times per idle timeout.
IDLE_CHECKS = 8
#: The largest datagram read or relayed (the UDP maximum over IPv4).
MAX_DATAGRAM = 65535
#: Datagrams read from one server socket per readiness event, so that one
#: busy flow cannot starve the others.
READ_BATCH = 64

_UP = ServerState.UP
_IN = getattr(select, "EPOLLIN", 0x1)
_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
#: Reasons a datagram is dropped, as C{txlb_udp_dropped} labels them.
DROP_REASONS = ("max_flows", "no_server", "socket", "send")


class ServerSocket:
    """
    One flow's datagram socket, connected to its server, read in txlb's
    epoll set (a L{txlb.net.splice.SpliceLoop}) when given one, else by the
    reactor as an C{IReadDescriptor}: the loop costs a dictionary lookup
    per readiness event where the reactor runs each in a logging context.

    Each datagram read goes to C{flow.fromServer}; "port unreachable"
    (the server's host answered with ICMP) to C{flow.refused}; a socket
    that breaks ends the flow.
    """

    mask = 0

    def __init__(self, reactor, loop, family: int, address: tuple, flow: "Flow") -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM | _FLAGS)
        try:
            if not _FLAGS:
                sock.setblocking(False)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.fd = sock.fileno()
        self.flow = flow
        self.reactor = reactor
        self.send = sock.send
        self._loop = loop
        if loop is not None:
            loop.watch(self, _IN)
        else:
            reactor.addReader(self)

    def ready(self, events: int) -> None:
        """The epoll set says the socket is readable."""
        self.doRead()

    def doRead(self) -> None:
        if self.sock is None:
            return
        recv = self.sock.recv
        flow = self.flow
        for _ in range(READ_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except ConnectionRefusedError:
                flow.refused("port unreachable")
                return
            except OSError as e:
                flow.error = e.strerror or str(e)
                flow.end("error")
                return
            flow.fromServer(data)
            if self.sock is None:
                return  # the flow ended meanwhile

    def close(self) -> None:
        if self.sock is None:
            return
        if self._loop is not None:
            self._loop.forget(self)
        else:
            self.reactor.removeReader(self)
        self.sock.close()
        self.sock = None

    def abandon(self) -> None:
        """The loop is going away, or reading failed: the flow ends."""
        self.flow.end("shutdown" if self.flow.error is None else "error")

    # IReadDescriptor, for a reactor without epoll.

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "txlb-udp"

    def connectionLost(self, reason) -> None:
        self.abandon()


def openServerSocket(reactor, loop: Optional[bool] = None) -> Callable:
    """
    What L{UDPBalancer} opens flows' server sockets with: a L{ServerSocket}
    on C{reactor}, read in the reactor's L{txlb.net.splice.SpliceLoop} (made on
    first use) where epoll exists, unless C{loop} is false.
    """
    useLoop = (_epoll and hasattr(reactor, "addReader")) if loop is None else loop

    def open_(family: int, address: tuple, flow: "Flow") -> ServerSocket:
        return ServerSocket(reactor, loopFor(reactor) if useLoop else None, family, address, flow)

    return open_


class Flow:
    """One client address and port, pinned to one server."""

    __slots__ = (
        "balancer", "listener", "address", "client", "server", "pool", "reason", "socket", "started",
        "seen", "datagramsIn", "datagramsOut", "bytesIn", "bytesOut", "answered", "ended", "error",
    )

    def __init__(self, balancer: "UDPBalancer", listener: "UDPListener", address: tuple,
                 server: Server, pool: Pool, reason: str) -> None:
        self.balancer = balancer
        self.listener = listener
        self.address = address
        self.client = address[0]
        self.server = server
        self.pool = pool
        self.reason = reason
        self.socket = None
        self.started = balancer.clock.seconds()
        self.seen = balancer.tick
        self.datagramsIn = self.datagramsOut = self.bytesIn = self.bytesOut = 0
        self.answered = False
        self.ended = False
        self.error: Optional[str] = None

    def fromClient(self, data: bytes) -> None:
        """A datagram from the client: on to the server."""
        self.seen = self.balancer.tick
        try:
            self.socket.send(data)
        except BlockingIOError:
            self.balancer.drop("send")
            return
        except ConnectionRefusedError:
            self.refused("port unreachable")
            return
        except OSError:
            self.balancer.drop("send")
            return
        n = len(data)
        self.datagramsIn += 1
        self.bytesIn += n
        self.pool.observeBytes(self.server, n, 0)

    def fromServer(self, data: bytes) -> None:
        """A datagram from the server: back to the client, from the service's address."""
        if self.ended:
            return
        self.seen = self.balancer.tick
        if not self.answered:
            self.answered = True
            self.pool.reportResult(self.server, True)
            self.pool.observeResponseTime(self.server, self.balancer.clock.seconds() - self.started)
        try:
            self.listener.sendto(data, self.address)
        except OSError:
            self.balancer.drop("send")
            return
        n = len(data)
        self.datagramsOut += 1
        self.bytesOut += n
        self.pool.observeBytes(self.server, 0, n)

    def refused(self, why: str) -> None:
        """The server's host says nothing listens there: a failure of live traffic."""
        if self.ended:
            return
        self.server.failures += 1
        self.pool.reportResult(self.server, False, why)
        self.error = why

    def end(self, why: str) -> None:
        """The flow is over: its socket closed, its server released, its event logged."""
        if self.ended:
            return
        self.ended = True
        self.balancer._ended(self, why)


class UDPListener(DatagramProtocol):
    """
    What one listening UDP socket delivers datagrams to: the flows of its
    clients, for the service that owns the socket now (L{switch}, as a
    reload points a TCP port at a new factory).
    """

    noisy = False

    def __init__(self, balancer: Optional["UDPBalancer"] = None) -> None:
        self.balancer = balancer
        self.flows: dict[tuple, Flow] = {}
        self.sendto: Callable = self._notListening

    @staticmethod
    def _notListening(data: bytes, address: tuple) -> None:
        raise OSError(errno.EBADF, "not listening")

    def switch(self, balancer: "UDPBalancer") -> None:
        """Another service owns this socket from now on; the old one's flows end."""
        if balancer is not self.balancer:
            self.endAll("service changed")
            self.balancer = balancer

    def startProtocol(self) -> None:
        self.sendto = self.transport.getHandle().sendto

    def stopProtocol(self) -> None:
        self.sendto = self._notListening
        self.endAll("shutdown")

    def endAll(self, why: str) -> None:
        for flow in list(self.flows.values()):
            flow.end(why)

    def datagramReceived(self, data: bytes, address: tuple) -> None:
        flow = self.flows.get(address)
        if flow is None or flow.server.health is not _UP or flow.server.ejectedUntil:
            balancer = self.balancer
            if balancer is None:
                return
            flow = balancer.start(self, address, flow)
            if flow is None:
                return
        flow.fromClient(data)


class UDPBalancer:
    """
    One UDP service: its settings, its flows over all its listeners, the
    idle check and the counters.

    @param clock: an C{IReactorTime}, for the idle check and durations.
    @param openSocket: C{openSocket(family, address, flow)} returns a
        flow's connected server socket (L{openServerSocket}), with
        C{send(data)} and C{close()}, which hands what it reads to the
        flow's C{fromServer} and C{refused}.
    """

    #: The service's C{allow}/C{deny} (a L{txlb.policy.access.AccessList}),
    #: or L{None}: a datagram from a client it refuses is dropped before
    #: any flow starts, and counted (C{txlb_refused_total}).
    access = None
    connectionLimits = None

    def __init__(
        self,
        service: str,
        pool: Pool,
        clock,
        openSocket: Callable,
        *,
        idleTimeout: float = 60.0,
        maxFlows: int = 10_000,
        accessLog: bool = True,
        metrics=None,
    ) -> None:
        self.service = service
        self.clock = clock
        self.openSocket = openSocket
        self.idleTimeout = idleTimeout
        self.maxFlows = maxFlows
        self.accessLog = accessLog
        #: A L{txlb.observe.metrics.Metrics} to count flows in, or L{None}.
        self.metrics = metrics
        #: Every live flow (of every listener).
        self.open: set[Flow] = set()
        #: The idle check's count: a flow remembers the count when it last moved.
        self.tick = 0
        #: Datagrams dropped, by reason (L{DROP_REASONS}).
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._reported = dict(self.dropped)
        #: Datagrams and bytes of ended flows, by C{(pool, server)}:
        #: C{[datagrams in, datagrams out, bytes in, bytes out]}.
        self.totals: dict[tuple[str, str], list[int]] = {}
        self._targets: dict[str, tuple[int, tuple]] = {}
        self._check = None
        self.pool = None
        self.setPool(pool)
        _warnDescriptors(service, maxFlows)

    def setPool(self, pool: Pool) -> None:
        """Pick from C{pool} from now on (a reload); flows keep the server they have."""
        if pool is self.pool:
            return
        if self.pool is not None:
            self.pool.unwatch(self)
        self.pool = pool
        pool.watch(self)

    # The pool's watcher: a flow whose server leaves the pool ends.

    def serverAdded(self, server: Server) -> None:
        pass

    def serverRemoved(self, server: Server) -> None:
        self._targets.pop(server.address, None)
        for flow in [f for f in self.open if f.server is server]:
            flow.end("server_removed")

    # Flows.

    def start(self, listener: UDPListener, address: tuple, old: Optional[Flow]) -> Optional[Flow]:
        """
        A new flow for C{address} on C{listener}, replacing C{old} (whose
        server went down), or L{None} when the datagram is to be dropped.
        """
        if old is not None:
            old.end("server_down")
        access = self.access
        if access is not None and not access.allows(address[0]):
            if self.metrics is not None:
                self.metrics.refused(self.service, DENY)
            return None
        if len(self.open) >= self.maxFlows:
            self.drop("max_flows")
            return None
        pool = self.pool
        decision = pool.pick(PickContext(address[0]))
        if decision is None:
            self.drop("no_server")
            return None
        server = decision.server
        flow = Flow(self, listener, address, server, pool, decision.reason)
        try:
            family, target = self._target(server)
            flow.socket = self.openSocket(family, target, flow)
        except (OSError, EndpointError) as e:
            pool.release(server)
            self.drop("socket")
            _log.warn("service {service}: no socket to server {server}: {why}", event="udp_socket_failed",
                      service=self.service, pool=pool.name, server=server.name, why=str(e))
            return None
        listener.flows[address] = flow
        self.open.add(flow)
        if self.metrics is not None:
            self.metrics.connectionStarted(self.service)
        if self._check is None:
            self._scheduleCheck()
        return flow

    def _target(self, server: Server) -> tuple[int, tuple]:
        """The address family and socket address of C{server} (parsed once)."""
        target = self._targets.get(server.address)
        if target is None:
            host, port = udpTarget(server.address)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            target = self._targets[server.address] = (family, (host, port))
        return target

    def drop(self, reason: str) -> None:
        """Count a datagram dropped (reported by the next idle check)."""
        self.dropped[reason] += 1
        if self._check is None:
            self._scheduleCheck()

    def _ended(self, flow: Flow, why: str) -> None:
        listener = flow.listener
        if listener.flows.get(flow.address) is flow:
            del listener.flows[flow.address]
        self.open.discard(flow)
        if flow.socket is not None:
            flow.socket.close()
        server, pool = flow.server, flow.pool
        pool.release(server)
        key = (pool.name, server.name)
        totals = self.totals.get(key)
        if totals is None:
            totals = self.totals[key] = [0, 0, 0, 0]
        totals[0] += flow.datagramsIn
        totals[1] += flow.datagramsOut
        totals[2] += flow.bytesIn
        totals[3] += flow.bytesOut
        if self.metrics is not None:
            self.metrics.request(self.service, pool, server, 0, None, flow.bytesIn, flow.bytesOut, 0, None,
                                 flow.reason)
        if not self.accessLog:
            return
        fields = dict(
            service=self.service,
            pool=pool.name,
            selectedServer=server.name,
            client=flow.client,
            clientPort=flow.address[1],
            datagramsIn=flow.datagramsIn,
            datagramsOut=flow.datagramsOut,
            bytesIn=flow.bytesIn,
            bytesOut=flow.bytesOut,
            durationMs=round((self.clock.seconds() - flow.started) * 1000, 3),
            ended=why,
        )
        if flow.error:
            fields["error"] = flow.error
        emit(_log, "udp_flow", fields)

    # The idle check.

    def _scheduleCheck(self) -> None:
        self._check = self.clock.callLater(self.idleTimeout / IDLE_CHECKS, self._checkIdle)

    def _checkIdle(self) -> None:
        """
        End the flows idle for C{idleTimeout}, and report what was dropped
        since the last check: one timer for the whole service.
        """
        self._check = None
        self.tick += 1
        oldest = self.tick - IDLE_CHECKS
        for flow in [f for f in self.open if f.seen < oldest]:
            flow.end("idle")
        self._reportDrops()
        if self.open:
            self._scheduleCheck()

    def _reportDrops(self) -> None:
        if self.dropped == self._reported:
            return
        since = {r: n - self._reported[r] for r, n in self.dropped.items() if n != self._reported[r]}
        self._reported = dict(self.dropped)
        _log.warn(
            "service {service}: datagrams dropped: {dropped}", event="udp_dropped",
            service=self.service, dropped=since, flows=len(self.open), maxFlows=self.maxFlows,
        )

    # What the service and the metrics call.

    def counters(self) -> dict[tuple[str, str], list[int]]:
        """
        Datagrams and bytes so far, ended and live flows together, by
        C{(pool, server)}: C{[datagrams in, datagrams out, bytes in, bytes out]}.
        """
        return {key: values[1:] for key, values in self.figures().items()}

    def figures(self) -> dict[tuple[str, str], list[int]]:
        """
        L{counters} with the live flows in front, by C{(pool, server)}:
        C{[flows, datagrams in, datagrams out, bytes in, bytes out]}; what
        C{/api/stats} and the status page show.  Read when asked, from
        the flows themselves: nothing is counted per datagram for it.
        """
        out = {key: [0, *values] for key, values in self.totals.items()}
        for flow in list(self.open):
            key = (flow.pool.name, flow.server.name)
            values = out.get(key)
            if values is None:
                values = out[key] = [0, 0, 0, 0, 0]
            values[0] += 1
            values[1] += flow.datagramsIn
            values[2] += flow.datagramsOut
            values[3] += flow.bytesIn
            values[4] += flow.bytesOut
        return out

    def finish(self) -> None:
        """The service is removed: its flows end now."""
        for flow in list(self.open):
            flow.end("shutdown")
        self.pool.unwatch(self)

    def drain(self, timeout: float) -> Deferred:
        """
        Shutting down, the listeners closed: a flow can no longer answer
        its client, so every flow ends now.
        """
        for flow in list(self.open):
            flow.end("shutdown")
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        self._reportDrops()
        return succeed(None)


def _warnDescriptors(service: str, maxFlows: int) -> None:
    """Each flow holds a file descriptor: say so when the limit would stop them first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < maxFlows + 64:
        _log.warn(
            "service {service}: limits.max_flows = {maxFlows}, but this process may open only {soft} "
            "files (one per flow): raise the limit (ulimit -n, systemd LimitNOFILE=) or lower max_flows",
            event="udp_descriptors", service=service, maxFlows=maxFlows, soft=soft,
        )
