# -*- test-case-name: tests.test_config -*-
"""
The objects the rest of txlb reads from a validated config, and the error
that lists what is wrong with one.
"""

from __future__ import annotations

import socket
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, Optional

import attrs

from txlb.config._policy import AccessConfig, RateLimitConfig
from txlb.config._rules import CompressConfig, HeaderRules, RedirectConfig
from txlb.policy.ratelimit import Rate

#: Scheduler factories by the name C{algorithm =} uses, as
#: L{txlb.balance.schedulers.schedulerFactories} gives them: called with a pool's
#: C{options}, they raise L{SchedulerOptionsError} when those do not suit.
Algorithms = Mapping[str, Callable[[Mapping[str, Any]], Any]]


# The objects the rest of txlb reads.  Durations are in seconds, as floats;
# addresses are endpoint strings (a server's host:port already turned into
# one), so that nothing downstream parses config text again.


@attrs.frozen
class ServerConfig:
    """One entry of a pool's C{servers}."""

    name: str
    address: str
    weight: int = 1


@attrs.frozen
class HealthConfig:
    """
    A pool's C{health} table: active checks.  C{kind = "none"} runs none
    and keeps every server in rotation.
    """

    kind: str = "none"
    path: str = "/health"
    method: str = "GET"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    expect_status: tuple[int, ...] = (200,)
    expect_json: Mapping[str, tuple[Any, ...]] = MappingProxyType({})
    options: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class PassiveConfig:
    """A pool's C{passive} table: ejection on failures of live traffic."""

    consecutive_failures: int = 5
    eject_for: float = 30.0


@attrs.frozen
class AdminConfig:
    """The C{[admin]} table: the admin API, status page and metrics."""

    listen: str = "tcp:8081:interface=127.0.0.1"
    token_file: Optional[str] = None


@attrs.frozen
class BackendTLSConfig:
    """
    A pool's C{tls}: TLS to every server of the pool.  Without
    C{server_name}, each server's own host name is verified.
    """

    verify: bool = True
    ca: Optional[str] = None
    server_name: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None


@attrs.frozen
class PoolConfig:
    """
    A C{[pools.NAME]} table.  C{options} is read-only, so that a scheduler
    cannot change the config it was built from.
    """

    name: str
    algorithm: str
    servers: tuple[ServerConfig, ...]
    connect_timeout: float = 2.0
    retries: int = 2
    hash_key: str = "client_ip"
    options: Mapping[str, Any] = MappingProxyType({})
    health: HealthConfig = HealthConfig()
    passive: Optional[PassiveConfig] = None
    max_connections: int = 0
    queue_timeout: float = 5.0
    slow_start: float = 0.0
    tls: Optional[BackendTLSConfig] = None
    #: What HTTP services speak to the servers: C{"http/1.1"} or C{"h2"}.
    protocol: str = "http/1.1"


@attrs.frozen
class Timeouts:
    """A service's C{timeouts}; C{0} means none.  TCP and UDP services use C{idle} only."""

    client: float = 60.0
    backend: float = 30.0
    idle: float = 600.0


@attrs.frozen
class RouteConfig:
    """
    One C{[[services.routes]]} table: every condition given must hold.
    C{header_rules} and C{compress} apply to the requests it takes; a
    route with C{redirect} answers them itself and has no C{pool}.
    """

    pool: Optional[str]
    host: Optional[str] = None
    path_prefix: Optional[str] = None
    methods: tuple[str, ...] = ()
    headers: Mapping[str, str] = MappingProxyType({})
    header_rules: Optional[HeaderRules] = None
    compress: Optional[CompressConfig] = None
    redirect: Optional[RedirectConfig] = None
    #: C{allow}/C{deny} and C{rate_limit}: the route's own replace its service's.
    access: Optional[AccessConfig] = None
    rate_limit: Optional[RateLimitConfig] = None


@attrs.frozen
class Limits:
    """
    A service's C{limits}; C{max_body = 0} means unlimited.  HTTP services
    use the first two, UDP services C{max_flows} only.
    """

    max_header_bytes: int = 32 * 1024
    max_body: int = 0
    max_flows: int = 10_000
    #: Streams one HTTP/2 client connection may have open at once.
    max_concurrent_streams: int = 100
    #: TCP services: per client address (0 / None: no limit).
    max_connections_per_client: int = 0
    connection_rate: Optional[Rate] = None


@attrs.frozen
class CacheConfig:
    """An HTTP service's C{cache}: the store's bounds in bytes."""

    max_size: int = 64 * 1024 * 1024
    max_object: int = 1024 * 1024


@attrs.frozen
class CertificateConfig:
    """
    One of a service's C{tls.certificates}: a certificate chain and its key,
    and whether clients are asked for a certificate of their own.  The
    client settings are resolved: the entry's own, else the service's
    C{tls.client_ca}/C{client_auth}.
    """

    cert: str
    key: str
    #: The PEM file of the CA(s) that sign client certificates, or L{None}:
    #: clients are not asked for one.
    client_ca: Optional[str] = None
    #: C{"required"} or C{"optional"} when C{client_ca} is set.
    client_auth: Optional[str] = None


