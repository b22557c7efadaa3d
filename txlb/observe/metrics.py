# -*- test-case-name: tests.test_metrics -*-
"""
Counting what txlb does: Prometheus metrics, live stats and the decision
log, all fed by one cheap call per finished request or connection.

The hot path only adds to plain dictionaries and lists (a few µs per
request, measured in C{bench/metrics.py}); the Prometheus families are
built from them when C{/metrics} is scraped, through a custom collector in
txlb's own L{CollectorRegistry} (never the process-global one).  Figures
that already live elsewhere, a server's state and connections or a
service's open connections, are read at scrape time and cost nothing
between scrapes.

What calls what::

    HTTP proxy     metrics.httpRequest(serviceName, exchange)   once per answered request
    TCP balancer   metrics.connectionStarted(serviceName)       when a client connects
                   metrics.request(...)                         when both sides have closed
    health checks  metrics.healthCheck(poolName, serverName, ok)   once per finished check
    pools          server_ejected events, seen on the global log publisher
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Iterator, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generateOpenMetrics
from twisted.application.service import Service
from twisted.logger import globalLogPublisher

from txlb import __version__
from txlb.balance.pool import Pool, Server, ServerState
from txlb.observe.stats import DecisionLog, Window, latencyBucket

__all__ = ["CONTENT_TYPE_LATEST", "DURATION_BUCKETS", "Metrics", "OPENMETRICS_CONTENT_TYPE", "wantsOpenMetrics"]

#: Upper bounds (seconds) of C{txlb_request_duration_seconds}.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BUCKET_LABELS = tuple(f"{b:g}" for b in DURATION_BUCKETS) + ("+Inf",)
#: Seconds over which C{requestsPerSecond} is averaged.
RATE_WINDOW = 10
#: Seconds over which latency percentiles and the 5xx rate are taken.
LATENCY_WINDOW = 60
#: Seconds of per-second history kept for charts.
HISTORY = 300

_UNHEALTHY = (ServerState.DOWN, ServerState.EJECTED)


def wantsOpenMetrics(accept: str) -> bool:
    """
    Whether a scraper's C{Accept} header asks for the OpenMetrics format
    (Prometheus sends C{application/openmetrics-text} first when it can
    read it); anything else gets the classic text format.
    """
    for part in (accept or "").split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() == "application/openmetrics-text":
            q = 1.0
            for param in params.split(";"):
                key, _, value = param.partition("=")
                if key.strip() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0
            if q > 0:
                return True
    return False


class _ServiceInfo:
    def __init__(self, name: str, protocol: str, pools: tuple[str, ...], factory: Any,
                 policy: tuple[str, ...] = ()) -> None:
        self.name = name
        self.protocol = protocol
        self.pools = pools
        self.factory = factory
        self.policy = policy


class Metrics(Service):
    """
    Everything C{/metrics}, C{/api/stats} and C{/api/decisions} report.

    @param pools: the live pools by name (the same mapping the service
        keeps, so pools a reload adds are seen).
    @param clock: an C{IReactorTime}; its C{seconds()} places requests in
        the per-second windows.
    @param decisions: how many routing decisions to keep.

    Running (as a child service) it watches the global log publisher for
    C{server_ejected} events; that is the only thing it does when started.
    """

    name = "metrics"

    def __init__(self, pools: Mapping[str, Pool], clock, *, decisions: int = 1000) -> None:
        self.pools = pools
        self.clock = clock
        self.services: dict[str, _ServiceInfo] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.decisions = DecisionLog(decisions)
        #: Per-second traffic by C{(service, pool)} (pool C{""}: none
        #: chosen): one window added to per request; a service's, a pool's
        #: and the total window are sums made when read (L{window}).
        self.windows: dict[tuple[str, str], Window] = {}
        self.requests: dict[tuple, int] = {}
        self.durations: dict[tuple, list] = {}
        self.connections: dict[str, int] = {}
        self.bytes: dict[tuple, int] = {}
        self.retries: dict[tuple, int] = {}
        self.healthChecks: dict[tuple, int] = {}
        self.ejections: dict[tuple, int] = {}
        self.cacheRequests: dict[tuple, int] = {}
        self.refusals: dict[tuple, int] = {}
        #: HTTP requests by C{(service, protocol)}: what the client spoke.
        self.protocols: dict[tuple, int] = {}
        #: The last reload: whether it was applied, and when the config
        #: last took effect (start-up, until a reload succeeds).
        self.lastReloadOk = True
        self.lastReloadSuccess = clock.seconds()
        # process_* (CPU, memory, file descriptors, start time) of this
        # process, from /proc; in a master, the workers' get a label
        # (txlb.observe.aggregate.PER_PROCESS).
        ProcessCollector(registry=self.registry)

    # Setting up.

    def addService(self, name: str, protocol: str, pools: tuple[str, ...], factory: Any = None,
                   policy: Sequence[str] = ()) -> None:
        """
        A service to report on.  C{factory.open}, when it has one, is the
        set of its open client connections (C{txlb_active_connections});
        C{policy} are the lines C{--check} prints about its traffic policy,
        shown on the status page.
        """
        self.services[name] = _ServiceInfo(name, protocol, tuple(pools), factory, tuple(policy))
        self.connections.setdefault(name, 0)

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.observe)

    def stopService(self) -> None:
        globalLogPublisher.removeObserver(self.observe)
        return super().stopService()

    def observe(self, event: dict) -> None:
        """A log observer: counts the pools' C{server_ejected} events."""
        if event.get("event") == "server_ejected":
            key = (event.get("pool", ""), event.get("server", ""))
            self.ejections[key] = self.ejections.get(key, 0) + 1

    # The hot path.

    def httpRequest(self, service: str, exchange: Any) -> None:
        """
        One HTTP exchange is over (answered, refused or abandoned).  Reads
        the exchange's C{pool}, C{server}, C{status}, C{started} (a
        C{time.monotonic()} stamp), C{bytesSent}, C{received}, C{tried},
        C{requestId}, C{reason}, C{protocol} (else C{version}) and, when the
        service caches, C{cacheResult}.
        """
        pool = exchange.pool
        retried = len(exchange.tried)
        if retried and pool is not None and retried > pool.retries:
            retried = pool.retries
        cached = getattr(exchange, "cacheResult", None)
        if cached is not None:
            key = (service, cached)
            self.cacheRequests[key] = self.cacheRequests.get(key, 0) + 1
        key = (service, getattr(exchange, "protocol", None) or "HTTP/" + getattr(exchange, "version", "1.1"))
        self.protocols[key] = self.protocols.get(key, 0) + 1
        self.request(
            service, pool, exchange.server, exchange.status,
            time.monotonic() - exchange.started,
            getattr(exchange, "received", 0), exchange.bytesSent,
            retried, exchange.requestId, exchange.reason,
        )

    def request(
        self,
        service: str,
        pool: Optional[Pool],
        server: Optional[Server],
        status: int,
        seconds: Optional[float],
        bytesIn: int,
        bytesOut: int,
        retried: int = 0,
        requestId: Optional[str] = None,
        reason: str = "",
    ) -> None:
        """
        Count one finished request (C{status} an HTTP code) or TCP
        connection (C{status} 0, C{seconds} L{None}: its duration is not a
        latency).
        """
        poolName = pool.name if pool is not None else ""
        serverName = server.name if server is not None else ""
        now = self.clock.seconds()
        second = int(now)
        error = status >= 500
        if seconds is None:
            bucket = None
        else:
            bucket = latencyBucket(seconds)
            key = (service, poolName)
            histogram = self.durations.get(key)
            if histogram is None:
                histogram = self.durations[key] = [0] * (len(DURATION_BUCKETS) + 2)
            histogram[bisect_left(DURATION_BUCKETS, seconds)] += 1
            histogram[-1] += seconds
        if status:
            key = (service, poolName, serverName, status)
            requests = self.requests
            requests[key] = requests.get(key, 0) + 1
        key = (service, poolName)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = Window(HISTORY)
        window.add(second, bucket, error)
        counts = self.bytes
        key = (service, "in")
        counts[key] = counts.get(key, 0) + bytesIn
        key = (service, "out")
        counts[key] = counts.get(key, 0) + bytesOut
        if retried:
            key = (service, poolName)
            self.retries[key] = self.retries.get(key, 0) + retried
        if server is not None:
            self.decisions.append((
                now, requestId, service, poolName, pool.algorithm, serverName, reason,
                server.active, server.responseTime, server.weight, retried, status,
            ))

    def connectionStarted(self, service: str) -> None:
        """A client connected to C{service}."""
        self.connections[service] = self.connections.get(service, 0) + 1

    def refused(self, service: str, reason: str) -> None:
        """
        A client of C{service} was turned away before any backend was
        touched: C{reason} names the rule (C{deny}, C{rate_limit},
        C{proxy_header}, C{client_cert}, ...), lower-case, one word.
        """
        key = (service, reason)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def reloaded(self, ok: bool, when: float) -> None:
        """A reload was applied (C{ok}) or rejected, at C{when} (seconds since the epoch)."""
        self.lastReloadOk = ok
        if ok:
            self.lastReloadSuccess = when

    def healthCheck(self, pool: str, server: str, ok: bool) -> None:
        """
        One active health check of C{server} in C{pool} finished: passed
        (C{ok}) or failed (a timeout counts as failed).  Called by the
        health checks once per check, whatever the rise/fall verdict.
        """
        key = (pool, server, "passed" if ok else "failed")
        self.healthChecks[key] = self.healthChecks.get(key, 0) + 1

    # Reading.

    def exposition(self, openmetrics: bool = False) -> bytes:
        """The Prometheus text format of everything (with C{openmetrics}, the OpenMetrics one)."""
        return generateOpenMetrics(self.registry) if openmetrics else generate_latest(self.registry)

    def activeConnections(self, service: str) -> int:
        info = self.services.get(service)
        factory = info.factory if info is not None else None
        open_ = getattr(factory, "open", None)
        return len(open_) if open_ is not None else 0

    def caches(self) -> dict[str, Any]:
        """The response caches (L{txlb.cache.ResponseCache}) of the services that cache, by name."""
        out = {}
        for name, info in list(self.services.items()):
            cache = getattr(getattr(info.factory, "service", None), "cache", None)
            if cache is not None:
                out[name] = cache
        return out

    def udpServices(self) -> dict[str, Any]:
        """The UDP services' balancers (L{txlb.udp.UDPBalancer}), by name: they keep their own counts."""
        return {name: info.factory for name, info in list(self.services.items())
                if info.protocol == "udp" and hasattr(info.factory, "counters")}

    def udpFigures(self, service: str) -> Optional[dict[str, Any]]:
        """
        A UDP service's figures, or L{None} for a service that is not UDP:
        C{{"servers": {(pool, server): [flows, datagrams in, datagrams out,
        bytes in, bytes out]}, "dropped": {reason: n}}}, read from its
        balancer (L{txlb.udp.UDPBalancer.figures}).
        """
        balancer = self.udpServices().get(service)
        if balancer is None:
            return None
        return {"servers": balancer.figures(), "dropped": dict(balancer.dropped)}

    def _cacheStats(self, name: str, cache: Any) -> dict[str, Any]:
        results = {r: self.cacheRequests.get((name, r), 0) for r in ("HIT", "MISS", "STALE", "BYPASS")}
        return {"entries": len(cache), "bytes": cache.size, "maxBytes": cache.maxSize,
                "maxObjectBytes": cache.maxObject, "waiting": cache.waiting(), "requests": results}

    def stats(self, history: bool = True) -> dict[str, Any]:
        """What C{GET /api/stats} answers."""
        now = self.clock.seconds()
        pools = []
        healthy = unhealthy = 0
        for pool in list(self.pools.values()):
            entry = self._poolStats(pool, now, history)
            healthy += entry["healthyBackends"]
            unhealthy += entry["unhealthyBackends"]
            pools.append(entry)
        services = []
        caches = self.caches()
        for info in list(self.services.values()):
            entry = {"name": info.name, "protocol": info.protocol, "pools": list(info.pools)}
            if info.policy:
                entry["policy"] = list(info.policy)
            entry.update(_windowStats(self.window(service=info.name), now, history))
            entry["activeConnections"] = self.activeConnections(info.name)
            entry["connectionsTotal"] = self.connections.get(info.name, 0)
            if info.name in caches:
                entry["cache"] = self._cacheStats(info.name, caches[info.name])
            if info.protocol == "udp":
                entry["udp"] = udpJson(self.udpFigures(info.name))
            services.append(entry)
        out = {
            "time": round(now, 3),
            "window": {"rateSeconds": RATE_WINDOW, "latencySeconds": LATENCY_WINDOW},
        }
        out.update(_windowStats(self.window(), now, history))
        out["activeConnections"] = sum(s["activeConnections"] for s in services)
        out["healthyBackends"] = healthy
        out["unhealthyBackends"] = unhealthy
        out["services"] = services
        out["pools"] = pools
        return out

    def window(self, service: Optional[str] = None, pool: Optional[str] = None) -> Window:
        """
        The traffic of one service, of one pool, or (neither given) of
        everything: the sum of the C{(service, pool)} windows in scope.
        """
        windows = [w for (s, p), w in list(self.windows.items())
                   if (service is None or s == service) and (pool is None or p == pool)]
        if len(windows) == 1:
            return windows[0]
        out = Window(HISTORY)
        for w in windows:
            out.merge(w.slots())
        return out

    def _poolStats(self, pool: Pool, now: float, history: bool) -> dict[str, Any]:
        servers = list(pool)
        entry = {"name": pool.name, "algorithm": pool.algorithm}
        entry.update(_windowStats(self.window(pool=pool.name), now, history))
        entry["activeConnections"] = sum(max(s.active, 0) for s in servers)
        entry["healthyBackends"] = sum(1 for s in servers if s.state is ServerState.UP)
        entry["unhealthyBackends"] = sum(1 for s in servers if s.state in _UNHEALTHY)
        entry["otherBackends"] = len(servers) - entry["healthyBackends"] - entry["unhealthyBackends"]
        return entry


