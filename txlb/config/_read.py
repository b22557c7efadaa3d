# -*- test-case-name: tests.test_config -*-
"""
One reader per section of the config file, and L{parse} and L{load}.

Validation reports every problem at once, in file order, one line each, as
C{FILE:LINE: KEY.PATH: what is wrong}, and never raises anything but
L{ConfigError}: an operator fixes the whole file in one pass, and no
traceback ever stands in for a message.  Each section is read by a small
function over a L{txlb.config._table._Table}, which remembers the keys it
was asked for: whatever is left is an unknown key (with the closest known
one suggested), or a key that a later version of txlb supports
(C{PLANNED}), which is said plainly rather than ignored.  A later feature
adds its keys by adding C{table.get(...)} lines and fields.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from types import MappingProxyType
from typing import Any, Collection, Mapping, Optional

import attrs

from txlb.config._model import (
    AdminConfig,
    Algorithms,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DemoServer,
    DNSConfig,
    HealthConfig,
    Limits,
    LogConfig,
    PassiveConfig,
    PoolConfig,
    Problem,
    ProcessConfig,
    RouteConfig,
    ServerConfig,
    ServiceConfig,
    SessionsConfig,
    StickyConfig,
    Timeouts,
)
from txlb.config._table import (
    _boolean,
    _connectAddress,
    _Context,
    _didYouMean,
    _freeTable,
    _hashKey,
    _integer,
    _Invalid,
    _listenEndpoint,
    _name,
    _oneOf,
    _positiveDuration,
    _string,
    _stringList,
    _Table,
    parseDuration,
    parseSize,
)
from txlb.config._tomlpos import keyLines
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint

from txlb.config._admission import checkRedis, rate, readAccess, readRateLimit
from txlb.config._proxy import readProxy
from txlb.config._tls import readBackendTLS, readTLS
from txlb.config._transform import readCompress, readHeaderRules, readRedirect, routeHeaders
from txlb.interfaces import SchedulerOptionsError
from txlb.net.endpoints import EndpointError, checkServer, isUDP, listenParts, parseUDPListen, sameSocket, udpTarget

# The sections.


def _readProcess(t: _Table) -> ProcessConfig:
    workers = t.get("workers", _integer(1, 64), 1)
    process = ProcessConfig(
        shutdown_timeout=t.get("shutdown_timeout", parseDuration, 30.0),
        workers=workers,
    )
    t.finish()
    return process


def _shareable(listen: str) -> bool:
    """
    Whether worker processes can share C{listen}'s socket: a TCP, UDP or
    unix one (L{txlb.service.workers.bindShared}).
    """
    if isUDP(listen):
        return True
    try:
        endpoint = checkServer(listen)
    except ValueError:
        return True  # its own problem is reported where it is read
    return isinstance(endpoint, (TCP4ServerEndpoint, UNIXServerEndpoint))


def _readLog(t: _Table) -> LogConfig:
    log = LogConfig(
        format=t.get("format", _oneOf("json", "text"), "json"),
        path=_logPath(t),
        access=t.get("access", _boolean, True),
    )
    t.finish()
    return log


def _logPath(t: _Table) -> str:
    """C{-} for standard output, else a file relative to the config file."""
    path = t.get("path", _string, "-")
    return path if path == "-" else os.path.join(t.ctx.baseDir, path)


def _readServers(pool: _Table) -> tuple[ServerConfig, ...]:
    servers: list[ServerConfig] = []
    names: set[str] = set()
    for t in pool.tables("servers", "server"):
        name = t.get("name", _name)
        if name is not None and name in names:
            t.error("name", f"another server of this pool is already called {name!r}")
        names.add(name)
        servers.append(
            ServerConfig(
                name=name,
                address=t.get("address", _connectAddress),
                weight=t.get("weight", _integer(0, 1000), 1),
            )
        )
        t.finish()
    return tuple(servers)


def _readPool(t: _Table, name: str, algorithms: Optional[Algorithms]) -> PoolConfig:
    from txlb.balance.schedulers import DEFAULT_ALGORITHM

    algorithm = t.get("algorithm", _string, None)
    options = t.get("options", _freeTable, MappingProxyType({}))
    # A mistyped algorithm is reported once: its default is not then
    # checked against options that were meant for something else.
    if "algorithm" not in t.data:
        algorithm = DEFAULT_ALGORITHM
    if algorithms is not None and algorithm is not None:
        factory = algorithms.get(algorithm)
        if factory is None:
            t.error(
                "algorithm",
                f"unknown algorithm {algorithm!r}{_didYouMean(algorithm, algorithms)}; "
                f"installed: {', '.join(sorted(algorithms))}",
            )
        else:
            try:
                factory(options)
            except SchedulerOptionsError as e:
                t.error("options", str(e))
            except Exception as e:  # a plugin's bug, but the operator must hear of it
                t.error("options", f"the {algorithm} scheduler failed on them: {e!r}")
    pool = PoolConfig(
        name=name,
        algorithm=algorithm,
        servers=_readServers(t),
        connect_timeout=t.get("connect_timeout", _positiveDuration, 2.0),
        retries=t.get("retries", _integer(0, 100), 2),
        hash_key=t.get("hash_key", _hashKey, "client_ip"),
        options=options,
        max_connections=t.get("max_connections", _integer(0, 1_000_000), 0),
        queue_timeout=t.get("queue_timeout", parseDuration, 5.0),
        slow_start=t.get("slow_start", parseDuration, 0.0),
        tls=readBackendTLS(t.table("tls", "pool_tls")),
        protocol=t.get("protocol", _oneOf("http/1.1", "h2"), "http/1.1"),
        health=_readHealth(t.table("health", "health")),
        passive=_readPassive(t.table("passive", "passive")),
    )
    t.finish()
    return pool


_BUILTIN_HEALTH = ("none", "http", "tcp", "grpc")


def _statusList(value: Any) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not items:
        raise _Invalid("must be an array of HTTP status codes, like [200, 204]")
    for code in items:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise _Invalid(f"{code!r} is not an HTTP status code")
    return tuple(items)


def _expectJson(value: Any) -> Mapping[str, tuple[Any, ...]]:
    if not isinstance(value, dict) or not value:
        raise _Invalid('must be a table of field to accepted values, like { status = ["ok"] }')
    out = {}
    for field, accepted in value.items():
        accepted = accepted if isinstance(accepted, list) else [accepted]
        if not accepted or any(isinstance(a, (dict, list)) for a in accepted):
            raise _Invalid(f"the values for {field!r} must be strings, numbers or booleans")
        out[field] = tuple(accepted)
    return MappingProxyType(out)


def _readHealth(t: Optional[_Table]) -> HealthConfig:
    if t is None:
        return HealthConfig()
    kind = t.get("kind", _string, "none")
    known = t.ctx.healthKinds
    if kind not in _BUILTIN_HEALTH and known is not None and kind not in known:
        installed = sorted(set(known) | set(_BUILTIN_HEALTH))
        t.error("kind", f"unknown health check kind {kind!r}{_didYouMean(kind, installed)}; "
                        f"installed: {', '.join(installed)}")
    health = HealthConfig(
        kind=kind,
        path=t.get("path", _pathPrefix, "/health"),
        method=t.get("method", _oneOf("GET", "HEAD", "OPTIONS"), "GET"),
        interval=t.get("interval", _positiveDuration, 2.0),
        timeout=t.get("timeout", _positiveDuration, 1.0),
        rise=t.get("rise", _integer(1, 100), 2),
        fall=t.get("fall", _integer(1, 100), 3),
        expect_status=t.get("expect_status", _statusList, (200,)),
        expect_json=t.get("expect_json", _expectJson, MappingProxyType({})),
        options=t.get("options", _freeTable, MappingProxyType({})),
    )
    if health.timeout > health.interval:
        t.error("timeout", "must not be longer than interval")
    factory = known.get(kind) if isinstance(known, Mapping) else None
    if factory is not None:
        try:
            factory(health.options)
        except ValueError as e:  # HealthCheckOptionsError, or a plugin's own
            t.error("options", str(e))
    t.finish()
    return health


def _readPassive(t: Optional[_Table]) -> Optional[PassiveConfig]:
    if t is None:
        return None
    passive = PassiveConfig(
        consecutive_failures=t.get("consecutive_failures", _integer(1, 10000), 5),
        eject_for=t.get("eject_for", _positiveDuration, 30.0),
    )
    t.finish()
    return passive


_STICKY_KEY = re.compile(r"(cookie|header):[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _readSticky(t: Optional[_Table], protocol: str) -> Optional[StickyConfig]:
    if t is None:
        return None
    modes = ("cookie", "ip", "key") if protocol == "http" else ("ip",)
    mode = t.get("mode", _oneOf(*modes))
    cookie = t.get("cookie", _headerToken, "LB_SERVER")
    key = t.get("key", _string, None)
    if mode == "key":
        if key is None:
            t.error("key", 'is required in key mode: "cookie:SESSIONID" or "header:X-Session"')
        elif not _STICKY_KEY.fullmatch(key):
            t.error("key", f'{key!r} is not "cookie:NAME" or "header:NAME"')
    elif key is not None:
        t.error("key", 'applies to mode = "key" only')
    t.finish()
    return StickyConfig(mode=mode, cookie=cookie, key=key)


def _headerToken(value: Any) -> str:
    text = _string(value)
    if not _TOKEN.fullmatch(text):
        raise _Invalid(f"{text!r} is not a valid cookie name")
    return text


def _readSessions(t: _Table) -> SessionsConfig:
    sessions = SessionsConfig(
        store=t.get("store", _oneOf("memory", "redis"), "memory"),
        redis=t.get("redis", _connectAddress, "tcp:host=127.0.0.1:port=6379"),
        ttl=t.get("ttl", _positiveDuration, 3600.0),
        max_entries=t.get("max_entries", _integer(1, 100_000_000), 100_000),
    )
    t.finish()
    return sessions


def _readCluster(t: _Table) -> ClusterConfig:
    defaults = ClusterConfig()
    cluster = ClusterConfig(
        mode=t.get("mode", _oneOf("standalone", "active-passive", "active-active"), "standalone"),
        node=t.get("node", _name, defaults.node),
        redis=t.get("redis", _connectAddress, defaults.redis),
        heartbeat=t.get("heartbeat", _positiveDuration, 1.0),
        failover_after=t.get("failover_after", _positiveDuration, 3.0),
        address=t.get("address", _string, "127.0.0.1"),
        on_active=t.get("on_active", _string, ""),
    )
    if cluster.failover_after <= cluster.heartbeat:
        t.error("failover_after", "must be longer than heartbeat (several heartbeats, typically 3)")
    try:
        ipaddress.ip_address(cluster.address)
    except ValueError:
        t.error("address", f"{cluster.address!r} is not an IP address")
    t.finish()
    return cluster


_UDP = re.compile(r"udp:(?:port=)?(\d+)(?::interface=(.+))?")


def _udpListen(value: Any) -> str:
    text = _string(value)
    m = _UDP.fullmatch(text)
    if m is None or not 0 < int(m.group(1)) < 65536:
        raise _Invalid(f'{text!r} is not a UDP listen address (write it like "udp:5353:interface=127.0.0.1")')
    return text


def _readDNS(t: _Table) -> DNSConfig:
    dns = DNSConfig(
        listen=t.get("listen", _udpListen, "udp:5353:interface=127.0.0.1"),
        name=t.get("name", _string),
        ttl=t.get("ttl", _integer(0, 86400), 5),
    )
    t.finish()
    return dns


def _readAdmin(t: _Table) -> AdminConfig:
    tokenFile = t.get("token_file", _string, None)
    if tokenFile is not None:
        # Relative to the config file, as an operator reading it expects.
        tokenFile = os.path.join(t.ctx.baseDir, tokenFile)
        try:
            with open(tokenFile, encoding="utf-8") as f:
                if not f.readline().strip():
                    t.error("token_file", f"{tokenFile} is empty: write the token on its first line")
        except (OSError, UnicodeDecodeError) as e:
            t.error("token_file", f"cannot read {tokenFile}: {getattr(e, 'strerror', None) or e}")
    admin = AdminConfig(
        listen=t.get("listen", _listenEndpoint, "tcp:8081:interface=127.0.0.1"),
        token_file=tokenFile,
    )
    if admin.listen is not None and admin.token_file is None and not _loopbackOnly(admin.listen):
        t.error("listen", "the admin API listens beyond loopback: set token_file, or listen on "
                          "127.0.0.1 (tcp:8081:interface=127.0.0.1)")
    t.finish()
    return admin


def _loopbackOnly(listen: str) -> bool:
    """Whether a listening endpoint is reachable from this host only."""
    checkServer(listen)
    if listen.startswith("unix:"):
        return True
    parts = listenParts(listen)
    interface = parts[2] if parts is not None and parts[0] == "tcp" else ""
    return interface.startswith("127.") or interface in ("::1", "localhost")


#: How long a UDP flow lives without a datagram either way, by default.
UDP_IDLE = 60.0


def _readTimeouts(t: Optional[_Table], protocol: str) -> Timeouts:
    if t is None:
        return Timeouts(idle={"tcp": 600.0, "udp": UDP_IDLE}.get(protocol, 75.0))
    if protocol == "udp":
        for key in ("client", "backend"):
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services; a UDP service has only "idle"')
        timeouts = Timeouts(idle=t.get("idle", _positiveDuration, UDP_IDLE))
        t.finish()
        return timeouts
    if protocol == "tcp":
        for key in ("client", "backend"):
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services; a TCP service has only "idle"')
        timeouts = Timeouts(idle=t.get("idle", parseDuration, 600.0))
    else:
        timeouts = Timeouts(
            client=t.get("client", parseDuration, 60.0),
            backend=t.get("backend", parseDuration, 30.0),
            idle=t.get("idle", parseDuration, 75.0),
        )
    t.finish()
    return timeouts


def _poolName(t: _Table, pools: Mapping[str, Any]) -> Optional[str]:
    """The C{pool} of a service or route, which must exist."""
    pool = t.get("pool", _name)
    if pool is not None and pool not in pools:
        t.error("pool", f"no pool named {pool!r}{_didYouMean(pool, pools)}")
        return None
    return pool


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _methods(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(m, str) for m in items):
        raise _Invalid('must be an array of method names, like ["GET", "POST"]')
    for m in items:
        if not _TOKEN.fullmatch(m):
            raise _Invalid(f"{m!r} is not a method name")
    return tuple(m.upper() for m in items)


def _pathPrefix(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise _Invalid(f"{text!r} must start with '/'")
    return text


def _headerMatches(value: Any) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise _Invalid('must be a table of header name to value, like {{ "X-Tenant" = "blue" }}')
    for name, v in value.items():
        if not _TOKEN.fullmatch(name):
            raise _Invalid(f"{name!r} is not a header name")
        if not isinstance(v, str):
            raise _Invalid(f"the value for {name!r} must be a string")
    return MappingProxyType(dict(value))


def _readRoutes(t: _Table, pools: Mapping[str, Any]) -> tuple[RouteConfig, ...]:
    routes = []
    for r in t.tables("routes", "route"):
        path_prefix = r.get("path_prefix", _pathPrefix, None)
        redirect = readRedirect(r.table("redirect", "redirect"), path_prefix)
        if redirect is not None and "pool" in r.data:
            r.seen.add("pool")
            r.error("pool", "a redirect route answers itself and has no pool: remove pool, or redirect")
        matches, rules = routeHeaders(r, _headerMatches)
        routes.append(
            RouteConfig(
                pool=_poolName(r, pools) if redirect is None else None,
                host=r.get("host", _string, None),
                path_prefix=path_prefix,
                methods=r.get("methods", _methods, ()),
                headers=matches,
                header_rules=rules,
                compress=readCompress(r.table("compress", "compress")),
                redirect=redirect,
                access=readAccess(r),
                rate_limit=readRateLimit(r.table("rate_limit", "rate_limit")),
            )
        )
        r.finish()
    return tuple(routes)


def _readLimits(t: Optional[_Table], protocol: str = "http") -> Limits:
    if t is None:
        return Limits()
    if protocol == "udp":
        for key in ("max_header_bytes", "max_body"):
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services; a UDP service has only "max_flows"')
        limits = Limits(max_flows=t.get("max_flows", _integer(1, 1_000_000), Limits().max_flows))
        t.finish()
        return limits
    if "max_flows" in t.data:
        t.seen.add("max_flows")
        t.error("max_flows", 'applies to UDP services only (protocol = "udp")')
    if protocol == "tcp":
        for key in ("max_header_bytes", "max_body"):
            if key in t.data:
                t.seen.add(key)
                t.error(key, 'applies to HTTP services; a TCP service has "max_connections_per_client" '
                             'and "connection_rate"')
        limits = Limits(
            max_connections_per_client=t.get("max_connections_per_client", _integer(0, 1_000_000), 0),
            connection_rate=t.get("connection_rate", rate, None),
        )
        t.finish()
        return limits
    for key in ("max_connections_per_client", "connection_rate"):
        if key in t.data:
            t.seen.add(key)
            t.error(key, 'applies to TCP services only (protocol = "tcp")')
    limits = Limits(
        max_header_bytes=t.get("max_header_bytes", parseSize, 32 * 1024),
        max_body=t.get("max_body", parseSize, 0),
        max_concurrent_streams=t.get("max_concurrent_streams", _integer(1, 10_000), 100),
    )
    if limits.max_header_bytes < 1024:
        t.error("max_header_bytes", "must be at least 1KiB")
    t.finish()
    return limits


def _readCache(t: Optional[_Table]) -> Optional[CacheConfig]:
    if t is None:
        return None
    cache = CacheConfig(
        max_size=t.get("max_size", parseSize, 64 * 1024 * 1024),
        max_object=t.get("max_object", parseSize, 1024 * 1024),
    )
    if not cache.max_size:
        t.error("max_size", "must be more than 0 (leave cache out to cache nothing)")
    elif cache.max_object > cache.max_size:
        t.error("max_object", "must not be larger than max_size")
    t.finish()
    return cache


#: Keys of a service that only mean something for HTTP.
_HTTP_ONLY = ("routes", "limits", "forwarded", "cache", "headers", "compress", "rate_limit", "http2")


#: Keys of a service that a UDP service refuses, and what to do instead.
_NOT_UDP = {
    **{key: 'applies to HTTP services only (protocol = "http")' for key in _HTTP_ONLY if key != "limits"},
    "tls": "does not apply to UDP services (TLS needs a stream; DTLS is not supported)",
    "sticky": 'does not apply to UDP services: a flow keeps its server; for a client to keep it '
              'across flows, use a pool with algorithm = "ip_hash" or "consistent_hash"',
}


def _udpServiceListen(value: Any) -> str:
    """A UDP service's listening address (L{parseUDPListen})."""
    text = _string(value)
    try:
        parseUDPListen(text)
    except EndpointError as e:
        raise _Invalid(str(e))
    return text


