# -*- test-case-name: tests.test_service -*-
"""
The service tree built from a config: pools, listeners, demo backends and
the log observer.

Listening happens in L{TxlbService.privilegedStartService}, before twistd
drops privileges and before the reactor runs, so that a port that cannot be
bound stops txlb at once with a one-line error instead of a half-started
balancer.
"""

from __future__ import annotations

from typing import Mapping, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from txlb.admin import adminSite, readToken
from txlb.config import Config, PoolConfig, ServiceConfig
from txlb.demo import demoService
from txlb.endpoints import EndpointCache
from txlb.http.backend import BackendConnections
from txlb.http.frontend import HTTPProxyFactory, HTTPService
from txlb.http.routing import Route, Router
from txlb.health import HealthChecks, healthCheckFactories
from txlb.interfaces import IHealthCheckFactory, ISchedulerFactory
from txlb.logs import makeObserver, reopenOnSignal
from txlb.metrics import Metrics
from txlb.pool import Pool, Server
from txlb.sessions import makeStore
from txlb.sticky import Sticky
from txlb.tcp import TCPBalancerFactory
from txlb.tls import ServerTLS

_log = Logger(namespace="txlb")


class ListenError(SystemExit):
    """A listening endpoint could not be opened: txlb does not start."""


def buildPool(config: PoolConfig, factories: Mapping[str, ISchedulerFactory], clock) -> Pool:
    pool = Pool(
        config.name,
        config.algorithm,
        factories[config.algorithm](config.options),
        [Server(s.name, s.address, s.weight) for s in config.servers],
        clock,
        retries=config.retries,
        connectTimeout=config.connect_timeout,
        hashKey=config.hash_key,
        passive=(config.passive.consecutive_failures, config.passive.eject_for) if config.passive else None,
        maxConnections=config.max_connections,
        queueTimeout=config.queue_timeout,
        slowStart=config.slow_start,
    )
    pool.tls = config.tls
    if config.tls is not None and not config.tls.verify:
        _log.warn(
            "pool {pool}: TLS to its servers is not verified (tls.verify = false)",
            event="tls_unverified", pool=config.name,
        )
    return pool


