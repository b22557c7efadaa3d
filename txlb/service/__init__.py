# -*- test-case-name: tests.test_reload -*-
"""
The service tree built from a config: pools, listeners, demo backends and
the log observer.

Listening happens in L{TxlbService.privilegedStartService}, before twistd
drops privileges and before the reactor runs, so that a port that cannot be
bound stops txlb at once with a one-line error instead of a half-started
balancer.

L{TxlbService.reload} (C{SIGHUP}, C{POST /api/reload}) reads the file
again and applies what changed in place: see L{txlb.control.reload}.  Each port
accepts through an L{_Entry} that a reload points at the service's current
factory, so that a port is never closed and reopened for a change of
settings or certificates.
"""

from __future__ import annotations

import gc
import signal
import socket
from typing import Mapping, Optional

import attrs

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from txlb.control.admin import adminSite, readToken
from txlb.control.cluster import ClusterService, Standalone
from txlb.config import (
    Config, ConfigError, PoolConfig, ServerConfig, ServiceConfig, describeTransforms, load,
)
from txlb.demo import demoService
from txlb.control.dns import DNSService, Responder
from txlb.net.endpoints import EndpointCache, isUDP, parseUDPListen, sameSocket
from txlb.http.backend import BackendConnections
from txlb.http.compress import Compression
from txlb.http.frontend import HTTPProxyFactory, HTTPService
from txlb.http.h2frontend import H2Connection
from txlb.http.routing import Route, Router
from txlb.health import HealthChecks, healthCheckFactories
from txlb.interfaces import IHealthCheckFactory, ISchedulerFactory
from txlb.observe.logs import LogFile, accessTo, makeObserver, reopenOnSignal
from txlb.observe.metrics import Metrics
from txlb.config._admission import describeAdmission
from txlb.policy.build import Policies
from txlb.policy.headers import compileRules
from txlb.policy.redirect import Redirect
from txlb.balance.pool import Pool, Server
from txlb.net.proxyproto import ProxyAcceptor, networks
from txlb.control.reload import ConfigDiff, ServerDiff, describe, diffConfigs, diffServers, serversOnly
from txlb.control.sdnotify import SystemdService
from txlb.balance.sessions import makeStore
from txlb.balance.sticky import Sticky
from txlb.tcp import TCPBalancerFactory
from txlb.net.tls import ServerTLS
from txlb.udp import MAX_DATAGRAM, UDPBalancer, UDPListener, openServerSocket

_log = Logger(namespace="txlb")


class ListenError(SystemExit):
    """A listening endpoint could not be opened: txlb does not start."""


