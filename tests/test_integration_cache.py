"""
Response caching as a user meets it: twistd in a subprocess, a real HTTP
backend on loopback that counts what reaches it, urllib as the client.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import Backend, httpRequests, Txlb, freePort, poolToml, waitFor


class Origin:
    """
    An HTTP/1.1 keep-alive backend.  C{/fresh...} and C{/slow} say
    C{max-age=60} (C{/slow} waits for C{gate}); anything else has no
    freshness.  Each body names how many requests came before it.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.lock = threading.Lock()
        self.backend = Backend("origin", self.serve)
        self.name, self.address = "origin", self.backend.address

    def hits(self, path: bytes) -> list[bytes]:
        with self.lock:
            return [head for _, p, head in self.seen if p == path]

    def serve(self, sock, backend) -> None:
        for head in httpRequests(sock):
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
            with self.lock:
                self.seen.append((method, target, head))
                n = len(self.seen)
            if target == b"/slow":
                self.gate.wait(30)
            fresh = target.startswith(b"/fresh") or target == b"/slow"
            body = json.dumps({"n": n, "path": target.decode()}).encode()
            extra = b'Cache-Control: max-age=60\r\nETag: "e1"\r\n' if fresh else b""
            sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body))

    def stop(self) -> None:
        self.gate.set()
        self.backend.stop()


def fetch(port: int, path: str, method: str = "GET", headers=None, data=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data,
                                     headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def admin(port: int, method: str, path: str):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def lb(tmp_path):
    origin = Origin()
    web, api = freePort(), freePort()
    config = (
        f'[admin]\nlisten = "tcp:{api}:interface=127.0.0.1"\n'
        + poolToml("app", [origin])
        + f'[[services]]\nname = "web"\nprotocol = "http"\nlisten = "tcp:{web}:interface=127.0.0.1"\n'
        + 'pool = "app"\ncache = { max_size = "8MiB", max_object = "1MiB" }\n'
    )
    txlb = Txlb(config, tmp_path).start(listening=2)
    yield txlb, origin, web, api
    origin.gate.set()
    txlb.stop()
    origin.stop()


def test_miss_then_hit(lb):
    txlb, origin, web, api = lb
    status, first, body1 = fetch(web, "/fresh")
    status2, second, body2 = fetch(web, "/fresh")
    assert (status, status2) == (200, 200)
    assert (first["X-Cache"], second["X-Cache"]) == ("MISS", "HIT")
    assert body1 == body2 and len(origin.hits(b"/fresh")) == 1
    assert "Age" in second and int(second["Age"]) >= 0
    events = waitFor(lambda: len(txlb.events("request")) >= 2 and txlb.events("request"), what="request events")
    assert [e["cache"] for e in events[:2]] == ["MISS", "HIT"]


def test_what_always_reaches_the_backend(lb):
    txlb, origin, web, api = lb
    for _ in range(2):
        assert fetch(web, "/plain")[1]["X-Cache"] == "MISS"
    assert len(origin.hits(b"/plain")) == 2
    for _ in range(2):
        assert fetch(web, "/fresh", "POST", data=b"")[1]["X-Cache"] == "BYPASS"
    fetch(web, "/fresh")
    for _ in range(2):
        assert fetch(web, "/fresh", headers={"Authorization": "Bearer t"})[1]["X-Cache"] == "BYPASS"
    assert len(origin.hits(b"/fresh")) == 5
    assert fetch(web, "/fresh?page=2")[1]["X-Cache"] == "MISS"
    assert len(origin.hits(b"/fresh?page=2")) == 1


def test_no_cache_reaches_the_backend_with_the_validators(lb):
    txlb, origin, web, api = lb
    _, _, body = fetch(web, "/fresh")
    _, headers, again = fetch(web, "/fresh", headers={"Cache-Control": "no-cache"})
    hits = origin.hits(b"/fresh")
    assert len(hits) == 2 and b'If-None-Match: "e1"' in hits[1]
    assert headers["X-Cache"] == "STALE"


def test_fifty_concurrent_requests_for_one_cold_key(lb):
    txlb, origin, web, api = lb
    with ThreadPoolExecutor(50) as pool:
        results = [pool.submit(fetch, web, "/slow") for _ in range(50)]
        waitFor(lambda: admin(api, "GET", "/api/stats?history=0")[1]["services"][0]["cache"]["waiting"] == 49,
                what="49 requests waiting for the first")
        origin.gate.set()
        answers = [r.result() for r in results]
    assert len(origin.hits(b"/slow")) == 1
    assert {body for _, _, body in answers} == {answers[0][2]}
    assert sorted(h["X-Cache"] for _, h, _ in answers) == ["HIT"] * 49 + ["MISS"]


def test_purge_and_metrics(lb):
    txlb, origin, web, api = lb
    fetch(web, "/fresh/a")
    fetch(web, "/fresh/b")
    assert admin(api, "DELETE", "/api/cache?service=nope")[0] == 404
    assert admin(api, "DELETE", "/api/cache?prefix=fresh")[0] == 400
    assert admin(api, "GET", "/api/cache")[0] == 405
    assert admin(api, "DELETE", "/api/cache?service=web&prefix=/fresh/a") == (200, {"purged": 1,
                                                                                    "services": {"web": 1}})
    assert fetch(web, "/fresh/a")[1]["X-Cache"] == "MISS"
    assert fetch(web, "/fresh/b")[1]["X-Cache"] == "HIT"
    assert admin(api, "DELETE", "/api/cache")[1]["purged"] == 2
    assert fetch(web, "/fresh/b")[1]["X-Cache"] == "MISS"
    stats = admin(api, "GET", "/api/stats?history=0")[1]["services"][0]["cache"]
    assert stats["requests"]["HIT"] == 1 and stats["requests"]["MISS"] == 4 and stats["entries"] == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'txlb_cache_requests_total{result="hit",service="web"} 1.0' in text
    assert 'txlb_cache_entries{service="web"} 1.0' in text