class TxlbService(MultiService):
    """
    The root of txlb's service tree.

    @ivar pools: the live L{Pool}s by name.
    @ivar ports: the listening ports, once started.
    """

    def __init__(
        self,
        config: Config,
        factories: Mapping[str, ISchedulerFactory],
        reactor,
        healthFactories: Optional[Mapping[str, IHealthCheckFactory]] = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.logObserver = makeObserver(config.log, clock=reactor)
        self.endpoints = EndpointCache(reactor)
        self.pools = {name: buildPool(p, factories, reactor) for name, p in config.pools.items()}
        self.connections = BackendConnections(self.endpoints, reactor)
        self.metrics = Metrics(self.pools, reactor)
        self.metrics.setServiceParent(self)
        #: The sticky-session store, made only when some service needs one.
        self.sessions = None
        if any(s.sticky is not None and s.sticky.mode != "cookie" for s in config.services):
            self.sessions = makeStore(config.sessions, reactor)
            if hasattr(self.sessions, "setServiceParent"):
                self.sessions.setServiceParent(self)
        healthFactories = healthCheckFactories() if healthFactories is None else healthFactories
        for name, poolConfig in config.pools.items():
            HealthChecks(self.pools[name], poolConfig.health, self.endpoints, reactor, healthFactories,
                         metrics=self.metrics).setServiceParent(self)
        self.listeners: list[tuple[str, str, Factory]] = []
        for service in config.services:
            factory = self._factory(service)
            pools = (service.pool, *(r.pool for r in service.routes if r.pool != service.pool))
            self.metrics.addService(service.name, service.protocol, tuple(dict.fromkeys(pools)), factory)
            for listen in service.listen:
                self.listeners.append((service.name, listen, self._secure(service, factory)))
        if config.admin is not None:
            token = readToken(config.admin.token_file) if config.admin.token_file else None
            self.listeners.append(("admin", config.admin.listen, adminSite(self.pools, token, self.metrics)))
        if config.demo:
            demoService(reactor, config.demo).setServiceParent(self)
        self.ports: list = []

    def _secure(self, service: ServiceConfig, factory: Factory) -> Factory:
        """The factory to listen with: C{factory}, behind TLS when the service has C{tls}."""
        if service.tls is None:
            return factory
        alpn = [b"http/1.1"] if service.protocol == "http" else []
        creator = ServerTLS(service.tls.certificates, service.tls.min_version, alpn)
        secured = TLSMemoryBIOFactory(creator, False, factory)
        secured.noisy = False
        secured.drain = factory.drain
        secured.open = factory.open
        return secured

    def _factory(self, service: ServiceConfig) -> TCPBalancerFactory | HTTPProxyFactory:
        if service.protocol == "tcp":
            return TCPBalancerFactory(
                service.name,
                self.pools[service.pool],
                self.endpoints,
                self.reactor,
                idleTimeout=service.timeouts.idle,
                accessLog=self.config.log.access,
                metrics=self.metrics,
                sticky=self._sticky(service),
            )
        routes = [
            Route(
                r.pool,
                host=r.host,
                path_prefix=r.path_prefix,
                methods=frozenset(m.encode("ascii") for m in r.methods),
                headers={k.lower().encode("latin-1"): v.encode("latin-1") for k, v in r.headers.items()},
            )
            for r in service.routes
        ]
        factory = HTTPProxyFactory(
            HTTPService(
                service.name,
                self.pools,
                Router(service.pool, routes),
                self.connections,
                self.reactor,
                clientTimeout=service.timeouts.client,
                backendTimeout=service.timeouts.backend,
                idleTimeout=service.timeouts.idle,
                maxHeaderBytes=service.limits.max_header_bytes,
                maxBody=service.limits.max_body,
                forwarded=service.forwarded,
                accessLog=self.config.log.access,
                proto=b"https" if service.tls is not None else b"http",
                sticky=self._sticky(service),
            )
        )
        factory.service.metrics = self.metrics
        return factory

    def _sticky(self, service: ServiceConfig) -> Optional[Sticky]:
        if service.sticky is None:
            return None
        return Sticky(service.name, service.sticky, self.sessions, secure=service.tls is not None)

    def setServiceParent(self, parent) -> None:
        """
        Under twistd, the parent is the application: give it our log
        observer, which twistd then uses for everything it logs.
        """
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.logObserver)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        for name, listen, factory in self.listeners:
            d = serverFromString(self.reactor, listen).listen(factory)
            failure: list[Failure] = []
            d.addCallbacks(self.ports.append, failure.append)
            if failure:
                self._closePorts()
                raise ListenError(f"txlb: service {name}: cannot listen on {listen!r}: {failure[0].getErrorMessage()}")
            if isinstance(d, Deferred) and not d.called:
                d.addErrback(self._lateListenFailure, name, listen)
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
        # Events are flushed in batches: write out the last ones on the way out.
        self.reactor.addSystemEventTrigger("after", "shutdown", self.logObserver.flush)
        if self.config.log.path != "-":
            reopenOnSignal(self.logObserver, self.reactor)
        for name, listen, _ in self.listeners:
            _log.info("service {service} listening on {listen}", event="listening", service=name, listen=listen)

    def _closePorts(self) -> Deferred:
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(p.stopListening) for p in ports])

    def stopService(self) -> Deferred:
        """
        Stop accepting, then let open connections finish for up to
        C{txlb.shutdown_timeout} before closing the rest.
        """
        factories = {id(f): f for _, _, f in self.listeners if hasattr(f, "drain")}.values()
        inFlight = sum(len(f.open) for f in factories)
        _log.info(
            "stopping: {inFlight} connections may finish within {timeout}s",
            event="shutdown",
            inFlight=inFlight,
            timeout=self.config.txlb.shutdown_timeout,
        )
        d = self._closePorts()
        d.addCallback(
            lambda _: gatherResults([f.drain(self.config.txlb.shutdown_timeout) for f in factories])
        )
        d.addCallback(lambda _: self.connections.closeIdle())
        d.addCallback(lambda _: super(TxlbService, self).stopService())
        return d