class _Refused(Exception):
    """A reload that validated cannot be applied (a port, a certificate)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = errors


@attrs.frozen
class Reloaded:
    """
    What a reload did.  C{errors} is empty when it was applied, else the
    problems (one line each) and nothing changed.
    """

    path: str
    errors: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def buildPool(config: PoolConfig, factories: Mapping[str, ISchedulerFactory], clock) -> Pool:
    pool = Pool(
        config.name,
        config.algorithm,
        factories[config.algorithm](config.options),
        [Server(s.name, s.address, s.weight) for s in config.servers],
        clock,
        **_poolSettings(config),
    )
    pool.tls = config.tls
    pool.protocol = config.protocol
    _warnUnverified(config)
    return pool


def _poolSettings(config: PoolConfig) -> dict:
    return dict(
        retries=config.retries,
        connectTimeout=config.connect_timeout,
        hashKey=config.hash_key,
        passive=(config.passive.consecutive_failures, config.passive.eject_for) if config.passive else None,
        maxConnections=config.max_connections,
        queueTimeout=config.queue_timeout,
        slowStart=config.slow_start,
    )


def _warnUnverified(config: PoolConfig) -> None:
    if config.tls is not None and not config.tls.verify:
        _log.warn(
            "pool {pool}: TLS to its servers is not verified (tls.verify = false)",
            event="tls_unverified", pool=config.name,
        )


class _Entry(Factory):
    """
    What one listening port accepts connections with: the factory of the
    service that owns the port now.  A reload points it elsewhere (new
    certificates, a rebuilt service) without closing the port.
    """

    noisy = False

    def __init__(self, factory: Optional[Factory] = None) -> None:
        self.factory = factory

    def switch(self, factory: Factory) -> None:
        old, self.factory = self.factory, factory
        if self.numPorts and old is not factory:
            factory.doStart()
            if old is not None:
                old.doStop()

    def startFactory(self) -> None:
        if self.factory is not None:
            self.factory.doStart()

    def stopFactory(self) -> None:
        if self.factory is not None:
            self.factory.doStop()

    def buildProtocol(self, addr):
        return None if self.factory is None else self.factory.buildProtocol(addr)


@attrs.define
class _Balancer:
    """
    One running service: C{factory} balances and counts its connections;
    C{entry} is what its ports accept with (C{factory}, behind TLS when the
    service has C{tls}).
    """

    config: ServiceConfig
    factory: Factory
    entry: Factory


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
        self._sessionsFor(config)
        #: C{allow}/C{deny} and rate limits, compiled (L{txlb.policy.build}).
        self.policies = Policies(reactor, self)
        self.policies.configure(config)
        self.healthFactories = healthCheckFactories() if healthFactories is None else healthFactories
        self.healthChecks: dict[str, HealthChecks] = {}
        if role != "worker":
            for name, poolConfig in config.pools.items():
                self._startHealth(self._healthChecks(self.pools[name], poolConfig))
        #: The worker processes of a master (L{txlb.service.workers.Workers}).
        self.workers = None
        if role == "master":
            from txlb.service.workers import Workers

            self.workers = Workers(self, config.txlb.workers, reactor)
            self.workers.setServiceParent(self)
        self.balancers: dict[str, _Balancer] = {}
        for service in config.services:
            self._addBalancer(service, self._factory(service), self._tls(service))
        self._entries: dict[str, _Entry] = {}
        self._pointEntries()
        self.admin = None
        if config.admin is not None and role != "worker":
            token = readToken(config.admin.token_file) if config.admin.token_file else None
            self.admin = self._adminSite(token)
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
        self._reloading = DeferredLock()
        self._stopping = False
        #: systemd's notifications (L{txlb.control.sdnotify}), for the process
        #: systemd started: a single process or a master, under twistd.
        self.systemd: Optional[SystemdService] = None
        if signals and role != "worker":
            self.systemd = SystemdService(self, reactor)
            self.systemd.setServiceParent(self)

    # Building.

    def _adminSite(self, token: Optional[str]):
        return adminSite(self.pools, token, self.metrics, reload=self.reload, workers=self.workers)

    def _healthChecks(self, pool: Pool, config: PoolConfig) -> HealthChecks:
        return HealthChecks(pool, config.health, self.endpoints, self.reactor, self.healthFactories,
                            metrics=self.metrics)

    def _startHealth(self, checks: HealthChecks) -> None:
        self.healthChecks[checks.pool.name] = checks
        checks.setServiceParent(self)

    def _stopHealth(self, name: str) -> None:
        checks = self.healthChecks.pop(name, None)
        if checks is not None:
            checks.disownServiceParent()
            checks.pool.unwatch(checks)

    def _addBalancer(self, service: ServiceConfig, factory: Factory, tls) -> None:
        if service.protocol != "http":  # an HTTP service's are in its router
            factory.access = self.policies.access(service)
            factory.connectionLimits = self.policies.connections(service)
        entry = self._acceptProxy(service, self._secure(service, factory, tls))
        self.balancers[service.name] = _Balancer(service, factory, entry)
        pools = (service.pool, *(r.pool for r in service.routes if r.pool not in (service.pool, None)))
        self.metrics.addService(service.name, service.protocol, tuple(dict.fromkeys(pools)), factory,
                                policy=describeTransforms(service) + describeAdmission(service))

    @property
    def listeners(self) -> list[tuple[str, str, Factory]]:
        """C{(service name, listen endpoint, factory)} of every service listener."""
        return [(name, listen, b.entry) for name, b in self.balancers.items() for listen in b.config.listen]

    def _pointEntries(self) -> None:
        """Point each listen endpoint's L{_Entry} at its service's factory."""
        for _, listen, factory in self.listeners:
            entry = self._entries.get(listen)
            if entry is None:
                entry = self._entries[listen] = _newEntry(listen)
            entry.switch(factory)

    def _tls(self, service: ServiceConfig) -> Optional[ServerTLS]:
        """A service's certificates, read from their files now, or L{None}."""
        if service.tls is None:
            return None
        alpn = ([b"h2", b"http/1.1"] if service.http2 else [b"http/1.1"]) if service.protocol == "http" else []
        return ServerTLS(service.tls.certificates, service.tls.min_version, alpn)

    def _secure(self, service: ServiceConfig, factory: Factory, creator: Optional[ServerTLS] = None) -> Factory:
        """The factory to listen with: C{factory}, behind TLS when the service has C{tls}."""
        if service.tls is None:
            return factory
        if creator is None:
            creator = self._tls(service)
        secured = TLSMemoryBIOFactory(creator, False, factory)
        secured.noisy = False
        secured.drain = factory.drain
        secured.open = factory.open
        return secured

    def _acceptProxy(self, service: ServiceConfig, entry: Factory) -> Factory:
        """C{entry}, behind a PROXY header reader when the service has C{accept_proxy} (outside TLS)."""
        accept = service.accept_proxy
        if accept is None:
            return entry
        reader = ProxyAcceptor(entry, service.name, self.reactor, trusted=networks(accept.trusted),
                               timeout=accept.timeout, metrics=self.metrics)
        reader.drain = getattr(entry, "drain", None)
        reader.open = getattr(entry, "open", None)
        return reader

    def _factory(self, service: ServiceConfig) -> TCPBalancerFactory | HTTPProxyFactory | UDPBalancer:
        if service.protocol == "udp":
            return UDPBalancer(
                service.name,
                self.pools[service.pool],
                self.reactor,
                openServerSocket(self.reactor),
                idleTimeout=service.timeouts.idle,
                maxFlows=service.limits.max_flows,
                accessLog=self.config.log.access,
                metrics=self.metrics,
            )
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
                proxyProtocol=service.proxy_protocol,
            )
        settings = self._httpSettings(service)
        factory = HTTPProxyFactory(
            HTTPService(service.name, self.pools, settings.pop("router"), self.connections, self.reactor,
                        sticky=self._sticky(service), **settings)
        )
        factory.service.metrics = self.metrics
        factory.http2 = H2Connection
        return factory

    def _sticky(self, service: ServiceConfig) -> Optional[Sticky]:
        if service.sticky is None:
            return None
        return Sticky(service.name, service.sticky, self.sessions, secure=service.tls is not None)

    def _sessionsFor(self, config: Config) -> None:
        """Make the session store when a service of C{config} first needs one."""
        if self.sessions is None and any(s.sticky is not None and s.sticky.mode != "cookie" for s in config.services):
            self.sessions = makeStore(config.sessions, self.reactor)
            if hasattr(self.sessions, "setServiceParent"):
                self.sessions.setServiceParent(self)

    def _httpSettings(self, service: ServiceConfig) -> dict:
        """What an L{HTTPService} takes from its config (and a reload updates)."""
        rules, compress = compileRules(service.header_rules), Compression.fromConfig(service.compress)
        serviceAdmission, routeAdmissions = self.policies.http(service)
        routes = [
            Route(
                r.pool,
                host=r.host,
                path_prefix=r.path_prefix,
                methods=frozenset(m.encode("ascii") for m in r.methods),
                headers={k.lower().encode("latin-1"): v.encode("latin-1") for k, v in r.headers.items()},
                # A route's header rules apply after its service's; its compress replaces the service's.
                rules=rules if r.header_rules is None else compileRules(service.header_rules, r.header_rules),
                compress=compress if r.compress is None else Compression.fromConfig(r.compress),
                redirect=Redirect.fromConfig(r.redirect, r.path_prefix),
                admission=admission,
            )
            for r, admission in zip(service.routes, routeAdmissions)
        ]
        return dict(
            router=Router(service.pool, routes, rules, compress, serviceAdmission),
            clientTimeout=service.timeouts.client,
            backendTimeout=service.timeouts.backend,
            idleTimeout=service.timeouts.idle,
            maxHeaderBytes=service.limits.max_header_bytes,
            maxBody=service.limits.max_body,
            http2=service.http2,
            maxStreams=service.limits.max_concurrent_streams,
            forwarded=service.forwarded,
            accessLog=self.config.log.access,
            proto=b"https" if service.tls is not None else b"http",
            cacheConfig=service.cache,
        )

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

    def _listen(self, name: str, listen: str, factory: Factory, late):
        """
        Listen on C{listen} now, or raise L{ListenError}.  Endpoints that
        answer later (not TCP) report a late failure to C{late}.
        """
        if isUDP(listen):
            port, interface = parseUDPListen(listen)
            try:
                return self.reactor.listenUDP(port, factory, interface=interface, maxPacketSize=MAX_DATAGRAM)
            except CannotListenError as e:
                raise ListenError(f"txlb: service {name}: cannot listen on {listen!r}: {e.socketError}")
        d = serverFromString(self.reactor, listen).listen(factory)
        result: list = []
        d.addBoth(result.append)
        if result:
            if isinstance(result[0], Failure):
                raise ListenError(
                    f"txlb: service {name}: cannot listen on {listen!r}: {result[0].getErrorMessage()}"
                )
            return result[0]
        d.addCallbacks(lambda port: port, late, errbackArgs=(name, listen))
        return d

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
                    self.ports[listen] = self._listenService(name, listen, self._entries[listen],
                                                             self._lateListenFailure)
                    opened.append(listen)
        except ListenError:
            for listen in opened:
                self._stopListening(self.ports.pop(listen))
            raise
        if self.workers is not None:
            self.workers.startAll()
        if self.running:
            for listen in opened:
                _log.info("service {service} listening on {listen}", event="listening",
                          service=self._owner(listen), listen=listen)

    def closeListeners(self) -> Deferred:
        """
        Stop listening on the services' endpoints (open connections go on);
        fires when every port is closed.
        """
        self.listening = False
        ports, self.ports = self.ports, {}
        stopped = self.workers.stopAll() if self.workers is not None else None
        return gatherResults([self._stopListening(p) for p in ports.values()] + ([stopped] if stopped else []))

    def _listenService(self, name: str, listen: str, entry: Factory, late):
        """
        Listen on a service's endpoint: as L{_listen} in a single process;
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
        return self._listen(name, listen, entry, late)

    def _owner(self, listen: str) -> str:
        for name, l, _ in self.listeners:
            if l == listen:
                return name
        return ""

    @staticmethod
    def _stopListening(port) -> Deferred:
        if isinstance(port, Deferred):
            return port.addCallback(lambda p: p.stopListening() if p is not None else None)
        return maybeDeferred(port.stopListening)

    def privilegedStartService(self) -> None:
        try:
            if self.config.cluster.mode != "active-passive":
                self.openListeners()
            if self.admin is not None:
                self.adminPort = self._listen("admin", self.config.admin.listen, self.admin, self._lateListenFailure)
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
        return gatherResults([self._stopListening(p) for p in ports])

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

    # Reloading.

    def reload(self) -> Deferred:
        """
        Read the config file again; when it validates (as at startup,
        plugins included) apply the difference in place, else keep the
        running config.  Logs C{config_reloaded} or C{config_rejected}.

        @return: a L{Deferred} firing with a L{Reloaded} (never failing).
            Reloads are applied one at a time.
        """
        return self._reloading.run(self._notifiedReload)

    def _notifiedReload(self) -> Reloaded:
        """L{_reload}, with systemd told and the reload metrics set."""
        if self.systemd is not None:
            self.systemd.reloading()
        try:
            result = self._reload()
        finally:
            if self.systemd is not None:
                self.systemd.reloaded()
        self.metrics.reloaded(result.ok, self.reactor.seconds())
        return result

    def _reload(self) -> Reloaded:
        path = self.config.path
        old = self.config
        try:
            new = load(path, self.factories, self.healthFactories)
            changes = self.apply(new)
        except ConfigError as e:
            return self._rejected(path, e.lines())
        except _Refused as e:
            return self._rejected(path, e.errors)
        except Exception:
            _log.failure("reloading {path}", path=path, event="config_reload_failed")
            return self._rejected(path, ["internal error while applying the config (see the log)"])
        _log.info(
            "config {path} reloaded: {count} changes", event="config_reloaded",
            path=path, errors=[], changes=changes, count=len(changes),
        )
        if self.workers is not None:
            self._reloadWorkers(old, new)
        return Reloaded(path, (), tuple(changes))

    def _reloadWorkers(self, old: Config, new: Config) -> None:
        """
        A master's workers after a reload: servers only (and no
        certificates to read again) are sent as state; anything else starts
        new workers, which read the file again, and stops the old ones
        once the new ones accept.
        """
        if serversOnly(old, new) and not any(s.tls is not None for s in new.services):
            self.workers.changed()
        else:
            self.workers.restartAll()

    @staticmethod
    def _rejected(path: str, errors: list[str]) -> Reloaded:
        _log.warn(
            "config {path} rejected, the running config stays: {errors}", event="config_rejected",
            path=path, errors=list(errors),
        )
        return Reloaded(path, tuple(errors))

    def apply(self, new: Config) -> list[str]:
        """
        Make the running service what C{new} (validated) says, in place;
        return a line per change.  Everything that can fail (certificates,
        the admin token, schedulers, health-check kinds, new ports) is done
        first: when one fails, L{_Refused} is raised and nothing changed.
        """
        old = self.config
        diff = diffConfigs(old, new)
        prepared = self._prepare(new, diff)
        servers = self._commit(new, diff, prepared)
        return describe(diff, servers)

    def _prepare(self, new: Config, diff: ConfigDiff) -> dict:
        errors: list[str] = []
        tls, schedulers, checks, pools = {}, {}, {}, {}
        for i, service in enumerate(new.services):
            try:
                tls[service.name] = self._tls(service)
            except Exception as e:
                errors.append(f"services[{i}].tls: {e}")
        for p in diff.poolsChanged:
            config = new.pools[p.name]
            try:
                if p.scheduler:
                    schedulers[p.name] = self.factories[config.algorithm](config.options)
                if p.health:
                    checks[p.name] = self._healthChecks(self.pools[p.name], config)
            except Exception as e:
                errors.append(f"pools.{p.name}: {e}")
        for name in diff.poolsAdded:
            try:
                pools[name] = buildPool(new.pools[name], self.factories, self.reactor)
                checks[name] = self._healthChecks(pools[name], new.pools[name])
            except Exception as e:
                errors.append(f"pools.{name}: {e}")
        token = None
        if new.admin is not None and new.admin.token_file:
            try:
                token = readToken(new.admin.token_file)
            except ValueError as e:
                errors.append(f"admin.token_file: {e}")
        if errors:
            raise _Refused(errors)
        opened: dict[str, object] = {}
        adminPort = site = None
        try:
            if self.listening:
                for listen in diff.listenAdded:
                    for running in list(self.ports):
                        if running in diff.listenRemoved and sameSocket(listen, running):
                            raise _Refused([
                                f"{listen!r} is the socket {running!r} listens on, written differently: "
                                "write it the same way, or move it in two reloads"
                            ])
                    entry = self._entries[listen] = self._entries.get(listen) or _newEntry(listen)
                    opened[listen] = self._listenService(self._ownerIn(new, listen), listen, entry,
                                                         self._reloadListenFailure)
            if new.admin is not None and new.admin.listen != _adminListen(self.config):
                site = self.admin or self._adminSite(token)
                adminPort = self._listen("admin", new.admin.listen, site, self._reloadListenFailure)
        except (ListenError, _Refused) as e:
            for port in opened.values():
                self._stopListening(port)
            for listen in opened:
                self._entries.pop(listen, None)
            raise _Refused(e.errors if isinstance(e, _Refused) else [str(e.code).removeprefix("txlb: ")])
        return dict(tls=tls, schedulers=schedulers, checks=checks, pools=pools, token=token,
                    opened=opened, adminPort=adminPort, adminSite=site)

    def _commit(self, new: Config, diff: ConfigDiff, prepared: dict) -> list[tuple[str, ServerDiff]]:
        old, self.config = self.config, new
        # Pools first: services point at them.
        for name in diff.poolsRemoved:
            self._stopHealth(name)
        live = {name: prepared["pools"].get(name) or self.pools[name] for name in new.pools}
        self.pools.clear()
        self.pools.update(live)  # in the file's order, for the admin API
        for p in diff.poolsChanged:
            pool, config = self.pools[p.name], new.pools[p.name]
            pool.configure(**_poolSettings(config))
            if pool.tls != config.tls:
                pool.tls = config.tls
                _warnUnverified(config)
            pool.protocol = config.protocol
            if p.scheduler:
                pool.setScheduler(config.algorithm, prepared["schedulers"][p.name])
        for name, checks in prepared["checks"].items():
            self._stopHealth(name)
            self._startHealth(checks)
        servers = []
        for name, config in new.pools.items():
            if name not in diff.poolsAdded:
                changed = _applyServers(self.pools[name], config.servers)
                if changed:
                    servers.append((name, changed))
        # Services.
        self._sessionsFor(new)
        self.policies.configure(new)
        for name in diff.servicesRemoved:
            self._retire(self.balancers.pop(name).factory)
            self.metrics.services.pop(name, None)
        rebuilt = {s.name for s in diff.servicesChanged if s.rebuild}
        balancers = {}
        for service in new.services:
            current = self.balancers.get(service.name)
            if current is None or service.name in rebuilt:
                if current is not None:
                    self._retire(current.factory)
                factory = self._factory(service)
            else:
                factory = current.factory
                self._update(factory, service)
            self._addBalancer(service, factory, prepared["tls"][service.name])
            balancers[service.name] = self.balancers.pop(service.name)
        self.balancers.clear()
        self.balancers.update(balancers)
        # Listeners: new ones are open; point every port at its service,
        # then close the ones no longer wanted.
        self._pointEntries()
        self.ports.update(prepared["opened"])
        for listen in prepared["opened"]:
            _log.info("service {service} listening on {listen}", event="listening",
                      service=self._owner(listen), listen=listen)
        for listen in diff.listenRemoved:
            self._entries.pop(listen, None)
            port = self.ports.pop(listen, None)
            if port is not None:
                self._stopListening(port)
                _log.info("no longer listening on {listen}", event="stopped_listening", listen=listen)
        # The admin API.
        if prepared["adminPort"] is not None:
            self.admin = prepared["adminSite"]
            self.admin.resource.cluster = self.cluster
            oldPort, self.adminPort = self.adminPort, prepared["adminPort"]
            if oldPort is not None:
                self._stopListening(oldPort)
            _log.info("service {service} listening on {listen}", event="listening",
                      service="admin", listen=new.admin.listen)
        elif new.admin is None and self.adminPort is not None:
            self._stopListening(self.adminPort)
            self.adminPort = None
            _log.info("no longer listening on {listen}", event="stopped_listening", listen=_adminListen(old))
        if self.admin is not None:
            self.admin.resource.token = prepared["token"]
        return servers

    def _ownerIn(self, config: Config, listen: str) -> str:
        for service in config.services:
            if listen in service.listen:
                return service.name
        return ""

    def _reloadListenFailure(self, failure: Failure, name: str, listen: str) -> None:
        _log.failure("service {name}: cannot listen on {listen}", failure, name=name, listen=listen,
                     event="listen_failed")

    def _update(self, factory: Factory, service: ServiceConfig) -> None:
        """New settings for a running service's next requests and connections."""
        if isinstance(factory, HTTPProxyFactory):
            factory.service.update(**self._httpSettings(service))
        elif isinstance(factory, UDPBalancer):
            factory.setPool(self.pools[service.pool])
            factory.idleTimeout = service.timeouts.idle
            factory.maxFlows = service.limits.max_flows
            factory.accessLog = self.config.log.access
        else:
            factory.pool = self.pools[service.pool]
            factory.idleTimeout = service.timeouts.idle
            factory.accessLog = self.config.log.access
            factory.proxyProtocol = service.proxy_protocol

    def _retire(self, factory: Factory) -> None:
        """
        A service removed or rebuilt: its connections finish on their own
        (HTTP: after the request in hand), and are drained at shutdown.
        """
        if isinstance(factory, (HTTPProxyFactory, UDPBalancer)):
            factory.finish()
        if len(factory.open):
            self.retired.add(factory)


