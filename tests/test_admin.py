"""
The admin API through real HTTP: twistd in a subprocess, real backends,
urllib as the client.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest

from tests.support import Backend, httpRequests, Txlb, freePort, poolToml, waitFor


def httpBackend(name: str, gate: Optional[threading.Event] = None) -> Backend:
    """
    An HTTP/1.1 keep-alive backend answering its name; with C{gate}, each
    answer waits until the test sets it (a slow request, without sleeping).
    """

    def serve(sock, backend):
        for head in httpRequests(sock):
            if gate is not None:
                backend.waiting += 1
                gate.wait(30)
            body = json.dumps({"server": name}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    backend = Backend(name, serve)
    backend.waiting = 0
    return backend


class Api:
    def __init__(self, port: int, token: Optional[str] = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def __call__(self, method: str, path: str, body=None, token: Optional[str] = "default"):
        token = self.token if token == "default" else token
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def get(port: int, path: str = "/") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, json.loads(response.read())["server"]


@pytest.fixture
def setup(tmp_path):
    gate = threading.Event()
    backends = [httpBackend("a"), httpBackend("b", gate)]
    web, admin = freePort(), freePort()
    config = (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        + poolToml("api", backends)
        + f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{web}:interface=127.0.0.1"\npool = "api"\n'
    )
    lb = Txlb(config, tmp_path).start(listening=2)
    yield lb, Api(admin), web, backends, gate
    gate.set()
    lb.stop()
    for b in backends:
        b.stop()


def test_health_and_pools(setup):
    lb, api, web, backends, gate = setup
    assert api("GET", "/health") == (200, {"status": "healthy"})
    status, pools = api("GET", "/api/pools")
    assert status == 200
    [pool] = pools
    assert pool["name"] == "api" and pool["algorithm"] == "round_robin"
    assert [s["name"] for s in pool["servers"]] == ["a", "b"]
    server = pool["servers"][0]
    assert server["address"] == backends[0].address
    assert server["state"] == "up" and server["weight"] == 1
    assert set(server) == {"name", "address", "weight", "effectiveWeight", "state", "activeConnections", "totalRequests",
                           "averageResponseTimeMs", "bandwidthBps"}
    assert api("GET", "/api/pools/api")[1] == pool


def test_errors(setup):
    lb, api, web, backends, gate = setup
    assert api("GET", "/api/pools/nope") == (404, {"error": "no pool named 'nope'"})
    assert api("POST", "/api/pools/api/servers/zz/drain")[0] == 404
    assert api("POST", "/api/pools/api/servers", {"name": "a", "address": "127.0.0.1:1"})[0] == 409
    assert api("POST", "/api/pools/api/servers", {"name": "c", "address": "nonsense"})[0] == 400
    assert api("POST", "/api/pools/api/servers", {"name": "c"})[0] == 400
    assert api("PATCH", "/api/pools/api/servers/a", {"weight": -1})[0] == 400
    assert api("PATCH", "/api/pools/api/servers/a", {"name": "x"})[0] == 400
    assert api("DELETE", "/api/pools/api")[0] == 405
    assert api("GET", "/nothing")[0] == 404


def test_add_server_gets_traffic(setup):
    lb, api, web, backends, gate = setup
    gate.set()
    extra = httpBackend("c")
    try:
        status, server = api("POST", "/api/pools/api/servers", {"name": "c", "address": extra.address, "weight": 2})
        assert status == 201 and server["state"] == "up" and server["weight"] == 2
        served = {get(web)[1] for _ in range(6)}
        assert served == {"a", "b", "c"}
        [added] = waitFor(lambda: lb.events("server_added"))
        assert (added["pool"], added["server"], added["action"]) == ("api", "c", "added_to_load_balancer_pool")
    finally:
        extra.stop()


def test_patch_weight(setup):
    lb, api, web, backends, gate = setup
    status, server = api("PATCH", "/api/pools/api/servers/a", {"weight": 5})
    assert (status, server["weight"]) == (200, 5)
    assert api("GET", "/api/pools/api")[1]["servers"][0]["weight"] == 5


def test_drain_lets_slow_requests_finish_and_sends_new_ones_elsewhere(setup):
    lb, api, web, backends, gate = setup
    slow = backends[1]
    with ThreadPoolExecutor(8) as pool:
        # Round robin: every other request goes to b, which holds them.
        futures = [pool.submit(get, web) for _ in range(8)]
        waitFor(lambda: slow.waiting == 4, what="four requests held by b")
        assert api("POST", "/api/pools/api/servers/b/drain")[1]["state"] == "draining"
        assert all(get(web)[1] == "a" for _ in range(4))
        state = api("GET", "/api/pools/api")[1]["servers"][1]
        assert (state["state"], state["activeConnections"]) == ("draining", 4)
        gate.set()
        results = [f.result(30) for f in futures]
    assert results.count((200, "b")) == 4 and results.count((200, "a")) == 4
    waitFor(lambda: api("GET", "/api/pools/api")[1]["servers"][1]["state"] == "drained")
    assert lb.events("server_draining")[0]["inFlight"] == 4
    waitFor(lambda: lb.events("server_drained"))
    status, server = api("POST", "/api/pools/api/servers/b/enable")
    assert (status, server["state"]) == (200, "up")
    assert {get(web)[1] for _ in range(4)} == {"a", "b"}


def test_delete_removes_without_client_errors(setup):
    lb, api, web, backends, gate = setup
    gate.set()
    assert api("DELETE", "/api/pools/api/servers/b")[0] == 202
    waitFor(lambda: [s["name"] for s in api("GET", "/api/pools/api")[1]["servers"]] == ["a"])
    assert all(get(web) == (200, "a") for _ in range(5))
    assert lb.events("server_removed")[0]["server"] == "b"


def test_token_is_required_when_configured(tmp_path):
    (tmp_path / "admin.token").write_text("s3cret\n")
    backend = httpBackend("a")
    admin = freePort()
    config = (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken_file = "admin.token"\n'
        + poolToml("api", [backend])
    )
    lb = Txlb(config, tmp_path).start(listening=1)
    try:
        api = Api(admin, token="s3cret")
        assert api("GET", "/health", token=None)[0] == 200
        assert api("POST", "/api/pools/api/servers/a/drain", token=None)[0] == 401
        assert api("POST", "/api/pools/api/servers/a/drain", token="wrong")[0] == 401
        assert api("GET", "/api/pools", token=None)[0] == 401
        assert api("POST", "/api/pools/api/servers/a/drain")[0] == 200
    finally:
        lb.stop()
        backend.stop()
