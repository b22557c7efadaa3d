# -*- test-case-name: tests.test_reload -*-
"""
Building the running objects from the config's: a pool from a
L{PoolConfig}, and from a L{ServiceConfig} the factory that balances its
connections, behind TLS and a PROXY-header reader when the service has
them.

What is built here holds no listening port and starts nothing: the
service tree (L{txlb.service.tree}) decides when to listen, and a reload
(L{txlb.service.apply}) builds first and swaps in only once everything
built.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from txlb.balance.pool import Pool, Server
from txlb.balance.sticky import Sticky
from txlb.config import PoolConfig, ServiceConfig
from txlb.http.compress import Compression
from txlb.http.frontend import HTTPProxyFactory, HTTPService
from txlb.http.h2frontend import H2Connection
from txlb.http.routing import Route, Router
from txlb.interfaces import ISchedulerFactory
from txlb.net.proxyproto import ProxyAcceptor, networks
from txlb.net.tls import ServerTLS
from txlb.policy.headers import compileRules
from txlb.policy.redirect import Redirect
from txlb.tcp import TCPBalancerFactory
from txlb.udp import UDPBalancer, openServerSocket

_log = Logger(namespace="txlb")


def buildPool(config: PoolConfig, factories: Mapping[str, ISchedulerFactory], clock) -> Pool:
    pool = Pool(
        config.name,
        config.algorithm,
        factories[config.algorithm](config.options),
        [Server(s.name, s.address, s.weight) for s in config.servers],
        clock,
        **poolSettings(config),
    )
    pool.tls = config.tls
    pool.protocol = config.protocol
    warnUnverified(config)
    return pool


def poolSettings(config: PoolConfig) -> dict:
    """What L{Pool.configure} takes from a pool's config (and a reload updates)."""
    return dict(
        retries=config.retries,
        connectTimeout=config.connect_timeout,
        hashKey=config.hash_key,
        passive=(config.passive.consecutive_failures, config.passive.eject_for) if config.passive else None,
        maxConnections=config.max_connections,
        queueTimeout=config.queue_timeout,
        slowStart=config.slow_start,
    )


def warnUnverified(config: PoolConfig) -> None:
    if config.tls is not None and not config.tls.verify:
        _log.warn(
            "pool {pool}: TLS to its servers is not verified (tls.verify = false)",
            event="tls_unverified", pool=config.name,
        )


@attrs.define
class Balancer:
    """
    One running service: C{factory} balances and counts its connections;
    C{entry} is what its ports accept with (C{factory}, behind TLS when the
    service has C{tls}).
    """

    config: ServiceConfig
    factory: Factory
    entry: Factory


def serverTLS(service: ServiceConfig, metrics=None) -> Optional[ServerTLS]:
    """
    A service's certificates (and client CAs), read from their files now,
    or L{None}; refused client certificates are counted in C{metrics}.
    """
    if service.tls is None:
        return None
    alpn = ([b"h2", b"http/1.1"] if service.http2 else [b"http/1.1"]) if service.protocol == "http" else []
    return ServerTLS(service.tls.certificates, service.tls.min_version, alpn, service=service.name, metrics=metrics)


def _clientCerts(service: ServiceConfig) -> bool:
    """The service's TLS asks clients for certificates (on some SNI name at least)."""
    return service.tls is not None and service.tls.clientCerts


class Factories:
    """
    Makes and updates the factories of services, from what the service
    tree C{tree} shares between them: its pools, endpoint cache, backend
    connections, metrics, policies, session store, reactor and C{[log]}
    settings.  Reads them from C{tree} each time, since a reload replaces
    some (the config, the session store).
    """

    def __init__(self, tree) -> None:
        self.tree = tree

    def entry(self, service: ServiceConfig, factory: Factory, creator: Optional[ServerTLS] = None) -> Factory:
        """What C{service}'s ports accept with: C{factory}, behind TLS and a PROXY reader as configured."""
        return self._acceptProxy(service, self._secure(service, factory, creator))

    def _secure(self, service: ServiceConfig, factory: Factory, creator: Optional[ServerTLS]) -> Factory:
        if service.tls is None:
            return factory
        if creator is None:
            creator = serverTLS(service, self.tree.metrics)
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
        reader = ProxyAcceptor(entry, service.name, self.tree.reactor, trusted=networks(accept.trusted),
                               timeout=accept.timeout, metrics=self.tree.metrics)
        reader.drain = getattr(entry, "drain", None)
        reader.open = getattr(entry, "open", None)
        return reader

    def make(self, service: ServiceConfig) -> TCPBalancerFactory | HTTPProxyFactory | UDPBalancer:
        """A new factory for C{service}."""
        tree = self.tree
        if service.protocol == "udp":
            return UDPBalancer(
                service.name,
                tree.pools[service.pool],
                tree.reactor,
                openServerSocket(tree.reactor),
                idleTimeout=service.timeouts.idle,
                maxFlows=service.limits.max_flows,
                accessLog=tree.config.log.access,
                metrics=tree.metrics,
            )
        if service.protocol == "tcp":
            tcp = TCPBalancerFactory(
                service.name,
                tree.pools[service.pool],
                tree.endpoints,
                tree.reactor,
                idleTimeout=service.timeouts.idle,
                accessLog=tree.config.log.access,
                metrics=tree.metrics,
                sticky=self._sticky(service),
                proxyProtocol=service.proxy_protocol,
            )
            tcp.clientCerts = _clientCerts(service)
            return tcp
        settings = self._httpSettings(service)
        factory = HTTPProxyFactory(
            HTTPService(service.name, tree.pools, settings.pop("router"), tree.connections, tree.reactor,
                        sticky=self._sticky(service), **settings)
        )
        factory.service.metrics = tree.metrics
        factory.http2 = H2Connection
        return factory

    def update(self, factory: Factory, service: ServiceConfig) -> None:
        """New settings for a running service's next requests and connections."""
        tree = self.tree
        if isinstance(factory, HTTPProxyFactory):
            factory.service.update(**self._httpSettings(service))
        elif isinstance(factory, UDPBalancer):
            factory.setPool(tree.pools[service.pool])
            factory.idleTimeout = service.timeouts.idle
            factory.maxFlows = service.limits.max_flows
            factory.accessLog = tree.config.log.access
        else:
            factory.pool = tree.pools[service.pool]
            factory.idleTimeout = service.timeouts.idle
            factory.accessLog = tree.config.log.access
            factory.proxyProtocol = service.proxy_protocol
            factory.clientCerts = _clientCerts(service)

    def _sticky(self, service: ServiceConfig) -> Optional[Sticky]:
        if service.sticky is None:
            return None
        return Sticky(service.name, service.sticky, self.tree.sessions, secure=service.tls is not None)

    def _httpSettings(self, service: ServiceConfig) -> dict:
        """What an L{HTTPService} takes from its config (and a reload updates)."""
        rules, compress = compileRules(service.header_rules), Compression.fromConfig(service.compress)
        serviceAdmission, routeAdmissions = self.tree.policies.http(service)
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
            accessLog=self.tree.config.log.access,
            proto=b"https" if service.tls is not None else b"http",
            cacheConfig=service.cache,
            clientCerts=_clientCerts(service),
        )