def settleHeap() -> None:
    """
    Once running, take what start-up built (modules, config, pools: alive
    for the whole run) out of the cyclic collector's view.

    A proxy's per-request objects are freed by reference counting when the
    request ends, so under load the collector seldom runs; but when it runs
    a full collection it walks the whole start-up heap, a pause of about
    15 ms measured under keep-alive load, which lands in the latency tail.
    After C{gc.freeze} a full collection walks only what was made since.
    """
    gc.collect()
    gc.freeze()


def _newEntry(listen: str):
    """What a new listening socket delivers to: an L{_Entry}, or a L{UDPListener} for C{udp:}."""
    return UDPListener() if isUDP(listen) else _Entry()


def _adminListen(config: Config) -> Optional[str]:
    return config.admin.listen if config.admin is not None else None


def _applyServers(pool: Pool, wanted) -> ServerDiff:
    """Make C{pool}'s servers the file's (see L{diffServers})."""
    live = [ServerConfig(s.name, s.address, s.configuredWeight) for s in pool]
    diff = diffServers(live, {s.name for s in pool if s.removing}, wanted)
    for name in diff.removed:
        pool.delete(pool.server(name))
    for name in diff.restored:
        pool.enable(pool.server(name))
    for config in diff.moved:
        server = pool.server(config.name)
        pool.remove(server)
        server.address = config.address
        pool.add(server)
    for name, weight in diff.reweighted:
        pool.setWeight(pool.server(name), weight)
    for config in diff.added:
        pool.add(Server(config.name, config.address, config.weight))
    return diff
