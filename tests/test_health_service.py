"""
Health checks as an operator meets them: twistd txlb with checks on real
HTTP backends whose /health the test flips, and servers added through the
admin API.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.support import Backend, httpAnswer, httpRequests, Txlb, freePort, waitFor


def flippable(name: str, health: dict) -> Backend:
    """An HTTP backend whose /health answers health["status"] (and body)."""

    def serve(sock, backend):
        for head in httpRequests(sock):
            path = head.split(b" ", 2)[1]
            if path == b"/health":
                status = health["status"]
                body = json.dumps(health.get("body", {"status": "healthy"})).encode()
            else:
                status, body = 200, json.dumps({"server": name}).encode()
            httpAnswer(sock, status, body)

    return Backend(name, serve)


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return json.loads(response.read())["server"]


def config(web: int, admin: int, backends, health: str) -> str:
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    return (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        f'[pools.api]\nalgorithm = "round_robin"\nservers = [{servers}]\n'
        f"[pools.api.health]\n{health}\n"
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{web}:interface=127.0.0.1"\npool = "api"\n'
    )


@pytest.fixture
def running(tmp_path):
    states = [{"status": 200}, {"status": 200}, {"status": 200}]
    backends = [flippable(f"s{i}", states[i]) for i in range(3)]
    web, admin = freePort(), freePort()
    health = 'kind = "http"\npath = "/health"\ninterval = "200ms"\ntimeout = "150ms"\nrise = 2\nfall = 3'
    lb = Txlb(config(web, admin, backends, health), tmp_path).start(listening=2)
    yield lb, web, admin, backends, states
    lb.stop()
    for b in backends:
        b.stop()


def test_unhealthy_server_leaves_and_comes_back(running):
    lb, web, admin, backends, states = running
    states[1]["status"] = 503
    states[1]["body"] = {"status": "unhealthy", "database": "timeout"}
    flipped = time.monotonic()
    [down] = waitFor(lambda: lb.events("server_state"), timeout=10, what="s1 to leave rotation")
    # fall (3) x interval (200ms), plus one interval, plus the jitter and slack of a busy machine.
    assert time.monotonic() - flipped < 3 * 0.2 + 0.2 + 1.0
    assert (down["server"], down["health"], down["action"]) == ("s1", "unhealthy", "removed_from_rotation")
    assert down["reason"].startswith("3 consecutive failures: HTTP 503")
    assert '"database": "timeout"' in down["reason"]
    assert Counter(get(web) for _ in range(12)) == {"s0": 6, "s2": 6}
    states[1]["status"] = 200
    waitFor(lambda: len(lb.events("server_state")) == 2, timeout=10, what="s1 to come back")
    up = lb.events("server_state")[1]
    assert (up["server"], up["action"], up["reason"]) == ("s1", "added_to_rotation", "2 consecutive passes")
    assert set(get(web) for _ in range(6)) == {"s0", "s1", "s2"}


def addServer(admin: int, name: str, address: str) -> dict:
    body = json.dumps({"name": name, "address": address}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{admin}/api/pools/api/servers", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
        return json.loads(response.read())


def state(admin: int, name: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/pools/api", timeout=10) as response:
        return {s["name"]: s["state"] for s in json.loads(response.read())["servers"]}[name]


def test_servers_added_through_the_api_join_only_after_passing(running):
    lb, web, admin, backends, states = running
    good, bad = flippable("new-good", {"status": 200}), flippable("new-bad", {"status": 500})
    try:
        assert addServer(admin, "new-good", good.address)["state"] == "checking"
        assert addServer(admin, "new-bad", bad.address)["state"] == "checking"
        [added] = waitFor(lambda: lb.events("server_added"), timeout=10, what="new-good to pass")
        assert (added["server"], added["healthCheck"], added["action"]) == (
            "new-good", "passed", "added_to_load_balancer_pool")
        waitFor(lambda: state(admin, "new-bad") == "down", timeout=10, what="new-bad to be found down")
        served = Counter(get(web) for _ in range(40))
        assert served["new-good"] == 10 and "new-bad" not in served
        assert bad.connections >= 3 and good.connections >= 2  # only checks reached new-bad
    finally:
        good.stop()
        bad.stop()


def test_expect_json_keeps_out_a_server_that_is_only_healthy(tmp_path):
    backends = [flippable("ready", {"status": 200, "body": {"status": "ready"}}),
                flippable("healthy", {"status": 200, "body": {"status": "healthy"}})]
    web, admin = freePort(), freePort()
    health = ('kind = "http"\ninterval = "200ms"\ntimeout = "150ms"\nfall = 2\n'
              'expect_json = { status = ["ready"] }')
    lb = Txlb(config(web, admin, backends, health), tmp_path).start(listening=2)
    try:
        [down] = waitFor(lambda: lb.events("server_state"), timeout=10)
        assert down["server"] == "healthy"
        assert all(get(web) == "ready" for _ in range(6))
    finally:
        lb.stop()
        for b in backends:
            b.stop()


def test_a_server_failing_live_traffic_is_ejected_while_its_health_passes(tmp_path):
    def failing(sock, backend):
        for head in httpRequests(sock):
            healthy = head.split(b" ", 2)[1] == b"/health"
            status, body = (200, b'{"status": "healthy"}') if healthy else (500, b'{"error": "broken"}')
            httpAnswer(sock, status, body)

    good = flippable("good", {"status": 200})
    bad = Backend("bad", failing)
    web, admin = freePort(), freePort()
    health = 'kind = "http"\ninterval = "200ms"\ntimeout = "150ms"\n[pools.api.passive]\nconsecutive_failures = 3\neject_for = "60s"'
    lb = Txlb(config(web, admin, [good, bad], health), tmp_path).start(listening=2)
    try:
        statuses = []
        for _ in range(6):
            try:
                get(web)
                statuses.append(200)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        assert statuses.count(500) == 3  # round robin: every other one, until the third
        [ejected] = waitFor(lambda: lb.events("server_ejected"))
        assert (ejected["server"], ejected["ejectFor"]) == ("bad", 60.0)
        assert ejected["reason"] == "3 consecutive failures: HTTP 500"
        assert all(get(web) == "good" for _ in range(20))
        assert state(admin, "bad") == "ejected"
        assert lb.events("server_state") == []  # health checks kept passing
    finally:
        lb.stop()
        good.stop()
        bad.stop()
