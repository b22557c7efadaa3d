"""
Reload and graceful shutdown as an operator meets them: twistd in a
subprocess, real backends, SIGHUP, C{POST /api/reload} and SIGTERM.
Slow requests are held by the backend until the test releases them.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import Backend, httpRequests, Txlb, freePort, waitFor


def httpBackend(name: str, gate: threading.Event) -> Backend:
    """
    An HTTP/1.1 backend answering its name; a request for C{/slow} waits
    until the test sets C{gate}.
    """

    def serve(sock, backend):
        for head in httpRequests(sock):
            if head.split(b" ")[1].startswith(b"/slow"):
                with backend.lock:
                    backend.held += 1
                gate.wait(30)
            body = json.dumps({"server": name}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    backend = Backend(name, serve)
    backend.held = 0
    return backend


def configText(web: int, admin: int, backends, shutdown: str = "30s") -> str:
    servers = ", ".join(f'{{ name = "{b.name}", address = "{b.address}" }}' for b in backends)
    return (
        f'[txlb]\nshutdown_timeout = "{shutdown}"\n'
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
        f'[pools.api]\nalgorithm = "round_robin"\nservers = [{servers}]\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{web}:interface=127.0.0.1"\npool = "api"\n'
    )


def get(port: int, path: str = "/") -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.status, json.loads(response.read())["server"]


def postReload(admin: int) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{admin}/api/reload", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
    except urllib.error.URLError as e:
        return isinstance(e.reason, ConnectionRefusedError)
    return False


@pytest.fixture
def setup(tmp_path):
    gate = threading.Event()
    a, b = httpBackend("a", gate), httpBackend("b", gate)
    web, admin = freePort(), freePort()
    lb = Txlb(configText(web, admin, [a]), tmp_path).start(listening=2)
    pool = ThreadPoolExecutor(4)
    yield lb, web, admin, a, b, gate, pool
    gate.set()
    pool.shutdown()
    lb.stop()
    a.stop()
    b.stop()


def test_sighup_adds_a_server_while_a_slow_request_finishes(setup):
    lb, web, admin, a, b, gate, pool = setup
    slow = pool.submit(get, web, "/slow")
    waitFor(lambda: a.held == 1, what="the slow request to reach the backend")
    lb.configPath.write_text(configText(web, admin, [a, b]))
    lb.process.send_signal(signal.SIGHUP)
    [event] = waitFor(lambda: lb.events("config_reloaded"), what="config_reloaded")
    assert event["errors"] == [] and event["path"].endswith("txlb.toml")
    assert event["changes"] == ["pool api: server b added"]
    assert {get(web)[1] for _ in range(4)} == {"a", "b"}
    assert not slow.done()
    gate.set()
    assert slow.result(30) == (200, "a")


def test_a_broken_file_is_refused_and_traffic_goes_on(setup):
    lb, web, admin, a, b, gate, pool = setup
    slow = pool.submit(get, web, "/slow")
    waitFor(lambda: a.held == 1, what="the slow request to reach the backend")
    lb.configPath.write_text(configText(web, admin, [a, b]).replace('pool = "api"', 'pool = "nope"'))
    lb.process.send_signal(signal.SIGHUP)
    [event] = waitFor(lambda: lb.events("config_rejected"), what="config_rejected")
    assert len(event["errors"]) == 1 and "services[0].pool" in event["errors"][0], event
    assert not lb.events("config_reloaded")
    assert [get(web) for _ in range(3)] == [(200, "a")] * 3
    gate.set()
    assert slow.result(30) == (200, "a")


def test_post_api_reload(setup):
    lb, web, admin, a, b, gate, pool = setup
    lb.configPath.write_text(configText(web, admin, [a, b]).replace("servers = [", "servers = [oops"))
    status, body = postReload(admin)
    assert status == 400 and body["errors"] and "not valid TOML" in body["errors"][0], body
    assert body["error"].startswith("the config file was rejected")
    lb.configPath.write_text(configText(web, admin, [b]))
    status, body = postReload(admin)
    assert status == 200, body
    assert body["errors"] == [] and body["changes"] == [
        "pool api: server b added", "pool api: server a removed (after draining)"]
    assert {get(web)[1] for _ in range(3)} == {"b"}
    assert [e["event"] for e in lb.events() if e["event"].startswith("config_")] == [
        "config_rejected", "config_reloaded"]


def test_a_listen_port_change(setup):
    lb, web, admin, a, b, gate, pool = setup
    slow = pool.submit(get, web, "/slow")
    waitFor(lambda: a.held == 1, what="the slow request to reach the backend")
    moved = freePort()
    lb.configPath.write_text(configText(moved, admin, [a]))
    status, body = postReload(admin)
    assert status == 200 and f"listening on tcp:{moved}:interface=127.0.0.1" in body["changes"], body
    assert get(moved) == (200, "a")
    waitFor(lambda: refused(web), what="the old port to close")
    gate.set()
    assert slow.result(30) == (200, "a")  # accepted on the old port, finished after it closed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_lets_a_slow_request_finish_then_exits_0(setup, signum):
    lb, web, admin, a, b, gate, pool = setup
    slow = pool.submit(get, web, "/slow")
    waitFor(lambda: a.held == 1, what="the slow request to reach the backend")
    lb.process.send_signal(signum)
    [event] = waitFor(lambda: lb.events("shutdown"), what="the shutdown event")
    assert event["inFlight"] == 1
    waitFor(lambda: refused(web), what="the port to close")
    assert lb.process.poll() is None
    gate.set()
    assert slow.result(30) == (200, "a")
    assert lb.process.wait(30) == 0