def _streamListen(value: Any) -> str:
    """A TCP or HTTP service's listening endpoint; C{udp:} says where it belongs."""
    if isinstance(value, str) and isUDP(value):
        raise _Invalid(f'{value!r} is a UDP address: it needs protocol = "udp"')
    return _listenEndpoint(value)


def _checkUDPPool(t: _Table, pool: Any) -> None:
    """A UDP service's pool: its servers at IP addresses, no TLS, hashing on the client."""
    if pool.tls is not None:
        t.error("pool", f"pool {pool.name!r} has tls, but a UDP service sends plain datagrams: remove the pool's tls")
    if pool.hash_key != "client_ip":
        t.error("pool", f"pool {pool.name!r} has hash_key = {pool.hash_key!r}, but a UDP service"
                        ' can only hash on the client address: use hash_key = "client_ip"')
    for server in pool.servers:
        if server.address is None:
            continue
        try:
            udpTarget(server.address)
        except EndpointError as e:
            t.error("pool", f"pool {pool.name!r}, server {server.name!r}: {e}")


def _readService(t: _Table, pools: Mapping[str, Any]) -> ServiceConfig:
    protocol = t.get("protocol", _oneOf("tcp", "http", "udp"), "tcp")
    pool = _poolName(t, pools)
    if protocol == "udp":
        for key, why in _NOT_UDP.items():
            if key in t.data:
                t.seen.add(key)
                t.error(key, why)
        if pool in pools:
            _checkUDPPool(t, pools[pool])
    if protocol == "tcp":
        for key in _HTTP_ONLY:
            if key in t.data and key != "limits":
                t.seen.add(key)
                t.error(key, 'applies to HTTP services only (protocol = "http")')
    if protocol != "http" and pool in pools and pools[pool].protocol == "h2":
        how = ("passes the client's bytes through as they are (HTTP/2 too)" if protocol == "tcp"
               else "sends datagrams")
        t.error("pool", f'pool {pool!r} has protocol = "h2", which only HTTP services speak to servers: a'
                        f" {protocol.upper()} service {how}; use a pool without protocol = \"h2\"")
    if protocol == "tcp" and pool in pools and pools[pool].hash_key != "client_ip":
        t.error(
            "pool",
            f"pool {pool!r} has hash_key = {pools[pool].hash_key!r}, but a TCP service"
            ' can only hash on the client address: use hash_key = "client_ip"',
        )
    service = ServiceConfig(
        name=t.get("name", _name),
        protocol=protocol,
        listen=t.get("listen", _stringList(_udpServiceListen if protocol == "udp" else _streamListen)),
        pool=pool,
        timeouts=_readTimeouts(t.table("timeouts", "timeouts"), protocol),
        tls=None if protocol == "udp" else readTLS(t.table("tls", "tls")),
        sticky=None if protocol == "udp" else _readSticky(t.table("sticky", "sticky"), protocol),
    )
    if protocol == "http":
        service = attrs.evolve(
            service,
            routes=_readRoutes(t, pools),
            limits=_readLimits(t.table("limits", "limits")),
            forwarded=t.get("forwarded", _boolean, False),
            http2=t.get("http2", _boolean, True),
            cache=_readCache(t.table("cache", "cache")),
            header_rules=readHeaderRules(t.table("headers", "headers")),
            compress=readCompress(t.table("compress", "compress")),
        )
        service = attrs.evolve(service, rate_limit=readRateLimit(t.table("rate_limit", "rate_limit")))
    else:
        service = attrs.evolve(service, limits=_readLimits(t.table("limits", "limits"), protocol))
    service = attrs.evolve(service, access=readAccess(t))
    service = attrs.evolve(service, **readProxy(t, protocol))
    t.finish()
    return service


