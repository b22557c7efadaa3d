# -*- test-case-name: tests.test_workers -*-
"""
Adding up what the worker processes counted (C{[txlb] workers > 1}).

Each worker keeps its own L{txlb.observe.metrics.Metrics} and its own live server
figures, exactly as a single process does.  When the admin API is asked,
the master collects the parts it needs from every worker and adds them up
here: Prometheus samples with equal labels are summed, the per-second
windows of L{txlb.observe.stats} are merged slot by slot (their latency histograms
add exactly), UDP services' flows, datagrams and bytes are summed by
server, and servers' in-flight counts and totals are summed into the
master's own L{txlb.balance.pool.Server}s, which serve no traffic of their own.

Everything here takes data and returns data; the collecting is in
L{txlb.service.workers}.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generateOpenMetrics
from prometheus_client.parser import text_string_to_metric_families

from txlb.balance.pool import Pool
from txlb.observe.metrics import HISTORY, Metrics
from txlb.observe.stats import Window

#: Families the master alone knows: its version (one, however many
#: workers), server states and health checks, which are decided there, and
#: ejections, though seen first by a worker, are counted once the master
#: has applied them.
MASTER_FAMILIES = frozenset({
    "txlb_build_info", "txlb_server_up", "txlb_health_checks", "txlb_ejections",
    # Reloads are the master's: it reads the file and tells the workers.
    "txlb_config_last_reload_successful", "txlb_config_last_reload_success_timestamp_seconds",
})

#: Families that describe one process (C{process_*}: CPU, memory, file
#: descriptors, start time): summing them would make nonsense of start
#: times and limits, so each process's samples are kept, with a C{worker}
#: label: C{master} for the master, the slot number for a worker.
#: C{sum(process_resident_memory_bytes)} is still txlb's whole footprint.
PER_PROCESS_PREFIX = "process_"


# What a worker sends.


def serverFigures(pools: Mapping[str, Pool], now: float) -> dict[str, dict[str, list]]:
    """
    A worker's live figures of every server, by pool and server name:
    C{[active, total, responseTime, bandwidth, bytesIn, bytesOut, failures]}.
    """
    out: dict[str, dict[str, list]] = {}
    for pool in list(pools.values()):
        out[pool.name] = {
            s.name: [max(s.active, 0), s.total, s.responseTime, s.bandwidthAt(now), s.bytesIn, s.bytesOut, s.failures]
            for s in list(pool)
        }
    return out


def statsPart(metrics: Metrics) -> dict[str, Any]:
    """A worker's windows and service figures, for the master's C{/api/stats}."""
    services = {}
    for name in list(metrics.services):
        services[name] = [metrics.activeConnections(name), metrics.connections.get(name, 0)]
    caches = {name: metrics._cacheStats(name, cache) for name, cache in metrics.caches().items()}
    udp = {}
    for name in list(metrics.udpServices()):
        figures = metrics.udpFigures(name)
        udp[name] = {
            "servers": [[pool, server, *values] for (pool, server), values in figures["servers"].items()],
            "dropped": figures["dropped"],
        }
    return {
        "windows": [[service, pool, w.slots()] for (service, pool), w in list(metrics.windows.items())],
        "counts": services,
        "caches": caches,
        "udp": udp,
    }


# What the master does with it.


def applyServerFigures(pools: Mapping[str, Pool], replies: Iterable[Mapping[str, Any]], now: float) -> list:
    """
    Write the sums of the workers' figures into the master's servers.

    @return: the C{(pool, server)} pairs that are draining and have
        nothing left in flight in any worker, whose drain the master's
        pool has not finished yet: the caller completes them.
    """
    sums: dict[tuple[str, str], list] = {}
    for reply in replies:
        for poolName, servers in reply.items():
            for name, figures in servers.items():
                acc = sums.get((poolName, name))
                if acc is None:
                    sums[(poolName, name)] = [figures[0], figures[1], figures[2] * figures[1], *figures[3:]]
                else:
                    acc[0] += figures[0]
                    acc[1] += figures[1]
                    acc[2] += figures[2] * figures[1]
                    for i in range(3, len(figures)):
                        acc[i] += figures[i]
    finished = []
    for pool in list(pools.values()):
        for server in list(pool):
            acc = sums.get((pool.name, server.name))
            if acc is None:
                continue
            active, total, weighted, bandwidth, bytesIn, bytesOut, failures = acc
            if server.draining and active == 0 and server.active > 0:
                finished.append((pool, server))
            else:
                server.active = active
            server.total = total
            server.responseTime = weighted / total if total else 0.0
            server._rate = bandwidth
            server._rateStamp = now
            server.bytesIn, server.bytesOut, server.failures = bytesIn, bytesOut, failures
    return finished


def mergeExpositions(master: bytes, workers: Iterable[str], extra: Iterable[Metric] = (),
                     labels: Iterable[str] = (), openmetrics: bool = False) -> bytes:
    """
    One Prometheus text from the master's and the workers': the families
    of L{MASTER_FAMILIES} as the master has them, every other sample the
    sum of the workers' samples with the same name and labels, but for the
    C{process_*} families (L{PER_PROCESS_PREFIX}), whose samples are kept
    per process with a C{worker} label (C{labels}, one per text of
    C{workers}, by default their order).  C{extra} families (the workers'
    own) are added at the end.  C{openmetrics}: in the OpenMetrics format.
    """
    families: dict[str, Metric] = {}
    workers = list(workers)
    labels = list(labels) or [str(i) for i in range(len(workers))]
    sums: dict[str, dict[tuple, list]] = {}

    def family(parsed) -> Metric:
        out = families.get(parsed.name)
        if out is None:
            out = families[parsed.name] = Metric(parsed.name, parsed.documentation, parsed.type)
            sums[parsed.name] = {}
        return out

    for parsed in text_string_to_metric_families(master.decode("utf-8")):
        family(parsed)
        if parsed.name in MASTER_FAMILIES:
            for sample in parsed.samples:
                _add(sums[parsed.name], sample)
        elif parsed.name.startswith(PER_PROCESS_PREFIX):
            for sample in parsed.samples:
                _add(sums[parsed.name], sample, "master")
    for label, text in zip(labels, workers):
        for parsed in text_string_to_metric_families(text):
            if parsed.name in MASTER_FAMILIES:
                continue
            family(parsed)
            perProcess = parsed.name.startswith(PER_PROCESS_PREFIX)
            for sample in parsed.samples:
                _add(sums[parsed.name], sample, label if perProcess else None)
    for name, out in families.items():
        for (sampleName, labels), [value] in sums[name].items():
            out.add_sample(sampleName, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), *extra]))
    return generateOpenMetrics(registry) if openmetrics else generate_latest(registry)


def _add(into: dict[tuple, list], sample, worker: Optional[str] = None) -> None:
    labels = tuple(sample.labels.items())
    if worker is not None:
        labels += (("worker", worker),)
    key = (sample.name, labels)
    acc = into.get(key)
    if acc is None:
        into[key] = [sample.value]
    else:
        acc[0] += sample.value


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


class MergedMetrics(Metrics):
    """
    The master's L{Metrics} as it would read had it served every worker's
    traffic itself: its services and pools, the workers' windows and
    counts.  Built for one C{/api/stats} answer and thrown away.
    """

    def __init__(self, master: Metrics, parts: Iterable[Mapping[str, Any]]) -> None:
        super().__init__(master.pools, master.clock)
        self.services = master.services
        self._counts: dict[str, list[int]] = {}
        self._caches: dict[str, dict] = {}
        self._udp: dict[str, dict] = {}
        for part in parts:
            for service, pool, slots in part["windows"]:
                self.windows.setdefault((service, pool), Window(HISTORY)).merge(slots)
            for name, (active, total) in part["counts"].items():
                acc = self._counts.setdefault(name, [0, 0])
                acc[0] += active
                acc[1] += total
            for name, stats in part["caches"].items():
                self._caches[name] = _addCacheStats(self._caches.get(name), stats)
            for name, figures in part.get("udp", {}).items():
                _addUDPFigures(self._udp.setdefault(name, {"servers": {}, "dropped": {}}), figures)
        for name in self.services:
            self.connections[name] = self._counts.get(name, [0, 0])[1]

    def activeConnections(self, service: str) -> int:
        return self._counts.get(service, [0, 0])[0]

    def caches(self) -> dict[str, Any]:
        return dict(self._caches)

    def udpFigures(self, service: str) -> Optional[dict[str, Any]]:
        info = self.services.get(service)
        if info is None or info.protocol != "udp":
            return None
        return self._udp.get(service, {"servers": {}, "dropped": {}})

    def _cacheStats(self, name: str, cache: Any) -> dict[str, Any]:
        return cache


def _addCacheStats(into: Optional[dict], stats: dict) -> dict:
    if into is None:
        return {**stats, "requests": dict(stats["requests"])}
    for key in ("entries", "bytes", "waiting"):
        into[key] += stats[key]
    for key, n in stats["requests"].items():
        into["requests"][key] = into["requests"].get(key, 0) + n
    return into


def _addUDPFigures(into: dict, figures: Mapping[str, Any]) -> None:
    """One worker's figures of a UDP service (L{statsPart}) added to C{into}: every column is a sum."""
    servers = into["servers"]
    for pool, server, *values in figures["servers"]:
        acc = servers.get((pool, server))
        if acc is None:
            servers[(pool, server)] = list(values)
        else:
            for i, n in enumerate(values):
                acc[i] += n
    dropped = into["dropped"]
    for reason, n in figures["dropped"].items():
        dropped[reason] = dropped.get(reason, 0) + n


def mergeDecisions(parts: Iterable[list[dict]], limit: int) -> list[dict]:
    """The newest C{limit} decisions of all workers, newest first."""
    merged = [d for part in parts for d in part]
    merged.sort(key=lambda d: d["time"], reverse=True)
    return merged[:limit]