@attrs.frozen
class TLSConfig:
    """A service's C{tls}: terminate TLS on its listeners."""

    certificates: tuple[CertificateConfig, ...]
    min_version: str = "1.2"
    #: The service-wide C{client_ca} and C{client_auth}, as written: the
    #: defaults of each entry of C{certificates}.
    client_ca: Optional[str] = None
    client_auth: Optional[str] = None

    @property
    def clientCerts(self) -> bool:
        """Some certificate asks clients for theirs."""
        return any(c.client_ca for c in self.certificates)


@attrs.frozen
class AcceptProxyConfig:
    """
    A service's C{accept_proxy}: connections from C{trusted} (the C{from}
    networks, as written; empty: any source) start with a PROXY header
    that must arrive within C{timeout} seconds.
    """

    trusted: tuple[str, ...] = ()
    timeout: float = 5.0


@attrs.frozen
class ServiceConfig:
    """One C{[[services]]} table."""

    name: str
    protocol: str
    listen: tuple[str, ...]
    pool: str
    timeouts: Timeouts = Timeouts()
    routes: tuple[RouteConfig, ...] = ()
    limits: Limits = Limits()
    forwarded: bool = False
    #: HTTP/2 from clients (ALPN on TLS, prior knowledge on plaintext).
    http2: bool = True
    tls: Optional[TLSConfig] = None
    sticky: Optional[StickyConfig] = None
    cache: Optional[CacheConfig] = None
    #: C{headers}: the header rules of an HTTP service.
    header_rules: Optional[HeaderRules] = None
    compress: Optional[CompressConfig] = None
    #: C{allow}/C{deny} (every protocol) and C{rate_limit} (HTTP).
    access: Optional[AccessConfig] = None
    rate_limit: Optional[RateLimitConfig] = None
    #: Each connection starts with a PROXY header (TCP and HTTP services).
    accept_proxy: Optional[AcceptProxyConfig] = None
    #: C{"v1"} or C{"v2"}: a PROXY header to each backend connection (TCP services).
    proxy_protocol: Optional[str] = None


@attrs.frozen
class LogConfig:
    """The C{[log]} table."""

    format: str = "json"
    path: str = "-"
    access: bool = True


@attrs.frozen
class ProcessConfig:
    """The C{[txlb]} table."""

    shutdown_timeout: float = 30.0
    workers: int = 1


@attrs.frozen
class DemoServer:
    """One of C{[demo] servers}: a backend txlb runs itself, for trying it out."""

    name: str
    listen: str


@attrs.frozen
class Config:
    """
    A whole validated config file.  C{pools} keeps the file's order, so
    summaries and the admin API list pools as the operator wrote them.
    """

    path: str
    txlb: ProcessConfig = ProcessConfig()
    log: LogConfig = LogConfig()
    pools: Mapping[str, PoolConfig] = MappingProxyType({})
    services: tuple[ServiceConfig, ...] = ()
    demo: tuple[DemoServer, ...] = ()
    admin: Optional[AdminConfig] = None
    sessions: "SessionsConfig" = attrs.field(factory=lambda: SessionsConfig())
    cluster: "ClusterConfig" = attrs.field(factory=lambda: ClusterConfig())
    dns: Optional["DNSConfig"] = None


@attrs.frozen
class StickyConfig:
    """
    A service's C{sticky}: C{cookie} (txlb's own cookie names the server),
    C{ip} (the client address) or C{key} (the application's session id,
    C{cookie:NAME} or C{header:NAME}).
    """

    mode: str
    cookie: str = "LB_SERVER"
    key: Optional[str] = None


@attrs.frozen
class SessionsConfig:
    """C{[sessions]}: where C{ip} and C{key} affinities are kept."""

    store: str = "memory"
    redis: str = "tcp:host=127.0.0.1:port=6379"
    ttl: float = 3600.0
    max_entries: int = 100_000


@attrs.frozen
class ClusterConfig:
    """C{[cluster]}: txlb's own high availability."""

    mode: str = "standalone"
    node: str = attrs.field(factory=lambda: socket.gethostname())
    redis: str = "tcp:host=127.0.0.1:port=6379"
    heartbeat: float = 1.0
    failover_after: float = 3.0
    address: str = "127.0.0.1"
    on_active: str = ""


@attrs.frozen
class DNSConfig:
    """C{[dns]}: an authoritative answer for C{name} with the live nodes."""

    listen: str
    name: str
    ttl: int = 5


# Errors.


@attrs.frozen
class Problem:
    """
    One thing wrong with the file: the key path as the validator names it
    (C{pools.api.servers[1].address}; empty for the file as a whole), what
    is wrong, and the line it is written on when that is known.
    """

    path: str
    message: str
    line: Optional[int] = None

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """
    The config does not validate.  C{str()} gives one line per problem.
    """

    def __init__(self, source: str, problems: Collection[Problem]) -> None:
        super().__init__(source, tuple(problems))
        self.source = source
        self.problems = tuple(problems)

    def lines(self) -> list[str]:
        return [p.format(self.source) for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())
