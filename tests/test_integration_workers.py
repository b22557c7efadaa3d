"""
C{[txlb] workers = 2} end to end: C{twistd txlb} with two worker processes
on loopback, real HTTP backends in threads, and the admin API.

Each request here opens a new connection, so that the kernel spreads them
over both workers' sockets; which worker served a request is read from its
C{request} event (C{worker}) and the workers' pids from C{/metrics}.
Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Backend, Txlb, freePort, httpAnswer, httpRequests, poolToml, waitFor


class HTTPBackend(Backend):
    """
    Answers C{GET /health} with 200 (503 once C{healthy} is false) and
    anything else with its name; C{hold} makes C{GET /slow} wait for it.
    """

    def __init__(self, name: str) -> None:
        self.healthy = True
        self.hold = threading.Event()
        self.hits = 0
        super().__init__(name, self._serve)

    def _serve(self, sock: socket.socket, backend: "HTTPBackend") -> None:
        for head in httpRequests(sock):
            path = head.split(b" ", 2)[1]
            if path == b"/health":
                httpAnswer(sock, 200 if self.healthy else 503, b"ok")
                continue
            with self.lock:
                self.hits += 1
            if path == b"/slow":
                self.hold.wait(10)
            httpAnswer(sock, 200, self.name.encode())


@pytest.fixture
def backends():
    made = [HTTPBackend(f"b{i}") for i in range(1, 4)]
    yield made
    for b in made:
        b.hold.set()
        b.stop()


def configFor(port: int, admin: int, backends, health: str = 'kind = "none"', extra: str = "") -> str:
    return (
        '[txlb]\nworkers = 2\nshutdown_timeout = "10s"\n'
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        + poolToml("p", backends, "round_robin", f"[pools.p.health]\n{health}\n")
        + f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{port}:interface=127.0.0.1"\npool = "p"\n'
        + extra
    )


def get(port: int, path: str = "/", method: str = "GET", body=None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def samples(admin: int, name: str) -> list:
    status, text = get(admin, "/metrics")
    assert status == 200
    return [s for family in text_string_to_metric_families(text.decode()) for s in family.samples if s.name == name]


def workerPids(admin: int) -> set[str]:
    return {s.labels["pid"] for s in samples(admin, "txlb_worker_info")}


def started(lb: Txlb, admin: int) -> Txlb:
    """Wait until both workers accept (they tell the master, which logs it)."""
    waitFor(lambda: len({e["worker"] for e in lb.events("worker_started")}) == 2, what="two workers")
    waitFor(lambda: len(workerPids(admin)) == 2, what="two workers answering")
    return lb


def servedBy(lb: Txlb, count: int) -> list[dict]:
    """The first C{count} request events, once they are all in the log."""
    return waitFor(lambda: (lambda e: e if len(e) >= count else None)(lb.events("request")),
                   what=f"{count} request events")


def test_both_workers_serve_and_the_admin_api_adds_them_up(backends):
    port, admin = freePort(), freePort()
    with Txlb(configFor(port, admin, backends)) as lb:
        started(lb, admin)
        for _ in range(60):
            status, _ = get(port)
            assert status == 200
        events = servedBy(lb, 60)
        assert {e["worker"] for e in events} == {0, 1}
        assert len(workerPids(admin)) == 2
        # /metrics: the workers' counts added up, once each.
        assert sum(s.value for s in samples(admin, "txlb_requests_total")) == 60
        [count] = samples(admin, "txlb_request_duration_seconds_count")
        assert count.value == 60
        assert [s.value for s in samples(admin, "txlb_server_up")] == [1.0, 1.0, 1.0]
        # /api/stats and /api/pools too.
        status, body = get(admin, "/api/stats?history=0")
        stats = json.loads(body)
        assert (stats["requests"], stats["workers"]) == (60, 2)
        assert stats["services"][0]["connectionsTotal"] == 60
        status, body = get(admin, "/api/pools/p")
        assert sum(s["totalRequests"] for s in json.loads(body)["servers"]) == 60
        status, body = get(admin, "/api/decisions?limit=5")
        assert len(json.loads(body)) == 5
    assert lb.process.returncode == 0


def test_a_server_found_down_is_avoided_by_every_worker(backends):
    port, admin = freePort(), freePort()
    health = 'kind = "http"\npath = "/health"\ninterval = "100ms"\ntimeout = "100ms"\nrise = 1\nfall = 1'
    with Txlb(configFor(port, admin, backends, health)) as lb:
        started(lb, admin)
        backends[1].healthy = False
        waitFor(lambda: [e for e in lb.events("server_state") if e["server"] == "b2"], what="b2 found down")
        before = backends[1].hits
        for _ in range(40):
            assert get(port)[1] in (b"b1", b"b3")
        assert backends[1].hits == before
        assert {e["worker"] for e in servedBy(lb, 40)} == {0, 1}
        # Checked once, by the master: one verdict, logged once.
        assert len([e for e in lb.events("server_state") if e["server"] == "b2"]) == 1
        assert all("worker" not in e for e in lb.events("server_state"))


def test_admin_drain_and_add_reach_every_worker(backends):
    port, admin = freePort(), freePort()
    extra = HTTPBackend("b4")
    try:
        with Txlb(configFor(port, admin, backends[:2])) as lb:
            started(lb, admin)
            status, _ = get(admin, "/api/pools/p/servers/b1/drain", "POST")
            assert status == 200
            for _ in range(30):
                assert get(port)[1] == b"b2"
            status, _ = get(admin, "/api/pools/p/servers", "POST", {"name": "b4", "address": extra.address})
            assert status == 201
            # Both workers send to the new server.
            def b4ByBoth():
                get(port)
                return {e["worker"] for e in lb.events("request") if e["selectedServer"] == "b4"} == {0, 1}

            waitFor(b4ByBoth, what="b4 picked by both workers")
            status, body = get(admin, "/api/pools/p/servers/b1")
            assert json.loads(body)["state"] == "drained"
    finally:
        extra.stop()


def test_a_drain_ends_when_no_worker_has_the_server_in_flight(backends):
    port, admin = freePort(), freePort()
    with Txlb(configFor(port, admin, backends[:1])) as lb:
        started(lb, admin)
        result: list = []
        slow = threading.Thread(target=lambda: result.append(get(port, "/slow")))
        slow.start()
        waitFor(lambda: backends[0].hits == 1, what="the slow request at the backend")
        status, body = get(admin, "/api/pools/p/servers/b1/drain", "POST")
        assert json.loads(body)["state"] == "draining"
        assert json.loads(body)["activeConnections"] == 1
        assert lb.events("server_drained") == []
        backends[0].hold.set()
        slow.join(10)
        assert result[0][0] == 200
        waitFor(lambda: lb.events("server_drained"), what="server_drained")
        assert len(lb.events("server_drained")) == 1


def test_a_killed_worker_is_started_again(backends):
    port, admin = freePort(), freePort()
    with Txlb(configFor(port, admin, backends)) as lb:
        started(lb, admin)
        [victim] = [s for s in samples(admin, "txlb_worker_info") if s.labels["worker"] == "0"]
        os.kill(int(victim.labels["pid"]), signal.SIGKILL)
        waitFor(lambda: lb.events("worker_exited"), what="worker_exited")
        waitFor(lambda: len(lb.events("worker_started")) == 3, what="the worker started again")
        waitFor(lambda: len(workerPids(admin)) == 2 and victim.labels["pid"] not in workerPids(admin),
                what="two workers answering")
        for _ in range(20):
            assert get(port)[0] == 200
        [restarts] = [s for s in samples(admin, "txlb_worker_restarts_total") if s.labels["worker"] == "0"]
        assert restarts.value == 1
        assert lb.events("worker_exited")[0]["signal"] == signal.SIGKILL
    assert lb.process.returncode == 0


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(backends):
    port, admin = freePort(), freePort()
    lb = Txlb(configFor(port, admin, backends[:1])).start()
    try:
        started(lb, admin)
        result: list = []
        slow = threading.Thread(target=lambda: result.append(get(port, "/slow")))
        slow.start()
        waitFor(lambda: backends[0].hits == 1, what="the slow request at the backend")
        lb.process.send_signal(signal.SIGTERM)
        waitFor(lambda: len([e for e in lb.events("shutdown") if "worker" in e]) == 2, what="workers draining")
        assert lb.process.poll() is None
        backends[0].hold.set()
        slow.join(10)
        assert result == [(200, b"b1")]
        assert lb.process.wait(15) == 0
        assert len(lb.events("worker_stopped")) == 2
        assert lb.events("worker_exited") == []
    finally:
        lb.stop()


def test_reload_of_servers_and_of_services(backends):
    port, admin = freePort(), freePort()
    lb = Txlb(configFor(port, admin, backends[:1]))
    with lb:
        started(lb, admin)
        # Servers only: sent to the running workers.
        lb.configPath.write_text(configFor(port, admin, backends[1:2]))
        status, body = get(admin, "/api/reload", "POST")
        assert status == 200, body
        waitFor(lambda: get(port)[1] == b"b2", what="b2 in rotation")
        for _ in range(20):
            assert get(port)[1] == b"b2"
        assert len(lb.events("worker_started")) == 2
        # A new listener: new workers, which accept on it; the old ones stop.
        second = freePort()
        lb.configPath.write_text(configFor(port, admin, backends[1:2]).replace(
            f'listen = "tcp:{port}:interface=127.0.0.1"',
            f'listen = ["tcp:{port}:interface=127.0.0.1", "tcp:{second}:interface=127.0.0.1"]'))
        status, body = get(admin, "/api/reload", "POST")
        assert status == 200, body
        waitFor(lambda: len(lb.events("worker_stopped")) == 2, what="the old workers stopped")
        assert len(lb.events("worker_started")) == 4
        for _ in range(10):
            assert get(second) == (200, b"b2")
            assert get(port) == (200, b"b2")
    assert lb.process.returncode == 0


def test_a_worker_ejection_is_shared(backends):
    port, admin = freePort(), freePort()
    failing = Backend("bad", lambda sock, b: [httpAnswer(sock, 502, b"no") for _ in httpRequests(sock)])
    try:
        extra = '[pools.p.passive]\nconsecutive_failures = 1\neject_for = "30s"\n'
        config = configFor(port, admin, [backends[0], failing]).replace("[[services]]", extra + "[[services]]")
        with Txlb(config) as lb:
            started(lb, admin)
            waitFor(lambda: get(port)[0] == 502 or None, what="a 502 from the failing server")
            waitFor(lambda: lb.events("server_ejected"), what="server_ejected")
            for _ in range(30):
                assert get(port) == (200, b"b1")
            assert len(lb.events("server_ejected")) == 1
            [ejected] = samples(admin, "txlb_ejections_total")
            assert ejected.value == 1
    finally:
        failing.stop()
