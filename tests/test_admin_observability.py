"""
/metrics, /api/stats and /api/decisions through real HTTP: twistd in a
subprocess, real HTTP backends that take 20 ms per answer, urllib as the
client, the admin API behind a bearer token.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Txlb, freePort, waitFor

TOKEN = "s3cret-token"
DELAY = 0.02


class SlowBackend:
    """
    An HTTP/1.0 server (one request per connection) that answers every
    request after C{DELAY}: C{/fail} with a 500, anything else with a 200
    naming itself.  L{stop} closes it; new connections are then refused.
    """

    def __init__(self, name: str) -> None:
        self.name = name

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(DELAY)  # the backend's own behaviour: a 20 ms service time
                status = 500 if self.path == "/fail" else 200
                body = json.dumps({"server": name}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fetch(url: str, token: str | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def lb(tmp_path_factory):
    directory = tmp_path_factory.mktemp("observability")
    (directory / "admin.token").write_text(TOKEN + "\n")
    backends = [SlowBackend(name) for name in ("a", "b", "c")]
    web, admin = freePort(), freePort()
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    config = f"""
[admin]
listen = "tcp:{admin}:interface=127.0.0.1"
token_file = "admin.token"

[pools.api]
algorithm = "least_connections"
servers = [{servers}]
retries = 2

[pools.api.passive]
consecutive_failures = 3
eject_for = "60s"

[[services]]
name = "web"
protocol = "http"
listen = "tcp:{web}:interface=127.0.0.1"
pool = "api"
"""
    txlb = Txlb(config, directory).start(listening=2)
    yield txlb, f"http://127.0.0.1:{web}", f"http://127.0.0.1:{admin}", backends
    txlb.stop()
    for b in backends:
        b.stop()


def scrape(admin: str) -> dict[str, list]:
    status, headers, body = fetch(admin + "/metrics", TOKEN)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_observability_end_to_end(lb):
    txlb, web, admin, backends = lb

    # The token guards the figures; the page itself is open.
    assert fetch(admin + "/metrics")[0] == 401
    assert fetch(admin + "/api/stats")[0] == 401
    assert fetch(admin + "/api/decisions", "wrong")[0] == 401

    seen = []
    for _ in range(30):
        status, headers, body = fetch(web + "/")
        assert status == 200
        seen.append((headers["X-Request-ID"], json.loads(body)["server"]))
    for _ in range(5):
        assert fetch(web + "/fail")[0] == 500

    found = scrape(admin)
    requests = found["txlb_requests_total"]
    assert sum(s.value for s in requests) == 35
    assert sum(s.value for s in requests if s.labels["code"] == "500") == 5
    assert {s.labels["service"] for s in requests} == {"web"}
    assert {s.labels["server"] for s in requests} == {"a", "b", "c"}
    up = {s.labels["server"]: s.value for s in found["txlb_server_up"]}
    assert up == {"a": 1, "b": 1, "c": 1}
    assert sum(s.value for s in found["txlb_request_duration_seconds_count"]) == 35
    assert sum(s.value for s in found["txlb_server_active_connections"]) == 0
    assert sum(s.value for s in found["txlb_bytes_total"] if s.labels["direction"] == "out") > 0

    status, _, body = fetch(admin + "/api/stats?history=0", TOKEN)
    stats = json.loads(body)
    assert status == 200
    assert 20 <= stats["p50LatencyMs"] <= stats["p95LatencyMs"] <= stats["p99LatencyMs"]
    assert stats["p95LatencyMs"] < 1000
    assert stats["backend5xxRate"] == round(5 / 35, 4)
    assert 0 < stats["requestsPerSecond"] <= 3.5
    assert (stats["healthyBackends"], stats["unhealthyBackends"]) == (3, 0)
    assert stats["requests"] == 35
    [service] = stats["services"]
    assert service["name"] == "web" and service["requests"] == 35 and service["pools"] == ["api"]
    [pool] = stats["pools"]
    assert pool["name"] == "api" and pool["algorithm"] == "least_connections"
    assert "history" not in stats

    status, _, body = fetch(admin + "/api/decisions?limit=10", TOKEN)
    decisions = json.loads(body)
    assert status == 200 and len(decisions) == 10
    newest = decisions[0]
    assert newest["algorithm"] == "least_connections"
    assert "connections" in newest["reason"]
    assert newest["service"] == "web" and newest["pool"] == "api" and newest["status"] == 500
    assert {"selectedServer", "serverActiveConnections", "serverResponseTimeMs", "requestId"} <= set(newest)
    # The decisions of the 200s name the request ids the client saw.
    status, _, body = fetch(admin + "/api/decisions?limit=35", TOKEN)
    byId = {d["requestId"]: d["selectedServer"] for d in json.loads(body)}
    assert all(byId[rid] == server for rid, server in seen)
    assert fetch(admin + "/api/decisions?limit=x", TOKEN)[0] == 400

    # The access events agree.
    events = {e["requestId"]: e for e in waitFor(lambda: len(txlb.events("request")) >= 35 and txlb.events("request"))}
    for rid, server in seen:
        assert (events[rid]["selectedServer"], events[rid]["status"]) == (server, 200)

    # One backend dies: its first connect fails, passive detection ejects it,
    # the request is retried elsewhere.
    backends[2].stop()
    for _ in range(10):
        assert fetch(web + "/")[0] == 200
        if txlb.events("server_ejected"):
            break
    [ejected] = txlb.events("server_ejected")
    assert ejected["server"] == "c"
    stats = json.loads(fetch(admin + "/api/stats", TOKEN)[2])
    assert (stats["healthyBackends"], stats["unhealthyBackends"]) == (2, 1)
    assert stats["history"] and {"t", "rps", "p95Ms", "errors"} == set(stats["history"][-1])
    found = scrape(admin)
    assert {s.labels["server"]: s.value for s in found["txlb_server_up"]} == {"a": 1, "b": 1, "c": 0}
    assert [(s.labels["server"], s.value) for s in found["txlb_ejections_total"]] == [("c", 1)]
    retries = sum(s.value for s in found["txlb_retries_total"])
    assert retries >= 1 and retries == len(txlb.events("connect_failed"))