def _readDemo(t: _Table) -> tuple[DemoServer, ...]:
    servers: list[DemoServer] = []
    names: set[str] = set()
    for s in t.tables("servers", "demo_server"):
        name = s.get("name", _name)
        if name is not None and name in names:
            s.error("name", f"another demo server is already called {name!r}")
        names.add(name)
        servers.append(DemoServer(name=name, listen=s.get("listen", _listenEndpoint)))
        s.finish()
    t.finish()
    return tuple(servers)


def _readConfig(root: _Table, path: str, algorithms: Optional[Algorithms]) -> Config:
    ctx = root.ctx
    txlbTable = root.table("txlb", "txlb")
    process = _readProcess(txlbTable) if txlbTable else ProcessConfig()
    logTable = root.table("log", "log")
    log = _readLog(logTable) if logTable else LogConfig()
    pools: dict[str, PoolConfig] = {}
    poolsTable = root.table("pools", "pools")
    if poolsTable is not None:
        for name in poolsTable.data:
            poolTable = poolsTable.table(name, "pool")
            if poolTable is None:
                continue
            try:
                _name(name)
            except _Invalid as e:
                poolsTable.error(name, str(e))
            pools[name] = _readPool(poolTable, name, algorithms)
        poolsTable.finish()
    services: list[ServiceConfig] = []
    names: set[str] = set()
    listens: list[tuple[str, str]] = []  # (endpoint, key path), in file order

    def claim(listen: str, where: str) -> None:
        for other, otherWhere in listens:
            if sameSocket(listen, other):
                also = f" ({other!r})" if other != listen else ""
                ctx.error(where, f"{listen!r} is already used by {otherWhere}{also}")
                return
        listens.append((listen, where))

    for t in root.tables("services", "service"):
        service = _readService(t, pools)
        checkRedis(t, service, root.data.get("sessions"))
        if service.name is not None and service.name in names:
            t.error("name", f"another service is already called {service.name!r}")
        names.add(service.name)
        listen = service.listen or ()
        for j, endpoint in enumerate(listen):
            where = f"{t.path}.listen[{j}]" if isinstance(t.data["listen"], list) else f"{t.path}.listen"
            claim(endpoint, where)
            if process.workers > 1 and not _shareable(endpoint):
                ctx.error(where, f"{endpoint!r}: with [txlb] workers > 1, a service listens on tcp: or unix: "
                                 "endpoints only (TLS is the service's tls table)")
        services.append(service)
    adminTable = root.table("admin", "admin")
    admin = _readAdmin(adminTable) if adminTable else None
    if admin is not None and admin.listen is not None:
        claim(admin.listen, "admin.listen")
    sessionsTable = root.table("sessions", "sessions")
    sessions = _readSessions(sessionsTable) if sessionsTable else SessionsConfig()
    clusterTable = root.table("cluster", "cluster")
    cluster = _readCluster(clusterTable) if clusterTable else ClusterConfig()
    dnsTable = root.table("dns", "dns")
    dns = _readDNS(dnsTable) if dnsTable else None
    if dns is not None and cluster.mode == "standalone":
        dnsTable.error("name", '[dns] answers with the cluster\'s nodes: set [cluster] mode')
    if dns is not None and dns.listen is not None:
        claim(dns.listen, "dns.listen")  # a UDP service may want the same socket
    demoTable = root.table("demo", "demo")
    demo = _readDemo(demoTable) if demoTable else ()
    for i, server in enumerate(demo):
        if server.listen is not None:
            claim(server.listen, f"demo.servers[{i}].listen")
    root.finish()
    return Config(path, process, log, MappingProxyType(pools), tuple(services), demo, admin,
                  sessions, cluster, dns)


