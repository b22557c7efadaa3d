"""
What counting costs per request: L{txlb.observe.metrics.Metrics.httpRequest} (the
one call the HTTP proxy makes per answered request) and
L{Metrics.request} (what the TCP balancer calls per connection), against
doing the same with prometheus_client's own labelled metric objects.

    python3 bench/metrics.py [--n 200000]

Figures are CPU time per call on this machine; compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

# The checkout, not bench/ (whose http.py would shadow the standard library's).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from txlb.balance.pool import Pool, Server  # noqa: E402
from txlb.balance.schedulers.least import LeastConnections  # noqa: E402
from txlb.interfaces import PickContext  # noqa: E402
from txlb.observe.metrics import HISTORY, Metrics  # noqa: E402


def perCall(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        fn(n)
        best = min(best, (time.process_time() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200000)
    n = parser.parse_args().n

    clock = Clock()
    clock.advance(1_000_000)
    servers = [Server(f"server-{i}", f"tcp:host=127.0.0.1:port={9000 + i}") for i in range(3)]
    pool = Pool("api", "least_connections", LeastConnections(), servers, clock)
    metrics = Metrics({"api": pool}, clock)
    metrics.addService("web", "http", ("api",), SimpleNamespace(open=set()))
    decision = pool.pick(PickContext("127.0.0.1"), ())
    pool.release(decision.server)
    exchange = SimpleNamespace(
        pool=pool, server=decision.server, status=200, started=time.monotonic(), bytesSent=512,
        received=0, tried=[], requestId="7f1c2a0e-6c1b-4d7a-9a55-6c0b1f0c9d11", reason=decision.reason,
    )

    def baseline(n):
        for _ in range(n):
            pass

    def http(n):
        record = metrics.httpRequest
        for _ in range(n):
            record("web", exchange)

    def tcp(n):
        record = metrics.request
        server = decision.server
        for _ in range(n):
            record("tcp", pool, server, 0, None, 100, 1000, 0, None, "fewest active connections (0)")

    registry = CollectorRegistry()
    counter = Counter("r", "r", ["service", "pool", "server", "code"], registry=registry)
    histogram = Histogram("d", "d", ["service", "pool"], registry=registry)
    bytes_ = Counter("b", "b", ["service", "direction"], registry=registry)

    def client(n):
        for _ in range(n):
            counter.labels("web", "api", "server-0", "200").inc()
            histogram.labels("web", "api").observe(0.02)
            bytes_.labels("web", "out").inc(512)

    base = perCall(baseline, n)
    rows = [
        ("Metrics.httpRequest (HTTP, per request)", perCall(http, n) - base),
        ("Metrics.request (TCP, per connection)", perCall(tcp, n) - base),
        ("prometheus_client labels().inc/observe x3", perCall(client, n) - base),
    ]
    for name, seconds in rows:
        print(f"{name:45} {seconds * 1e6:6.2f} µs")
    print(f"(decision ring {len(metrics.decisions)} entries, windows bounded at {HISTORY} s)")


if __name__ == "__main__":
    main()
