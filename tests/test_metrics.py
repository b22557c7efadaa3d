"""
L{txlb.observe.metrics} and L{txlb.observe.stats}: counting on a L{Clock}, the Prometheus
exposition read back with prometheus_client's own parser.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import Logger

from txlb.balance.pool import Pool, Server, ServerState
from txlb.balance.schedulers.least import LeastConnections
from txlb.interfaces import PickContext
from txlb.observe.metrics import Metrics
from txlb.observe.stats import DecisionLog, Window, bucketSeconds, latencyBucket


def samples(metrics: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def total(found: dict, name: str, **labels) -> float:
    return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def makePool(clock, *names: str) -> Pool:
    return Pool("api", "least_connections", LeastConnections(), [Server(n, f"tcp:host=127.0.0.1:port={9000 + i}") for i, n in enumerate(names)], clock)


def setup(*names: str):
    clock = Clock()
    clock.advance(1000)
    pool = makePool(clock, *names or ("a", "b", "c"))
    factory = SimpleNamespace(open={object(), object()})
    metrics = Metrics({"api": pool}, clock, decisions=5)
    metrics.addService("web", "http", ("api",), factory)
    return clock, pool, metrics


def test_latency_buckets_are_within_five_percent():
    for seconds in (0.0001, 0.002, 0.02, 0.5, 3.0, 40.0):
        middle = bucketSeconds(latencyBucket(seconds))
        assert abs(middle - seconds) / seconds < 0.05
    assert latencyBucket(0) == 0 and bucketSeconds(0) > 0


def test_window_rate_and_percentiles_forget_old_seconds():
    window = Window(60)
    for i in range(100):
        window.add(1000, latencyBucket((i + 1) / 1000), i >= 95)
    assert window.count(1000.5, 10) == (100, 5)
    p50, p95, p99 = window.percentiles(1000.5, 60, (0.5, 0.95, 0.99))
    assert 0.047 < p50 < 0.053 and 0.09 < p95 < 0.1 and 0.094 < p99 < 0.104
    assert window.count(1010, 10) == (0, 0)
    assert window.count(1059, 60) == (100, 5)
    # The ring slot is reused a full turn later: the old second is gone.
    window.add(1060, None, False)
    assert window.count(1060, 60) == (1, 0)
    assert window.percentiles(1060, 60, (0.5,)) == [None]


def test_window_history_points():
    window = Window(300)
    window.add(995, latencyBucket(0.02), False)
    window.add(999, latencyBucket(0.02), True)
    window.add(1000, latencyBucket(0.02), False)
    points = window.history(1000.2, 20, 5)
    assert [p["t"] for p in points] == [980, 985, 990, 995]
    assert points[3]["rps"] == 0.4 and points[3]["errors"] == 1
    assert 19 < points[3]["p95Ms"] < 21
    assert points[0]["p95Ms"] is None


def test_decision_log_is_bounded_and_newest_first():
    log = DecisionLog(3)
    for i in range(5):
        log.append((i, f"r{i}", "web", "api", "rr", "a", "round robin", 1, 0.25, 1, 0, 200))
    assert len(log) == 3
    out = log.last(10)
    assert [d["requestId"] for d in out] == ["r4", "r3", "r2"]
    assert out[0]["serverResponseTimeMs"] == 250.0
    assert log.last(1)[0]["time"] == 4


def test_requests_counted_and_exposed():
    clock, pool, metrics = setup()
    a = pool.server("a")
    for status in [200] * 30 + [500] * 5:
        metrics.request("web", pool, a, status, 0.02, 10, 100, requestId="r")
    metrics.request("web", None, None, 400, 0.0001, 0, 50)
    found = samples(metrics)
    assert total(found, "txlb_requests_total") == 36
    assert total(found, "txlb_requests_total", code="500") == 5
    assert total(found, "txlb_requests_total", server="a", code="200") == 30
    assert total(found, "txlb_request_duration_seconds_count", pool="api") == 35
    assert total(found, "txlb_request_duration_seconds_bucket", pool="api", le="0.01") == 0
    assert total(found, "txlb_request_duration_seconds_bucket", pool="api", le="0.025") == 35
    assert abs(total(found, "txlb_request_duration_seconds_sum", pool="api") - 0.7) < 1e-9
    assert total(found, "txlb_bytes_total", direction="in") == 350
    assert total(found, "txlb_bytes_total", direction="out") == 3550
    assert total(found, "txlb_active_connections", service="web") == 2


def test_build_info_names_the_version():
    from txlb import __version__

    _, _, metrics = setup()
    [info] = samples(metrics)["txlb_build_info"]
    assert info.labels == {"version": __version__} and info.value == 1


def test_label_values_are_lower_case():
    _, _, metrics = setup()
    metrics.cacheRequests[("web", "HIT")] = 2
    metrics.cacheRequests[("web", "MISS")] = 1
    found = samples(metrics)
    assert total(found, "txlb_cache_requests_total", result="hit") == 2
    assert total(found, "txlb_cache_requests_total", result="miss") == 1
    values = [v for sampled in found.values() for s in sampled for k, v in s.labels.items()
              if k not in ("service", "pool", "server", "version", "le")]
    assert values and all(v == v.lower() for v in values)


def test_server_gauges_read_the_pool_at_scrape_time():
    clock, pool, metrics = setup()
    pool.setState(pool.server("c"), ServerState.DOWN)
    decision = pool.pick(PickContext("127.0.0.1"), ())
    found = samples(metrics)
    up = {s.labels["server"]: s.value for s in found["txlb_server_up"]}
    assert up == {"a": 1, "b": 1, "c": 0}
    active = {s.labels["server"]: s.value for s in found["txlb_server_active_connections"]}
    assert active[decision.server.name] == 1 and sum(active.values()) == 1
    pool.release(decision.server)
    assert total(samples(metrics), "txlb_server_active_connections") == 0


def test_health_checks_ejections_retries_and_connections():
    clock, pool, metrics = setup()
    metrics.healthCheck("api", "a", True)
    metrics.healthCheck("api", "a", True)
    metrics.healthCheck("api", "b", False)
    metrics.observe({"event": "server_ejected", "pool": "api", "server": "b"})
    metrics.observe({"event": "request"})
    metrics.addService("db", "tcp", ("api",), None)
    metrics.connectionStarted("db")
    metrics.request("db", pool, pool.server("a"), 0, None, 5, 7, retried=2)
    found = samples(metrics)
    assert total(found, "txlb_health_checks_total", result="passed") == 2
    assert total(found, "txlb_health_checks_total", server="b", result="failed") == 1
    assert total(found, "txlb_ejections_total", server="b") == 1
    assert total(found, "txlb_retries_total", service="db") == 2
    assert total(found, "txlb_connections_total", service="db") == 1
    # A TCP connection is not an HTTP request and has no latency.
    assert total(found, "txlb_requests_total") == 0
    assert metrics.stats()["services"][1]["requests"] == 1
    assert metrics.stats()["p95LatencyMs"] is None


def test_ejections_seen_on_the_log_while_running():
    clock, pool, metrics = setup()
    metrics.startService()
    try:
        Logger(namespace="txlb.balance.pool").info("x", event="server_ejected", pool="api", server="a")
    finally:
        metrics.stopService()
    Logger(namespace="txlb.balance.pool").info("x", event="server_ejected", pool="api", server="a")
    assert metrics.ejections == {("api", "a"): 1}


def test_stats_rates_percentiles_and_health():
    clock, pool, metrics = setup()
    a = pool.server("a")
    for i in range(20):
        metrics.request("web", pool, a, 500 if i < 2 else 200, 0.02 + i / 10000, 0, 0)
    clock.advance(1)
    pool.setState(pool.server("c"), ServerState.DOWN)
    pool.drain(pool.server("b"))
    stats = metrics.stats()
    assert stats["requestsPerSecond"] == 2.0
    assert 19 < stats["p50LatencyMs"] < 23 and 20 < stats["p95LatencyMs"] < 23
    assert stats["backend5xxRate"] == 0.1
    assert (stats["healthyBackends"], stats["unhealthyBackends"]) == (1, 1)
    assert stats["activeConnections"] == 2
    [web] = stats["services"]
    assert (web["name"], web["protocol"], web["pools"]) == ("web", "http", ["api"])
    assert web["requestsPerSecond"] == 2.0
    [api] = stats["pools"]
    assert (api["name"], api["algorithm"], api["otherBackends"]) == ("api", "least_connections", 1)
    # The second under way is left out; the newest point spans one second.
    assert api["history"][-1]["t"] == 1000 and api["history"][-1]["rps"] == 20.0
    assert api["history"][-1]["errors"] == 2
    clock.advance(11)
    later = metrics.stats(history=False)
    assert later["requestsPerSecond"] == 0 and later["p95LatencyMs"] is not None
    assert "history" not in later
    clock.advance(60)
    assert metrics.stats()["p95LatencyMs"] is None


def test_http_exchange_read_and_decision_recorded():
    clock, pool, metrics = setup()
    decision = pool.pick(PickContext("127.0.0.1"), ())
    pool.observeResponseTime(decision.server, 0.015)
    exchange = SimpleNamespace(
        pool=pool, server=decision.server, status=200, started=time.monotonic() - 0.01, bytesSent=120,
        received=5, tried=[pool.server("c")], requestId="abc", reason=decision.reason,
    )
    pool.release(decision.server)
    metrics.httpRequest("web", exchange)
    [d] = metrics.decisions.last(10)
    assert d["requestId"] == "abc" and d["service"] == "web" and d["pool"] == "api"
    assert d["algorithm"] == "least_connections" and "connections" in d["reason"]
    assert d["selectedServer"] == decision.server.name and d["serverResponseTimeMs"] == 15.0
    assert d["retried"] == 1 and d["status"] == 200
    found = samples(metrics)
    assert total(found, "txlb_retries_total") == 1
    assert total(found, "txlb_bytes_total", direction="in") == 5


def test_per_request_cost_is_a_few_microseconds():
    """
    A loose guard against an accidental slow path (the measured figure is
    in bench/metrics.py and docs/observability.md).
    """
    clock, pool, metrics = setup()
    a = pool.server("a")
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        metrics.request("web", pool, a, 200, 0.02, 100, 1000, 0, "r", "fewest active connections (0)")
    perRequest = (time.perf_counter() - start) / n
    assert perRequest < 50e-6


def test_refusals_are_counted_by_service_and_reason():
    clock, pool, metrics = setup()
    metrics.refused("web", "deny")
    metrics.refused("web", "deny")
    metrics.refused("web", "rate_limit")
    found = samples(metrics)
    assert total(found, "txlb_refused_total", service="web", reason="deny") == 2
    assert total(found, "txlb_refused_total", reason="rate_limit") == 1


def test_one_window_per_service_and_pool_the_rest_summed_when_read():
    clock, pool, metrics = setup()
    other = Pool("static", "least_connections", LeastConnections(), [Server("s", "tcp:host=127.0.0.1:port=9100")], clock)
    metrics.pools["static"] = other
    metrics.addService("web", "http", ("api", "static"), None)
    metrics.addService("db", "tcp", ("api",), None)
    for service, p, status in [("web", pool, 200), ("web", pool, 503), ("web", other, 200), ("db", pool, 0),
                               ("web", None, 404)]:
        metrics.request(service, p, None, status, 0.002 if status else None, 1, 1)
    assert set(metrics.windows) == {("web", "api"), ("web", "static"), ("db", "api"), ("web", "")}
    clock.advance(1)
    stats = metrics.stats()
    services = {s["name"]: s for s in stats["services"]}
    pools = {p["name"]: p for p in stats["pools"]}
    counts = {name: sum(slot[1] for slot in metrics.window(service=name).slots()) for name in ("web", "db")}
    assert counts == {"web": 4, "db": 1}
    assert sum(slot[1] for slot in metrics.window(pool="api").slots()) == 3
    assert sum(slot[1] for slot in metrics.window().slots()) == 5
    assert sum(slot[2] for slot in metrics.window(service="web").slots()) == 1  # the 503
    assert services["web"]["requests"] == 4 and pools["api"]["requests"] == 3