def udpJson(figures: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """
    A UDP service's part of C{/api/stats} from L{Metrics.udpFigures}: its
    live flows, datagrams and bytes both ways and drops, in all and by
    server (C{in}: client to server, C{out}: server to client).
    """
    figures = figures or {}
    servers = []
    totals = [0, 0, 0, 0, 0]
    for (pool, server), values in sorted((figures.get("servers") or {}).items()):
        servers.append({"pool": pool, "server": server, **dict(zip(_UDP_FIELDS, values))})
        for i, n in enumerate(values):
            totals[i] += n
    dropped = dict(figures.get("dropped") or {})
    return {**dict(zip(_UDP_FIELDS, totals)), "dropped": dropped, "droppedTotal": sum(dropped.values()),
            "servers": servers}


#: The names of L{txlb.udp.UDPBalancer.figures}' columns in C{/api/stats}.
_UDP_FIELDS = ("flows", "datagramsIn", "datagramsOut", "bytesIn", "bytesOut")


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


def _windowStats(window: Window, now: float, history: bool) -> dict[str, Any]:
    recent, _ = window.count(now, RATE_WINDOW)
    total, errors = window.count(now, LATENCY_WINDOW)
    p50, p95, p99 = window.percentiles(now, LATENCY_WINDOW, (0.5, 0.95, 0.99))
    out = {
        "requestsPerSecond": round(recent / RATE_WINDOW, 3),
        "p50LatencyMs": _ms(p50),
        "p95LatencyMs": _ms(p95),
        "p99LatencyMs": _ms(p99),
        "backend5xxRate": round(errors / total, 4) if total else 0.0,
        "requests": total,
    }
    if history:
        out["history"] = window.history(now, HISTORY, 5)
    return out


class _Collector:
    """Builds the Prometheus families from L{Metrics} at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator:
        m = self.metrics
        build = GaugeMetricFamily("txlb_build_info", "Always 1; the version of txlb that runs.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        reloadOk = GaugeMetricFamily("txlb_config_last_reload_successful",
                                     "1 when the last reload of the config was applied (or none was asked), "
                                     "0 when it was rejected.")
        reloadOk.add_metric([], 1 if m.lastReloadOk else 0)
        yield reloadOk
        reloadTime = GaugeMetricFamily("txlb_config_last_reload_success_timestamp_seconds",
                                       "When the running config took effect: start-up, or the last reload "
                                       "applied (seconds since the epoch).")
        reloadTime.add_metric([], m.lastReloadSuccess)
        yield reloadTime

        requests = CounterMetricFamily(
            "txlb_requests", "HTTP requests answered, by service, pool, server and status code.",
            labels=["service", "pool", "server", "code"],
        )
        for (service, pool, server, code), n in list(m.requests.items()):
            requests.add_metric([service, pool, server, str(code)], n)
        yield requests

        durations = HistogramMetricFamily(
            "txlb_request_duration_seconds",
            "Time from a request's head to the end of its answer, by service and pool.",
            labels=["service", "pool"],
        )
        for (service, pool), counts in list(m.durations.items()):
            cumulative, buckets = 0, []
            for label, n in zip(_BUCKET_LABELS, counts):
                cumulative += n
                buckets.append((label, cumulative))
            durations.add_metric([service, pool], buckets, counts[-1])
        yield durations

        connections = CounterMetricFamily(
            "txlb_connections", "Client connections accepted, by service.", labels=["service"]
        )
        active = GaugeMetricFamily(
            "txlb_active_connections", "Client connections open now, by service.", labels=["service"]
        )
        for name in list(m.services):
            connections.add_metric([name], m.connections.get(name, 0))
            active.add_metric([name], m.activeConnections(name))
        yield connections
        yield active

        yield _counters("txlb_bytes", "Bytes from clients (in) and to clients (out), by service.",
                        ["service", "direction"], m.bytes)

        up = GaugeMetricFamily(
            "txlb_server_up", "1 when the server is in rotation (state up), else 0.", labels=["pool", "server"]
        )
        serverActive = GaugeMetricFamily(
            "txlb_server_active_connections", "Requests or connections in flight on the server.",
            labels=["pool", "server"],
        )
        serverTotal = CounterMetricFamily(
            "txlb_server_picks", "Times the server was picked.", labels=["pool", "server"]
        )
        for pool in list(m.pools.values()):
            for server in list(pool):
                labels = [pool.name, server.name]
                up.add_metric(labels, 1 if server.state is ServerState.UP else 0)
                serverActive.add_metric(labels, max(server.active, 0))
                serverTotal.add_metric(labels, server.total)
        yield up
        yield serverActive
        yield serverTotal

        yield _counters("txlb_retries", "Tries on another server after a connect failed.",
                        ["service", "pool"], m.retries)
        yield _counters("txlb_health_checks", "Active health checks, by pool, server and result (passed or failed).",
                        ["pool", "server", "result"], m.healthChecks)
        yield _counters("txlb_refused", "Clients turned away before reaching a backend, by service and reason "
                        "(deny, rate_limit, proxy_header, ...).", ["service", "reason"], m.refusals)
        yield _counters("txlb_http_requests", "HTTP requests by service and the protocol the client spoke "
                        "(http/1.0, http/1.1, http/2).", ["service", "protocol"],
                        {(service, protocol.lower()): n for (service, protocol), n in list(m.protocols.items())})
        yield _counters("txlb_ejections", "Servers ejected by passive outlier detection.",
                        ["pool", "server"], m.ejections)
        # Label values are lower-case, as Prometheus conventions have them;
        # the X-Cache header keeps HTTP's upper-case words.
        yield _counters("txlb_cache_requests",
                        "Requests to caching services, by service and result (hit, miss, stale, bypass).",
                        ["service", "result"],
                        {(service, result.lower()): n for (service, result), n in list(m.cacheRequests.items())})

        cacheBytes = GaugeMetricFamily("txlb_cache_bytes", "Bytes the stored responses take, by service.",
                                       labels=["service"])
        cacheEntries = GaugeMetricFamily("txlb_cache_entries", "Stored responses, by service.", labels=["service"])
        for name, cache in m.caches().items():
            cacheBytes.add_metric([name], cache.size)
            cacheEntries.add_metric([name], len(cache))
        yield cacheBytes
        yield cacheEntries

        # UDP services: read from their balancers at scrape time, nothing per datagram here.
        datagrams = CounterMetricFamily(
            "txlb_udp_datagrams", "Datagrams relayed by UDP services, by service, pool, server and direction "
            "(in: client to server, out: server to client).", labels=["service", "pool", "server", "direction"])
        udpBytes = CounterMetricFamily(
            "txlb_udp_bytes", "Bytes of the datagrams relayed by UDP services, by service, pool, server and "
            "direction.", labels=["service", "pool", "server", "direction"])
        dropped = CounterMetricFamily(
            "txlb_udp_dropped", "Datagrams UDP services dropped, by service and reason (max_flows, no_server, "
            "socket, send).", labels=["service", "reason"])
        for name, balancer in m.udpServices().items():
            for (pool, server), (dIn, dOut, bIn, bOut) in balancer.counters().items():
                datagrams.add_metric([name, pool, server, "in"], dIn)
                datagrams.add_metric([name, pool, server, "out"], dOut)
                udpBytes.add_metric([name, pool, server, "in"], bIn)
                udpBytes.add_metric([name, pool, server, "out"], bOut)
            for reason, n in balancer.dropped.items():
                dropped.add_metric([name, reason], n)
        yield datagrams
        yield udpBytes
        yield dropped


def _counters(name: str, documentation: str, labels: list[str], counts: Mapping) -> CounterMetricFamily:
    """A counter family from a dict of label tuples to counts."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in list(counts.items()):
        family.add_metric(list(key), n)
    return family
