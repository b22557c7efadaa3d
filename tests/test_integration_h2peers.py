"""
HTTP/2 against reference implementations, end to end under twistd:
nghttp2's C{h2load} as a client (many streams on few connections), HAProxy
as an HTTP/2 client in front of txlb (C{proto h2} to a plaintext service,
prior knowledge), and HAProxy as an HTTP/2 server behind txlb (a pool with
C{protocol = "h2"}).  Each skips when its peer is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections import Counter

import pytest

from tests.support import HAPROXY, Backend, HAProxy, Txlb, freePort, httpRequests, needsHAProxy, poolToml, waitFor

H2LOAD = shutil.which("h2load")


def jsonBackend(name: str) -> Backend:
    """Answers each request with JSON naming itself and the X-Forwarded-Proto it got."""

    def serve(sock, backend):
        for head in httpRequests(sock):
            lines = head.split(b"\r\n")
            proto = [line.split(b":", 1)[1].strip().decode() for line in lines[1:]
                     if line.lower().startswith(b"x-forwarded-proto:")]
            body = json.dumps({"server": name, "target": lines[0].split(b" ")[1].decode(), "proto": proto}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))

    return Backend(name, serve)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """
    txlb with a plaintext HTTP service over three backends (HTTP/2 by prior
    knowledge), and an HTTP service whose pool speaks h2 to HAProxy, which
    forwards to one more backend; HAProxy also fronts the first service,
    speaking h2 to it.
    """
    directory = tmp_path_factory.mktemp("h2peers")
    backends = [jsonBackend(f"b{i}") for i in range(3)]
    behind = jsonBackend("behind-haproxy")
    ports = {name: freePort() for name in ("web", "viaH2", "hpFront", "hpH2")}
    config = (
        '[log]\naccess = true\n\n'
        + poolToml("web", backends, extra='health = { kind = "none" }')
        + f'[pools.h2]\nprotocol = "h2"\nhealth = {{ kind = "none" }}\n'
        f'servers = [{{ name = "haproxy", address = "tcp:127.0.0.1:{ports["hpH2"]}" }}]\n\n'
        f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{ports["web"]}:interface=127.0.0.1"\n'
        'pool = "web"\n\n'
        f'[[services]]\nname = "viaH2"\nprotocol = "http"\nlisten = "tcp:{ports["viaH2"]}:interface=127.0.0.1"\n'
        'pool = "h2"\n'
    )
    lb = Txlb(config, directory).start(listening=2)
    haproxy = None
    if HAPROXY is not None:
        haproxy = HAProxy(directory, f"""
frontend front
  mode http
  bind 127.0.0.1:{ports['hpFront']}
  default_backend toTxlb
backend toTxlb
  mode http
  server txlb 127.0.0.1:{ports['web']} proto h2
frontend h2in
  mode http
  bind 127.0.0.1:{ports['hpH2']} proto h2
  default_backend final
backend final
  mode http
  server final {behind.address}
""", [ports["hpFront"], ports["hpH2"]])
    try:
        yield lb, ports, haproxy
    finally:
        if haproxy is not None:
            haproxy.stop()
        lb.stop()
        for b in backends + [behind]:
            b.stop()


def requestEvents(lb: Txlb, prefix: str, count: int) -> list[dict]:
    """The C{request} events of paths under C{prefix}, once C{count} of them are written."""

    def written():
        events = [e for e in lb.events("request") if e["path"].startswith(prefix)]
        return events if len(events) >= count else None

    return waitFor(written, what=f"{count} request events under {prefix}")


def _get(port: int, path: str = "/") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.mark.skipif(H2LOAD is None, reason="h2load is not installed (nghttp2-client)")
def test_h2load_many_streams_on_few_connections_all_succeed_across_servers(env):
    lb, ports, _ = env
    done = subprocess.run(
        [H2LOAD, "-n", "600", "-c", "3", "-m", "20", "-t", "1", f"http://127.0.0.1:{ports['web']}/h2load"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    requests = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                         done.stdout)
    assert requests is not None, done.stdout
    total, finished, succeeded, failed, errored = map(int, requests.groups())
    assert (total, finished, succeeded, failed, errored) == (600, 600, 600, 0, 0)
    assert re.search(r"status codes: 600 2xx", done.stdout), done.stdout
    events = requestEvents(lb, "/h2load", 600)
    assert {e["protocol"] for e in events} == {"HTTP/2"}
    spread = Counter(e["selectedServer"] for e in events)
    assert spread == {"b0": 200, "b1": 200, "b2": 200}  # streams balanced one by one, round robin


@needsHAProxy
def test_haproxy_speaking_h2_in_front_of_txlb(env):
    lb, ports, _ = env
    seen = Counter(_get(ports["hpFront"], f"/front/{i}")["server"] for i in range(9))
    assert seen == {"b0": 3, "b1": 3, "b2": 3}
    fronted = requestEvents(lb, "/front/", 9)
    assert len(fronted) == 9 and {e["protocol"] for e in fronted} == {"HTTP/2"}


@needsHAProxy
def test_txlb_speaking_h2_to_haproxy_behind_it(env):
    lb, ports, _ = env
    answers = [_get(ports["viaH2"], f"/behind/{i}") for i in range(5)]
    assert [a["server"] for a in answers] == ["behind-haproxy"] * 5
    assert [a["target"] for a in answers] == [f"/behind/{i}" for i in range(5)]
    assert all(a["proto"] == ["http"] for a in answers)  # txlb's X-Forwarded-Proto, carried over h2
