# -*- test-case-name: tests.test_reload -*-
"""
The service tree built from a config: pools, listeners, health checks, the
admin API, the cluster, demo backends and the log observer; and its life:
listening, starting, stopping on a signal, draining.

Listening happens in L{TxlbService.privilegedStartService}, before twistd
drops privileges and before the reactor runs, so that a port that cannot be
bound stops txlb at once with a one-line error instead of a half-started
balancer.  What the factories are made of is L{txlb.service.build}; how a
reload changes the tree in place is L{txlb.service.apply}; worker processes
are L{txlb.service.workers} (the master's side) and L{txlb.service.worker}.
"""

from __future__ import annotations

import gc
import signal
import socket
from typing import Mapping, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from txlb.balance.pool import Pool
from txlb.balance.sessions import makeStore
from txlb.config import Config, PoolConfig, ServiceConfig, describeTransforms
from txlb.config._admission import describeAdmission
from txlb.control.admin import adminSite, readToken
from txlb.control.cluster import ClusterService, Standalone
from txlb.control.dns import DNSService, Responder
from txlb.control.sdnotify import SystemdService
from txlb.demo import demoService
from txlb.health import HealthChecks, healthCheckFactories
from txlb.http.backend import BackendConnections
from txlb.interfaces import IHealthCheckFactory, ISchedulerFactory
from txlb.net.endpoints import EndpointCache, isUDP
from txlb.observe.logs import LogFile, accessTo, makeObserver, reopenOnSignal
from txlb.observe.metrics import Metrics
from txlb.policy.build import Policies
from txlb.service.apply import Reloads
from txlb.service.build import Balancer, Factories, buildPool
from txlb.service.ports import ListenError, listenNow, newEntry, stopListening
from txlb.udp import MAX_DATAGRAM

_log = Logger(namespace="txlb")