def parse(
    text: str,
    source: str = "<config>",
    algorithms: Optional[Algorithms] = None,
    healthKinds: Optional[Collection[str]] = None,
) -> Config:
    """
    Validate TOML text.

    @param algorithms: the installed scheduler factories by name; when
        given, C{algorithm} names and C{options} are checked against them.
    @raise ConfigError: with every problem found.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [_syntaxProblem(str(e), text)])
    ctx = _Context(keyLines(text))
    ctx.healthKinds = healthKinds
    ctx.baseDir = os.path.dirname(os.path.abspath(source)) if not source.startswith("<") else os.getcwd()
    config = _readConfig(_Table(ctx, "", data, ""), source, algorithms)
    if ctx.problems:
        # In file order, as an operator reads the file; problems without a
        # line (none expected) last.  sorted() is stable: one key's
        # problems keep the order they were found in.
        raise ConfigError(
            source, sorted(ctx.problems, key=lambda p: p.line if p.line else len(text) + 1)
        )
    return config


_TOML_WHERE = re.compile(r" \(at line (\d+), column (\d+)\)$| \(at end of document\)$")


def _syntaxProblem(message: str, text: str) -> Problem:
    """
    tomllib's message ends with C{(at line L, column C)}; the line goes
    where every other problem has it, the column stays in the message.
    """
    m = _TOML_WHERE.search(message)
    if m is None:
        return Problem("", f"not valid TOML: {message}")
    if m.group(1) is None:
        return Problem("", f"not valid TOML: {message[: m.start()]} (at the end of the file)",
                       text.count("\n") + (0 if text.endswith("\n") else 1) or 1)
    return Problem("", f"not valid TOML: {message[: m.start()]} (column {m.group(2)})",
                   int(m.group(1)))


def load(
    path: str,
    algorithms: Optional[Algorithms] = None,
    healthKinds: Optional[Collection[str]] = None,
) -> Config:
    """
    Read and validate a config file.

    @raise ConfigError: the file cannot be read or does not validate.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, [Problem("", f"cannot read the config file: {e}")])
    return parse(text, path, algorithms, healthKinds)

