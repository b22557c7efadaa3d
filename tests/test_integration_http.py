"""
The HTTP proxy end to end: C{twistd txlb} in a subprocess, real HTTP
servers on 127.0.0.1 in threads (C{http.server} and a C{websockets}
server), real clients (C{requests}, C{http.client}, C{curl}, raw sockets,
a WebSocket client).

One txlb runs for the whole module with a service per situation; every
test measures what changed at the backends during the test, so they do
not depend on each other.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.support import Backend, Txlb, connect, freePort, recvAll, waitFor

websockets_sync = pytest.importorskip("websockets.sync.server")
from websockets.sync.client import connect as wsConnect  # noqa: E402

MiB = 1024 * 1024


# Backends.


class HTTPBackend:
    """
    A real HTTP/1.1 server (C{http.server}) on 127.0.0.1 in threads.

    It names itself in every answer, counts the connections it accepted and
    the requests it served, and can be killed (listening socket and every
    open connection closed at once).

    Paths: C{/} and anything else answer JSON naming the server;
    C{/headers} echoes the request's header block; C{/delay?ms=N} answers
    after N ms; C{/big?mib=N} streams N MiB; C{/upload} reads the body
    (only as far as L{meter} lets it) and answers its
    length and SHA-256; C{/echo} echoes the body; C{/204} and C{/304}.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.served = 0
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.sent = 0  # bytes of /big written so far
        self.received = 0  # bytes of /upload read so far
        self.limit: Optional[int] = None  # how far a metered upload may read
        self._cond = threading.Condition()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with backend.lock:
                    backend.accepted += 1
                    backend.open.add(self.connection)

            def finish(self) -> None:
                with backend.lock:
                    backend.open.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def log_message(self, *args) -> None:
                pass

            def _count(self) -> None:
                with backend.lock:
                    backend.served += 1
                    backend.paths.append(self.path)

            def _json(self, status: int, obj, extra: dict = {}) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _body(self):
                """The request body, as an iterator of pieces (CL or chunked)."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return
                        left = size
                        while left:
                            piece = self.rfile.read(min(left, 65536))
                            left -= len(piece)
                            yield piece
                        self.rfile.readline()
                else:
                    left = int(self.headers.get("Content-Length", 0))
                    while left:
                        piece = self.rfile.read1(backend.readable(min(left, 65536)))
                        if not piece:
                            raise ConnectionError("body cut short")
                        left -= len(piece)
                        yield piece

            def do_GET(self) -> None:
                self._count()
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path == "/headers":
                    self._json(200, {"server": backend.name, "headers": self.headers.items()})
                elif url.path == "/delay":
                    time.sleep(int(query["ms"][0]) / 1000)
                    self._json(200, {"server": backend.name})
                elif url.path == "/big":
                    total = int(query["mib"][0]) * MiB
                    self.send_response(200)
                    self.send_header("Content-Length", str(total))
                    self.end_headers()
                    block = b"d" * MiB
                    while backend.sent < total:
                        self.wfile.write(block)
                        backend.sent += len(block)
                elif url.path == "/204":
                    self.send_response(204)
                    self.send_header("X-Server", backend.name)
                    self.end_headers()
                elif url.path == "/304":
                    self.send_response(304)
                    self.send_header("ETag", '"v1"')
                    self.send_header("X-Server", backend.name)
                    self.end_headers()
                else:
                    self._json(200, {"server": backend.name, "path": self.path})

            do_HEAD = do_GET
            do_DELETE = do_GET

            def do_POST(self) -> None:
                self._count()
                url = urlsplit(self.path)
                if url.path == "/echo":
                    body = b"".join(self._body())
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("X-Server", backend.name)
                    self.end_headers()
                    self.wfile.write(body)
                    return
                digest = hashlib.sha256()
                length = 0
                for piece in self._body():
                    digest.update(piece)
                    length += len(piece)
                    backend.received += len(piece)
                self._json(200, {"server": backend.name, "length": length, "sha256": digest.hexdigest()})

            do_PUT = do_POST

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def meter(self, limit: Optional[int]) -> None:
        """Let uploads read up to C{limit} bytes in all (L{None}: no limit)."""
        with self._cond:
            self.limit = limit
            self._cond.notify_all()

    def readable(self, wanted: int) -> int:
        """How much of C{wanted} an upload may read now (waits for some)."""
        with self._cond:
            while self.limit is not None and self.received >= self.limit:
                self._cond.wait(30)
            return wanted if self.limit is None else min(wanted, self.limit - self.received)

    def kill(self) -> None:
        """Stop listening and cut every open connection, as a crash would."""
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for sock in list(self.open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.accepted, self.served


class WSBackend:
    """A WebSocket echo server (the C{websockets} library) in a thread."""

    def __init__(self, name: str) -> None:
        self.name = name

        def echo(ws) -> None:
            ws.send(f"hello from {name}")
            for message in ws:
                ws.send(message)

        self.server = websockets_sync.serve(echo, "127.0.0.1", 0, max_size=2 * MiB)
        self.port = self.server.socket.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


def garbage(sock: socket.socket, backend: Backend) -> None:
    """A server that answers anything with bytes that are not HTTP."""
    sock.recv(65536)
    sock.sendall(b"SSH-2.0-OpenSSH_9.0 this is not HTTP\r\n\r\n")
    recvAll(sock)


# The balancer.


def pool(name: str, servers, extra: str = "") -> str:
    lines = ",\n".join(f'  {{ name = "{s.name}", address = "{s.address}" }}' for s in servers)
    return f'[pools.{name}]\nalgorithm = "round_robin"\nretries = 2\nservers = [\n{lines}\n]\n{extra}\n'


def service(name: str, port: int, poolName: str, extra: str = "") -> str:
    return (
        f'[[services]]\nname = "{name}"\nprotocol = "http"\n'
        f'listen = "tcp:{port}:interface=127.0.0.1"\npool = "{poolName}"\n{extra}\n'
    )


class World:
    """Every backend and the one txlb in front of them."""

    def __init__(self) -> None:
        self.main = [HTTPBackend(f"server-{i}") for i in (1, 2, 3)]
        self.api = HTTPBackend("api-1")
        self.shop = HTTPBackend("shop-1")
        self.admin = HTTPBackend("admin-1")
        self.blue = HTTPBackend("blue-1")
        self.bulk = HTTPBackend("bulk-1")
        self.doomed = [HTTPBackend(f"doomed-{i}") for i in (1, 2, 3)]
        self.ws = WSBackend("ws-1")
        self.garbage = Backend("garbage-1", garbage)
        dead = [Backend(f"dead-{i}") for i in (1, 2)]
        for b in dead:
            b.stop()  # nothing listens there any more
        self.port = {name: freePort() for name in ("web", "fwd", "short", "dead", "empty", "bad", "bulk", "doomed")}
        routes = (
            '[[services.routes]]\nhost = "shop.*"\npool = "shop"\n'
            '[[services.routes]]\npath_prefix = "/api/"\npool = "api"\n'
            '[[services.routes]]\npath_prefix = "/ws"\npool = "ws"\n'
            '[[services.routes]]\nmethods = ["DELETE"]\npool = "admin"\n'
            '[[services.routes]]\nheaders = { "X-Tenant" = "blue" }\npool = "blue"\n'
        )
        config = (
            '[log]\naccess = true\n'
            + pool("main", self.main)
            + pool("api", [self.api])
            + pool("shop", [self.shop])
            + pool("admin", [self.admin])
            + pool("blue", [self.blue])
            + pool("ws", [self.ws])
            + pool("bulk", [self.bulk])
            + pool("doomed", self.doomed)
            + pool("dead", dead, 'connect_timeout = "1s"')
            + '[pools.empty]\nservers = []\n'
            + pool("bad", [self.garbage])
            + service("web", self.port["web"], "main", 'timeouts = { client = "30s" }\n' + routes)
            + service("fwd", self.port["fwd"], "main", "forwarded = true")
            + service("short", self.port["short"], "main", 'timeouts = { backend = "300ms" }')
            + service("dead", self.port["dead"], "dead")
            + service("empty", self.port["empty"], "empty")
            + service("bad", self.port["bad"], "bad")
            + service("bulk", self.port["bulk"], "bulk")
            + service("doomed", self.port["doomed"], "doomed")
        )
        self.lb = Txlb(config).start(listening=len(self.port))

    def url(self, service: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port[service]}{path}"

    def requestEvent(self, requestId: str) -> dict:
        return self.lb.requestEvent(requestId)

    def stop(self) -> None:
        self.lb.stop()
        for b in [*self.main, self.api, self.shop, self.admin, self.blue, self.bulk, *self.doomed]:
            try:
                b.kill()
            except OSError:
                pass
        self.ws.stop()
        self.garbage.stop()


@pytest.fixture(scope="module")
def world():
    w = World()
    yield w
    w.stop()


def served(backends) -> int:
    return sum(b.snapshot()[1] for b in backends)


def accepted(backends) -> int:
    return sum(b.snapshot()[0] for b in backends)


# Raw HTTP on a socket, for what the client libraries hide.


def readResponse(sock: socket.socket, buffered: bytearray, head: bool = False) -> tuple[int, dict, bytes]:
    """Read one response (Content-Length or no body) from C{sock}."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-head: {bytes(buffered)!r}")
        buffered += chunk
    end = buffered.index(b"\r\n\r\n")
    lines = bytes(buffered[:end]).split(b"\r\n")
    del buffered[: end + 4]
    status = int(lines[0].split(b" ")[1])
    fields: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode()] = value.strip().decode()
    length = 0 if head or status in (204, 304) or 100 <= status < 200 else int(fields.get("content-length", 0))
    while len(buffered) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        buffered += chunk
    body = bytes(buffered[:length])
    del buffered[:length]
    return status, fields, body


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """The peer closed: EOF (or a reset) within C{timeout}."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# Spreading and keep-alive.


def test_keep_alive_client_is_spread_per_request_over_few_backend_connections(world):
    before = accepted(world.main)
    with requests.Session() as s:
        landed = Counter(s.get(world.url("web")).json()["server"] for _ in range(30))
        assert landed == {"server-1": 10, "server-2": 10, "server-3": 10}
        for _ in range(100):
            r = s.get(world.url("web"))
            assert r.status_code == 200
    assert accepted(world.main) - before <= 5


def test_request_event_matches_the_response(world):
    r = requests.get(world.url("web", "/some/path?q=1"))
    rid = r.headers["X-Request-ID"]
    event = world.requestEvent(rid)
    assert event["service"] == "web" and event["pool"] == "main"
    assert event["selectedServer"] == r.json()["server"]
    assert (event["method"], event["path"], event["status"]) == ("GET", "/some/path", 200)
    assert event["client"] == "127.0.0.1"
    assert event["bytesSent"] > len(r.content)
    assert event["reason"] and event["responseTimeMs"] >= 0 and "cache" in event


# Routing.


@pytest.mark.parametrize(
    "method, path, headers, server",
    [
        ("GET", "/api/users", {}, "api-1"),
        ("GET", "/apix", {}, "server-"),  # a prefix is not a substring
        ("GET", "/", {"Host": "shop.example.com"}, "shop-1"),
        ("GET", "/api/users", {"Host": "SHOP.example.com:8080"}, "shop-1"),  # first match wins
        ("GET", "/", {"Host": "www.shop.example"}, "server-"),
        ("DELETE", "/thing", {}, "admin-1"),
        ("GET", "/thing", {"X-Tenant": "blue"}, "blue-1"),
        ("GET", "/thing", {"X-Tenant": "green"}, "server-"),
    ],
)
def test_routes_send_to_the_right_pool(world, method, path, headers, server):
    r = requests.request(method, world.url("web", path), headers=headers)
    assert r.status_code == 200
    assert r.json()["server"].startswith(server)
    assert world.requestEvent(r.headers["X-Request-ID"])["selectedServer"] == r.json()["server"]


# What reaches the backend.


def sentHeaders(world, service: str, headers: dict) -> tuple[requests.Response, list[tuple[str, str]]]:
    r = requests.get(world.url(service, "/headers"), headers=headers)
    assert r.status_code == 200
    return r, [tuple(h) for h in r.json()["headers"]]


def values(headers, name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


def test_forwarding_headers_and_hop_by_hop(world):
    r, got = sentHeaders(
        world,
        "web",
        {
            "Host": "site.example:8443",
            "X-Forwarded-For": "203.0.113.7, 198.51.100.1",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "Connection": "keep-alive, X-Secret, X-Other",
            "X-Secret": "s3cret",
            "X-Other": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        },
    )
    assert values(got, "Host") == ["site.example:8443"]
    assert values(got, "X-Forwarded-For") == ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert values(got, "X-Forwarded-Proto") == ["http"]
    assert values(got, "X-Forwarded-Host") == ["site.example:8443"]
    assert values(got, "X-Kept") == ["yes"]
    for hop in ("Connection", "X-Secret", "X-Other", "Keep-Alive", "Proxy-Authorization",
                "Proxy-Connection", "TE", "Trailer", "Upgrade", "Transfer-Encoding"):
        assert values(got, hop) == [], hop
    assert values(got, "Forwarded") == []  # only with forwarded = true
    [rid] = values(got, "X-Request-ID")
    assert r.headers["X-Request-ID"] == rid
    assert world.requestEvent(rid)["requestId"] == rid


def test_rfc7239_forwarded_when_asked(world):
    r, got = sentHeaders(world, "fwd", {"Host": "a.example", "Forwarded": "for=192.0.2.60;proto=https"})
    assert values(got, "Forwarded") == ['for=192.0.2.60;proto=https, for=127.0.0.1;proto=http;host="a.example"']
    assert values(got, "X-Forwarded-For") == ["127.0.0.1"]


def test_a_valid_request_id_is_kept(world):
    mine = "client-" + uuid.uuid4().hex
    r, got = sentHeaders(world, "web", {"X-Request-ID": mine})
    assert values(got, "X-Request-ID") == [mine]
    assert r.headers["X-Request-ID"] == mine
    assert world.requestEvent(mine)["status"] == 200


@pytest.mark.parametrize("bad", ["has spaces in it", "x" * 129, "semi;colon", ""])
def test_an_invalid_request_id_is_replaced_and_returned(world, bad):
    r, got = sentHeaders(world, "web", {"X-Request-ID": bad})
    [sent] = values(got, "X-Request-ID")
    assert sent != bad and sent
    assert r.headers["X-Request-ID"] == sent
    assert world.requestEvent(sent)["path"] == "/headers"


def test_generated_request_ids_are_unique(world):
    with requests.Session() as s:
        ids = [s.get(world.url("web")).headers["X-Request-ID"] for _ in range(50)]
    assert len(set(ids)) == 50


# Errors.


def assertJSONError(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["requestId"] == r.headers["X-Request-ID"]
    assert body["error"]
    return body


def test_503_when_the_pool_has_no_server(world):
    r = requests.get(world.url("empty"))
    body = assertJSONError(r, 503)
    assert "empty" in body["error"]
    assert world.requestEvent(body["requestId"])["status"] == 503


def test_502_when_every_connect_fails(world):
    r = requests.get(world.url("dead"))
    body = assertJSONError(r, 502)
    assert "dead-1" in body["error"] and "dead-2" in body["error"]
    failed = {e["server"] for e in world.lb.events("connect_failed") if e["pool"] == "dead"}
    assert failed == {"dead-1", "dead-2"}


def test_502_when_the_backend_sends_garbage(world):
    r = requests.get(world.url("bad"))
    assertJSONError(r, 502)


def test_504_when_the_backend_is_slower_than_timeouts_backend(world):
    started = time.monotonic()
    r = requests.get(world.url("short", "/delay?ms=1500"))
    assert time.monotonic() - started < 1.4  # answered at the timeout, not when the backend is done
    body = assertJSONError(r, 504)
    assert world.requestEvent(body["requestId"])["status"] == 504
    # a fast answer through the same service is fine
    assert requests.get(world.url("short", "/delay?ms=10")).status_code == 200


def test_a_killed_server_costs_no_get_an_error(world):
    with requests.Session() as s:
        for _ in range(6):  # every server has an idle connection now
            assert s.get(world.url("doomed")).status_code == 200
        victim = world.doomed[1]
        victim.kill()
        landed = Counter()
        for _ in range(30):
            r = s.get(world.url("doomed"))
            assert r.status_code == 200, r.text
            landed[r.json()["server"]] += 1
    assert sum(landed.values()) == 30 and "doomed-2" not in landed
    # and new clients too
    for _ in range(6):
        assert requests.get(world.url("doomed")).status_code == 200


# Defences.


def test_cl_te_smuggling_gets_one_400_and_reaches_no_backend(world):
    before = served(world.main)
    attempt = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    with connect(world.port["web"]) as s:
        s.sendall(attempt)
        buffered = bytearray()
        status, fields, body = readResponse(s, buffered)
        assert status == 400
        assert fields["connection"] == "close"
        assert json.loads(body)["requestId"] == fields["x-request-id"]
        assert closed(s)
        assert bytes(buffered) == b""  # one answer, nothing after it
    world.requestEvent(fields["x-request-id"])
    assert served(world.main) == before
    assert not any("smuggled" in p for b in world.main for p in b.paths)


def test_te_cl_smuggling_is_refused_too(world):
    before = served(world.main)
    with connect(world.port["web"]) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                  b"8\r\nSMUGGLED\r\n0\r\n\r\n")
        status, fields, _ = readResponse(s, bytearray())
        assert status == 400
        assert closed(s)
    world.requestEvent(fields["x-request-id"])
    assert served(world.main) == before


def test_slowloris_does_not_slow_other_clients(world):
    sockets = []
    try:
        for i in range(200):
            s = connect(world.port["web"])
            s.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: %d\r\n" % i)  # never finished
            sockets.append(s)
        started = time.monotonic()
        with requests.Session() as session:
            for _ in range(20):
                assert session.get(world.url("web"), timeout=5).status_code == 200
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"20 requests took {elapsed:.1f}s beside 200 slowloris connections"
        # the slow connections are all still held open (their header timeout is 30s)
        for s in sockets:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in sockets:
            s.close()


# WebSocket.


def test_websocket_text_and_300kb_binary(world):
    with wsConnect(f"ws://127.0.0.1:{world.port['web']}/ws/echo", max_size=2 * MiB, open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "hello from ws-1"
        ws.send("ping through txlb")
        assert ws.recv(timeout=10) == "ping through txlb"
        blob = bytes(range(256)) * 1200  # 300 KiB
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
        assert ws.response.headers["X-Request-ID"]
        rid = ws.response.headers["X-Request-ID"]
    event = world.requestEvent(rid)
    assert event["status"] == 101 and event["selectedServer"] == "ws-1"


# Load.


def test_20_clients_times_50_requests(world):
    before = served(world.main)

    def client(n: int) -> Counter:
        codes = Counter()
        with requests.Session() as s:
            for i in range(50):
                codes[s.get(world.url("web", f"/load/{n}/{i}"), timeout=10).status_code] += 1
        return codes

    with ThreadPoolExecutor(20) as executor:
        results = list(executor.map(client, range(20)))
    assert sum(results, Counter()) == {200: 1000}
    assert served(world.main) - before == 1000


# Memory under backpressure.


def stalled(counter, total: int):
    """A condition: C{counter()} stopped moving for ten polls (or reached C{total})."""
    progress = {"last": -1, "still": 0}

    def check() -> bool:
        value = counter()
        if value >= total:
            return True
        progress["still"] = progress["still"] + 1 if value == progress["last"] else 0
        progress["last"] = value
        return progress["still"] >= 10

    return check


def test_200_mib_download_to_a_slow_client_keeps_memory_flat(world):
    total = 200 * MiB
    world.bulk.sent = 0
    baseline = world.lb.rss()
    peak = baseline
    with connect(world.port["bulk"], timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big?mib=200 HTTP/1.1\r\nHost: bulk\r\n\r\n")
        buffered = bytearray()
        while b"\r\n\r\n" not in buffered:
            buffered += s.recv(65536)
        headEnd = buffered.index(b"\r\n\r\n") + 4
        assert buffered.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: %d" % total in buffered[:headEnd]
        received = len(buffered) - headEnd
        while received < total:
            waitFor(stalled(lambda: world.bulk.sent, total), timeout=30, what="the backend to stall")
            peak = max(peak, world.lb.rss())
            assert world.bulk.sent - received < 64 * MiB, "txlb buffered far more than its peers do"
            target = min(total, received + 30 * MiB)
            while received < target:
                chunk = s.recv(1 << 20)
                assert chunk
                received += len(chunk)
        assert received == total
    assert peak - baseline < 64 * MiB


def test_200_mib_upload_to_a_slow_backend_keeps_memory_flat(world):
    total = 200 * MiB
    bulk = world.bulk
    bulk.received = 0
    bulk.meter(0)
    sent = [0]
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256()
    for _ in range(200):
        expected.update(block)
    baseline = world.lb.rss()
    peak = baseline
    try:
        with connect(world.port["bulk"], timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)

            def send() -> None:
                s.sendall(b"POST /upload HTTP/1.1\r\nHost: bulk\r\nContent-Length: %d\r\n\r\n" % total)
                for _ in range(200):
                    s.sendall(block)
                    sent[0] += len(block)

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            while bulk.received < total:
                waitFor(stalled(lambda: sent[0], total), timeout=30, what="the client to stall")
                peak = max(peak, world.lb.rss())
                assert sent[0] - bulk.received < 64 * MiB, "txlb buffered far more than its peers do"
                target = min(total, bulk.received + 30 * MiB)
                bulk.meter(target)
                waitFor(lambda: bulk.received >= target or bulk.received >= total, timeout=30,
                        what=f"the backend to read its slice ({bulk.received} of {target}, sent {sent[0]})")
            sender.join(30)
            status, fields, body = readResponse(s, bytearray())
        assert status == 200
        answer = json.loads(body)
        assert answer["length"] == total and answer["sha256"] == expected.hexdigest()
    finally:
        bulk.meter(None)
    assert peak - baseline < 64 * MiB


def test_chunked_upload_is_reframed_and_intact(world):
    pieces = [bytes([i]) * (1000 + i * 7919) for i in range(40)]

    def gen():
        yield from pieces

    r = requests.post(world.url("web", "/upload"), data=gen())  # requests sends this chunked
    assert r.status_code == 200
    answer = r.json()
    whole = b"".join(pieces)
    assert answer["length"] == len(whole) and answer["sha256"] == hashlib.sha256(whole).hexdigest()


# Bodiless answers, HTTP/1.0, Expect: 100-continue.


def test_head_204_and_304_have_no_body_on_a_kept_connection(world):
    conn = http.client.HTTPConnection("127.0.0.1", world.port["web"], timeout=10)
    try:
        conn.request("HEAD", "/anything")
        r = conn.getresponse()
        assert r.status == 200 and int(r.headers["Content-Length"]) > 0
        assert r.read() == b""
        for path, status in (("/204", 204), ("/304", 304), ("/", 200)):
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            assert r.status == status
            if status != 200:
                assert body == b""
            else:
                assert json.loads(body)["server"].startswith("server-")
    finally:
        conn.close()
    # and on the wire: nothing after the bodiless heads
    with connect(world.port["web"]) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /204 HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /304 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = recvAll(s)
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"204", b"304"]
    assert all(r.endswith(b"\r\n\r\n") for r in responses)
    assert b"Transfer-Encoding" not in data


def test_http10_clients(world):
    with connect(world.port["web"]) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = recvAll(s)  # the proxy closes: 1.0 without keep-alive
    headEnd = data.index(b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert json.loads(data[headEnd + 4:])["server"].startswith("server-")
    assert b"Transfer-Encoding" not in data[:headEnd]
    # HTTP/1.0 with keep-alive: two requests on one connection
    with connect(world.port["web"]) as s:
        buffered = bytearray()
        s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, fields, body = readResponse(s, buffered)
        assert status == 200 and fields["connection"].lower() == "keep-alive"
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, fields, body = readResponse(s, buffered)
        assert status == 200 and json.loads(body)["server"].startswith("server-")
        assert closed(s)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http10_and_expect_100_continue(world, tmp_path):
    out = subprocess.run(["curl", "-sS", "--http1.0", world.url("web")], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["server"].startswith("server-")
    payload = tmp_path / "payload"
    payload.write_bytes(b"e" * 200_000)
    out = subprocess.run(
        ["curl", "-sS", "-v", "--expect100-timeout", "20", "-H", "Expect: 100-continue",
         "--data-binary", f"@{payload}", world.url("web", "/upload")],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert b"HTTP/1.1 100 Continue" in out.stderr
    assert json.loads(out.stdout)["length"] == 200_000


def test_expect_100_continue_waits_for_the_backend(world):
    with connect(world.port["web"]) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        buffered = bytearray()
        status, _, _ = readResponse(s, buffered)
        assert status == 100  # before a byte of the body was sent
        s.sendall(b"hello")
        status, fields, body = readResponse(s, buffered)
        assert status == 200 and body == b"hello"