class TxlbService(MultiService):
    """
    The root of txlb's service tree.

    @ivar pools: the live L{Pool}s by name (one dict for the life of the
        process: the admin API, metrics and HTTP services hold it).
    @ivar balancers: the running services by name.
    @ivar ports: the open listening ports of the services, by endpoint.
    @ivar signals: install the handlers of C{SIGHUP} (reload), C{SIGTERM}
        and C{SIGINT} (stop, exit status 0) once the reactor runs.
    """

    def __init__(
        self,
        config: Config,
        factories: Mapping[str, ISchedulerFactory],
        reactor,
        healthFactories: Optional[Mapping[str, IHealthCheckFactory]] = None,
        *,
        signals: bool = False,
        role: str = "single",
        sockets: Optional[Mapping[str, tuple[int, int]]] = None,
        logObserver=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.factories = factories
        self.signals = signals
        #: C{single}: one process does everything (C{workers = 1}).
        #: C{master}: checks health, answers the admin API, and has worker
        #: processes (L{txlb.service.workers}) serve the listeners.  C{worker}: serves
        #: the listeners on the sockets the master handed down, with the
        #: master's pool state (L{txlb.service.worker}).
        self.role = role
        #: A worker's inherited sockets: C{{listen: (fd, family, backlog)}}.
        self.sockets = dict(sockets or {})
        self.logObserver = logObserver if logObserver is not None else makeObserver(config.log, clock=reactor)
        self.endpoints = EndpointCache(reactor)
        self.pools = {name: buildPool(p, factories, reactor) for name, p in config.pools.items()}
        self.connections = BackendConnections(self.endpoints, reactor)
        self.metrics = Metrics(self.pools, reactor)
        self.metrics.setServiceParent(self)
        #: The sticky-session store, made only when some service needs one.
        self.sessions = None
        self.sessionsFor(config)
        #: C{allow}/C{deny} and rate limits, compiled (L{txlb.policy.build}).
        self.policies = Policies(reactor, self)
        self.policies.configure(config)
        self.healthFactories = healthCheckFactories() if healthFactories is None else healthFactories
        self.healthChecks: dict[str, HealthChecks] = {}
        if role != "worker":
            for name, poolConfig in config.pools.items():
                self.startHealth(self.healthChecksFor(self.pools[name], poolConfig))
        #: The worker processes of a master (L{txlb.service.workers.Workers}).
        self.workers = None
        if role == "master":
            from txlb.service.workers import Workers

            self.workers = Workers(self, config.txlb.workers, reactor)
            self.workers.setServiceParent(self)
        #: Makes and updates the services' factories (L{txlb.service.build}).
        self.build = Factories(self)
        self.balancers: dict[str, Balancer] = {}
        for service in config.services:
            self.addBalancer(service, self.build.make(service), None)
        #: What each listening endpoint accepts with, by endpoint string.
        self.entries: dict[str, object] = {}
        self.pointEntries()
        self.admin = None
        if config.admin is not None and role != "worker":
            token = readToken(config.admin.token_file) if config.admin.token_file else None
            self.admin = self.adminSite(token)
        #: This node's part in a cluster (L{txlb.control.cluster}); in an
        #: active-passive one, it opens the services' listeners when this
        #: node becomes active and closes them when it must stop.
        self.clusterService: Optional[ClusterService] = None
        if config.cluster.mode == "standalone" or role == "worker":
            self.cluster = Standalone(config.cluster, reactor)
        else:
            self.clusterService = ClusterService(config.cluster, reactor, self, lambda: self.pools)
            self.clusterService.setServiceParent(self)
            self.cluster = self.clusterService.cluster
        if self.admin is not None:
            self.admin.resource.cluster = self.cluster
        if config.dns is not None and role != "worker":
            responder = Responder(config.dns.name, config.dns.ttl, self.cluster.addresses)
            DNSService(config.dns.listen, responder, reactor).setServiceParent(self)
        if config.demo and role != "worker":
            demoService(reactor, config.demo).setServiceParent(self)
        self.ports: dict[str, object] = {}
        self.adminPort = None
        #: Whether the services' listeners should be open (see L{openListeners}).
        self.listening = False
        #: Factories of services a reload removed or rebuilt, whose
        #: connections are still open: drained with the others at shutdown.
        self.retired: set[Factory] = set()
        self.reloads = Reloads(self)
        self._stopping = False
        #: systemd's notifications (L{txlb.control.sdnotify}), for the process
        #: systemd started: a single process or a master, under twistd.
        self.systemd: Optional[SystemdService] = None
        if signals and role != "worker":
            self.systemd = SystemdService(self, reactor)
            self.systemd.setServiceParent(self)

    # Building.

    def adminSite(self, token: Optional[str]):
        """The admin API's site, over this tree's pools, metrics and workers."""
        return adminSite(self.pools, token, self.metrics, reload=self.reload, workers=self.workers)

    def healthChecksFor(self, pool: Pool, config: PoolConfig) -> HealthChecks:
        """The health checks of C{pool} as C{config} says, not started."""
        return HealthChecks(pool, config.health, self.endpoints, self.reactor, self.healthFactories,
                            metrics=self.metrics)

    def startHealth(self, checks: HealthChecks) -> None:
        self.healthChecks[checks.pool.name] = checks
        checks.setServiceParent(self)

    def stopHealth(self, name: str) -> None:
        checks = self.healthChecks.pop(name, None)
        if checks is not None:
            checks.disownServiceParent()
            checks.pool.unwatch(checks)

    def addBalancer(self, service: ServiceConfig, factory: Factory, tls) -> None:
        """Run C{factory} as C{service}: its policies, its entry behind TLS, its metrics."""
        if service.protocol != "http":  # an HTTP service's are in its router
            factory.access = self.policies.access(service)
            factory.connectionLimits = self.policies.connections(service)
        self.balancers[service.name] = Balancer(service, factory, self.build.entry(service, factory, tls))
        pools = (service.pool, *(r.pool for r in service.routes if r.pool not in (service.pool, None)))
        self.metrics.addService(service.name, service.protocol, tuple(dict.fromkeys(pools)), factory,
                                policy=describeTransforms(service) + describeAdmission(service))

    @property
    def listeners(self) -> list[tuple[str, str, Factory]]:
        """C{(service name, listen endpoint, factory)} of every service listener."""
        return [(name, listen, b.entry) for name, b in self.balancers.items() for listen in b.config.listen]

    def pointEntries(self) -> None:
        """Point each listen endpoint's L{Entry<txlb.service.ports.Entry>} at its service's factory."""
        for _, address, factory in self.listeners:
            entry = self.entries.get(address)
            if entry is None:
                entry = self.entries[address] = newEntry(address)
            entry.switch(factory)

    def sessionsFor(self, config: Config) -> None:
        """Make the session store when a service of C{config} first needs one."""
        if self.sessions is None and any(s.sticky is not None and s.sticky.mode != "cookie" for s in config.services):
            self.sessions = makeStore(config.sessions, self.reactor)
            if hasattr(self.sessions, "setServiceParent"):
                self.sessions.setServiceParent(self)

    # Starting and stopping.

    def setServiceParent(self, parent) -> None:
        """
        Under twistd, the parent is the application: give it our log
        observer, which twistd then uses for everything it logs.
        """
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.logObserver)
            accessTo(self.logObserver)  # the process's log: access events go straight to it
        super().setServiceParent(parent)

    def openListeners(self) -> None:
        """
        Listen on every service's endpoints (not the admin API's; those
        already open stay as they are).

        @raise ListenError: one cannot be opened; those this call opened
            are closed again.
        """
        self.listening = True
        opened = []
        try:
            for name, listen, _ in self.listeners:
                if listen not in self.ports:
                    self.ports[listen] = self.listenService(name, listen, self.entries[listen], self._lateListenFailure)
                    opened.append(listen)
        except ListenError:
            for listen in opened:
                stopListening(self.ports.pop(listen))
            raise
        if self.workers is not None:
            self.workers.startAll()
        if self.running:
            for listen in opened:
                _log.info("service {service} listening on {listen}", event="listening",
                          service=self.serviceOn(listen), listen=listen)

    def closeListeners(self) -> Deferred:
        """
        Stop listening on the services' endpoints (open connections go on);
        fires when every port is closed.
        """
        self.listening = False
        ports, self.ports = self.ports, {}
        stopped = self.workers.stopAll() if self.workers is not None else None
        return gatherResults([stopListening(p) for p in ports.values()] + ([stopped] if stopped else []))

    def listenService(self, name: str, listen: str, entry: Factory, late):
        """
        Listen on a service's endpoint: as L{txlb.service.ports.listenNow} in a single process;
        in a master, bind the sockets its workers accept on; in a worker,
        accept on the socket the master handed down.
        """
        if self.role == "master":
            try:
                return self.workers.bind(listen)
            except (CannotListenError, OSError, ValueError) as e:
                raise ListenError(f"txlb: service {name}: cannot listen on {listen!r}: {e}")
        if self.role == "worker":
            fd, family, backlog = self.sockets[listen]
            skt = socket.socket(fileno=fd)
            try:
                if isUDP(listen):
                    return self.reactor.adoptDatagramPort(skt.fileno(), family, entry, maxPacketSize=MAX_DATAGRAM)
                skt.listen(backlog)  # the master bound it; its first worker makes it listen
                return self.reactor.adoptStreamPort(skt.fileno(), family, entry)
            finally:
                skt.close()  # the port has its own copy
        return listenNow(self.reactor, name, listen, entry, late)

    def serviceOn(self, address: str) -> str:
        """The name of the service that listens on C{address}, or C{""}."""
        for name, listen, _ in self.listeners:
            if listen == address:
                return name
        return ""

    def privilegedStartService(self) -> None:
        try:
            if self.config.cluster.mode != "active-passive":
                self.openListeners()
            if self.admin is not None:
                self.adminPort = listenNow(self.reactor, "admin", self.config.admin.listen, self.admin,
                                        self._lateListenFailure)
        except ListenError:
            self._closePorts()
            raise
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            self._closePorts()
            raise ListenError(f"txlb: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")

    def _lateListenFailure(self, failure: Failure, name: str, listen: str) -> None:
        _log.failure("service {name}: cannot listen on {listen}", failure, name=name, listen=listen, event="listen_failed")
        self.reactor.stop()

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(settleHeap)
        # Events are flushed in batches: write out the last ones on the way out.
        self.reactor.addSystemEventTrigger("after", "shutdown", self.logObserver.flush)
        if isinstance(self.logObserver.stream, LogFile) and self.role != "worker":
            reopenOnSignal(self.logObserver, self.reactor)
            if self.workers is not None:
                from txlb.service.workers import forwardSignal

                forwardSignal(self.workers, self.reactor, signal.SIGUSR1)
        for name, listen, _ in self.listeners:
            if listen in self.ports and self.role != "worker":
                _log.info("service {service} listening on {listen}", event="listening", service=name, listen=listen)
        if self.adminPort is not None:
            _log.info("service {service} listening on {listen}", event="listening",
                      service="admin", listen=self.config.admin.listen)
        if self.signals:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            # After the reactor's own handlers, which it installs as it starts.
            self.reactor.callWhenRunning(self._handleStopSignals)

    def _handleStopSignals(self) -> None:
        """
        C{SIGTERM} and C{SIGINT} stop the reactor, and so this service
        (gracefully: L{stopService}).  Unlike the reactor's own handlers,
        these do not leave the signal for twistd to raise again at exit: a
        stop that an operator asked for and that went well exits with 0.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda n, frame: self.reactor.callFromThread(self._stopOnSignal, n))

    def _stopOnSignal(self, signum: int) -> None:
        if self._stopping:
            return
        self._stopping = True
        _log.info("{signal}: stopping", event="signal", signal=signal.Signals(signum).name)
        self.reactor.stop()

    def _closePorts(self) -> Deferred:
        ports = list(self.ports.values())
        self.ports = {}
        if self.adminPort is not None:
            ports.append(self.adminPort)
            self.adminPort = None
        return gatherResults([stopListening(p) for p in ports])

    def stopService(self) -> Deferred:
        """
        Stop accepting, then let open connections finish for up to
        C{txlb.shutdown_timeout} before closing the rest.
        """
        self._stopping = True
        if self.clusterService is not None:
            # Leave the cluster first: another node takes the lease while
            # this one drains.
            self.clusterService.stopService()
        factories = [b.factory for b in self.balancers.values() if hasattr(b.factory, "drain")]
        factories += [f for f in self.retired if f not in factories]
        inFlight = sum(len(f.open) for f in factories)
        _log.info(
            "stopping: {inFlight} connections may finish within {timeout}s",
            event="shutdown",
            inFlight=inFlight,
            timeout=self.config.txlb.shutdown_timeout,
        )
        d = self._closePorts()
        if self.workers is not None:
            # Each worker drains its own connections; the master waits for them.
            d = gatherResults([d, self.workers.stopAll()])
        d.addCallback(
            lambda _: gatherResults([f.drain(self.config.txlb.shutdown_timeout) for f in factories])
        )
        d.addCallback(lambda _: self.connections.closeIdle())
        d.addCallback(lambda _: super(TxlbService, self).stopService())
        return d

    # Reloading (L{txlb.service.apply}).

    def reload(self) -> Deferred:
        """
        Read the config file again and apply what changed in place, or keep
        the running config: a L{Deferred} firing with a L{Reloaded<txlb.service.apply.Reloaded>}, never
        failing.  Reloads are applied one at a time.
        """
        return self.reloads.reload()

    def apply(self, new: Config) -> list[str]:
        """Make the running tree what C{new} (validated) says: one line per change."""
        return self.reloads.apply(new)


#: The cycle collector's thresholds once txlb runs (L{settleHeap}).
GC_THRESHOLDS = (5000, 10, 100)


def settleHeap() -> None:
    """
    Once running, take what start-up built (modules, config, pools: alive
    for the whole run) out of the cyclic collector's view.

    A proxy's per-request objects are freed by reference counting when the
    request ends, so under load the collector seldom runs; but when it runs
    a full collection it walks the whole start-up heap, a pause of about
    15 ms measured under keep-alive load, which lands in the latency tail.
    After C{gc.freeze} a full collection walks only what was made since.

    And the collector runs less often than its defaults say.  A request
    allocates tens of containers, nearly all freed by reference counting
    when it ends; a young collection every 700 allocations (the default)
    ran several times in a request's life, each walking every request in
    flight, and with the start-up heap frozen the full collections came
    every ten middle ones.  At 100 HTTP/2 streams per connection that was
    2.9 µs of collector per request; with a young collection every 5000
    allocations and a full one at most every hundred middle ones, 1.2.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
