"""
Header rules, redirects and compression end to end: C{twistd txlb} in a
subprocess in front of a raw-socket HTTP backend (which answers with
exactly the framing and headers each test needs, and reports the request
heads it got), with real clients: C{curl} (C{--compressed}), C{requests}
and raw sockets.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import shutil
import signal
import socket
import subprocess
import threading
import urllib.request
import zlib
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from tests.support import (
    Backend, Txlb, connect, freePort, httpRequests, recvAll, sourceEnv, twistdCommand, waitFor,
)
from txlb.http.compress import CODINGS  # what --check offers: the subprocess imports the same

MiB = 1 << 20


def jsonLines(size: int, seed: int = 7) -> bytes:
    """C{size} bytes of JSON-like lines that compress about as an API's answers do (4 to 5 times)."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < size:
        line = json.dumps({"id": rng.randrange(10**6), "name": f"user-{rng.randrange(10**5)}",
                           "score": round(rng.random(), 4), "tags": rng.sample(["a", "b", "c", "d", "e"], 2)})
        out.append(line.encode() + b"\n")
        total += len(out[-1])
    return b"".join(out)[:size]


BLOCK = jsonLines(MiB)
TEXT = BLOCK[:300_000]
GZ = gzip.compress(TEXT, 1, mtime=0)  # fixed bytes: the gzip header holds a timestamp


class App:
    """
    What the backend answers, by path: C{/headers} the request head it got
    (JSON); C{/text?chunked=1} L{TEXT}; C{/small} 1000 bytes of text;
    C{/etag} (304 to its C{If-None-Match}); C{/gz} a body it encoded itself;
    C{/notransform}; C{/range} (206 to a C{Range}); C{/cached} fresh for a
    minute; C{/stream?mib=N} N MiB of L{BLOCK}s, written as the client
    takes them.  C{chunked=1} frames C{/text} and C{/stream} chunked
    rather than by C{Content-Length}.
    """

    def __init__(self) -> None:
        self.heads: list[dict] = []
        self.cachedServed = 0
        self.lock = threading.Lock()

    def __call__(self, sock: socket.socket, backend: Backend) -> None:
        for raw in httpRequests(sock):
            lines = raw.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
            url = urlsplit(target)
            query = parse_qs(url.query)
            with self.lock:
                self.heads.append({"path": url.path, "fields": fields})
            extra: list[str] = []
            if url.path == "/headers":
                status, body = 200, json.dumps(fields).encode()
                extra = ["Content-Type: application/json", "Server: app/1.0", f"X-Backend: {backend.name}"]
            elif url.path == "/text":
                status, body = 200, TEXT
                extra = ["Content-Type: text/plain; charset=utf-8", 'ETag: "t1"']
            elif url.path == "/small":
                status, body = 200, TEXT[:1000]
                extra = ["Content-Type: text/plain"]
            elif url.path == "/etag":
                matched = any(n.lower() == "if-none-match" and v == '"e1"' for n, v in fields)
                status, body = (304, b"") if matched else (200, TEXT)
                extra = ["Content-Type: text/plain", 'ETag: "e1"']
            elif url.path == "/gz":
                status, body = 200, GZ
                extra = ["Content-Type: text/plain", "Content-Encoding: gzip"]
            elif url.path == "/notransform":
                status, body = 200, TEXT
                extra = ["Content-Type: text/plain", "Cache-Control: no-transform"]
            elif url.path == "/range":
                ranged = any(n.lower() == "range" for n, _ in fields)
                status, body = (206, TEXT[:100]) if ranged else (200, TEXT)
                extra = ["Content-Type: text/plain", "Accept-Ranges: bytes"]
                if ranged:
                    extra.append(f"Content-Range: bytes 0-99/{len(TEXT)}")
            elif url.path == "/cached":
                with self.lock:
                    self.cachedServed += 1
                status, body = 200, TEXT
                extra = ["Content-Type: text/plain", "Cache-Control: max-age=60"]
            elif url.path == "/stream":
                self.stream(sock, int(query["mib"][0]), method, bool(query.get("chunked")))
                continue
            else:
                status, body = 404, b"no\n"
            head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{line}\r\n" for line in extra)
            if query.get("chunked"):
                data = head.encode() + b"Transfer-Encoding: chunked\r\n\r\n"
                if method != "HEAD":
                    for at in range(0, len(body), 16384):
                        piece = body[at:at + 16384]
                        data += b"%x\r\n%s\r\n" % (len(piece), piece)
                    data += b"0\r\n\r\n"
            elif status == 304:
                data = head.encode() + b"\r\n"
            else:
                data = head.encode() + b"Content-Length: %d\r\n\r\n" % len(body)
                if method != "HEAD":
                    data += body
            sock.sendall(data)

    def stream(self, sock: socket.socket, mib: int, method: str, chunked: bool) -> None:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (mib * MiB)
        sock.sendall(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\n%s\r\n\r\n" % framing)
        if method != "HEAD":
            for _ in range(mib):
                sock.sendall(b"%x\r\n%s\r\n" % (len(BLOCK), BLOCK) if chunked else BLOCK)
            if chunked:
                sock.sendall(b"0\r\n\r\n")


def configText(port: int, cachedPort: int, adminPort: int, backend: Backend, reloaded: bool = False) -> str:
    """
    The config the tests run; C{reloaded} is the one a reload brings in:
    another C{X-Env}, one more redirect route, and C{/text}'s type no
    longer compressed.
    """
    stamp = "blue" if reloaded else "prod"
    types = '["application/json"]' if reloaded else '["text/*", "application/json"]'
    gone = '''
[[services.routes]]
path_prefix = "/gone/"
redirect = { path_prefix = "/here/", status = 301 }
''' if reloaded else ""
    return f'''
[log]
access = true

[admin]
listen = "tcp:{adminPort}:interface=127.0.0.1"

[pools.app]
algorithm = "round_robin"
servers = [{{ name = "app-1", address = "{backend.address}" }}]

[[services]]
name = "web"
protocol = "http"
listen = "tcp:{port}:interface=127.0.0.1"
pool = "app"
headers = {{ request = {{ set = {{ "X-Env" = "{stamp}", "X-Who" = "${{client_ip}} ${{request_id}} ${{service}} ${{server}}" }}, remove = ["X-Debug"] }}, response = {{ set = {{ "Strict-Transport-Security" = "max-age=31536000" }}, add = {{ "X-Served-By" = "${{server}}" }}, remove = ["Server"] }} }}
compress = {{ types = {types}, min_size = "1KiB" }}
{gone}
[[services.routes]]
host = "old.example.com"
redirect = {{ host = "new.example.com", status = 301 }}

[[services.routes]]
path_prefix = "/old/"
redirect = {{ path_prefix = "/new/", status = 308 }}

[[services.routes]]
path_prefix = "/secure/"
redirect = {{ scheme = "https", status = 302 }}

[[services.routes]]
path_prefix = "/moved/"
redirect = {{ scheme = "https", host = "new.example.com:8443", path_prefix = "/here/", status = 307 }}

[[services.routes]]
path_prefix = "/api/"
pool = "app"
headers = {{ request = {{ set = {{ "X-Env" = "api" }} }}, response = {{ remove = ["X-Backend"] }} }}

[[services]]
name = "cached"
protocol = "http"
listen = "tcp:{cachedPort}:interface=127.0.0.1"
pool = "app"
cache = {{ max_size = "16MiB", max_object = "1MiB" }}
compress = {{ types = ["text/*"] }}
'''


class World:
    def __init__(self) -> None:
        self.app = App()
        self.backend = Backend("app-1", self.app)
        self.port, self.cachedPort, self.adminPort = freePort(), freePort(), freePort()
        self.lb = Txlb(self.config()).start(listening=3)

    def config(self, reloaded: bool = False) -> str:
        return configText(self.port, self.cachedPort, self.adminPort, self.backend, reloaded)

    def url(self, path: str, port: int = 0) -> str:
        return f"http://127.0.0.1:{port or self.port}{path}"

    def stop(self) -> None:
        self.lb.stop()
        self.backend.stop()


@pytest.fixture(scope="module")
def world():
    w = World()
    yield w
    w.stop()


def lastHead(world: World, path: str) -> dict:
    with world.app.lock:
        return next(h for h in reversed(world.app.heads) if h["path"] == path)


# Header rules.


def test_header_rules_reach_the_backend_and_the_client(world):
    r = requests.get(world.url("/headers"), headers={"X-Debug": "1", "X-Env": "dev"}, timeout=10)
    rid = r.headers["X-Request-ID"]
    seen = {n.lower(): v for n, v in json.loads(r.content)}
    assert "x-debug" not in seen
    assert seen["x-env"] == "prod" and [n.lower() for n, _ in json.loads(r.content)].count("x-env") == 1
    assert seen["x-who"] == f"127.0.0.1 {rid} web app-1"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-request-id"] == rid
    assert "Server" not in r.headers
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert r.headers["X-Served-By"] == "app-1" and r.headers["X-Backend"] == "app-1"


def test_a_route_s_rules_apply_after_the_service_s(world):
    r = requests.get(world.url("/api/headers"), timeout=10)
    assert r.status_code == 404  # the backend knows no /api/headers, but saw the head
    seen = dict((n.lower(), v) for n, v in lastHead(world, "/api/headers")["fields"])
    assert seen["x-env"] == "api" and seen["x-who"].endswith(" web app-1")
    r = requests.get(world.url("/api/x"), timeout=10)
    assert "X-Backend" not in r.headers and r.headers["X-Served-By"] == "app-1"


# Redirects.


def test_redirects_keep_the_rest_of_the_path_and_the_query(world):
    before = len(world.app.heads)
    r = requests.get(world.url("/a/b?x=1&y=two"), headers={"Host": "old.example.com"}, allow_redirects=False,
                     timeout=10)
    assert r.status_code == 301 and r.headers["Location"] == "http://new.example.com/a/b?x=1&y=two"
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert r.json()["location"] == r.headers["Location"]
    event = world.lb.requestEvent(r.headers["X-Request-ID"])
    assert (event["status"], event["pool"], event["selectedServer"]) == (301, None, None)
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                          world.url("/old/deep/page?q=a%20b&z")], capture_output=True, text=True, timeout=10)
    assert out.stdout == f"308 {world.url('/new/deep/page?q=a%20b&z')}"
    assert len(world.app.heads) == before  # no backend was asked


@pytest.mark.parametrize("host, target, status, location", [
    ("old.example.com", "/?a=1", 301, "http://new.example.com/?a=1"),
    ("shop.example.com:8080", "/secure/cart?id=7&x=%2F", 302, "https://shop.example.com:8080/secure/cart?id=7&x=%2F"),
    ("shop.example.com", "/moved/a/b.html?v=2", 307, "https://new.example.com:8443/here/a/b.html?v=2"),
    ("shop.example.com", "/old/?", 308, "/new/?"),
])
@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_each_redirect_status_with_scheme_host_and_path_prefix(world, host, target, status, location, method):
    before = len(world.app.heads)
    with connect(world.port) as s:
        body = b"x=1" if method == "POST" else b""
        s.sendall(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                  + body)
        reader = Responses(s)
        got, head, content = reader.read(method)
        if method == "POST":
            # The body is not read when the answer is known: the connection ends after it.
            assert head["connection"] == "close" and recvAll(s) == b""
        else:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            again = reader.read()  # the connection was kept
            assert again[0] == status and again[1]["location"] == location
    assert got == status and head["location"] == location
    assert content == (b"" if method == "HEAD" else
                       json.dumps({"location": location, "requestId": head["x-request-id"]}).encode() + b"\n")
    assert head["strict-transport-security"] == "max-age=31536000"  # the service's response rules apply
    assert len(world.app.heads) == before


# Compression.

needsCurl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@needsCurl
@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_gzip_is_decoded_by_curl_and_requests_to_the_original_bytes(world, query):
    out = subprocess.run(["curl", "-s", "--compressed", "-H", "Accept-Encoding: gzip", "-D", "-",
                          world.url("/text" + query)], capture_output=True, timeout=20)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert b"\r\nContent-Encoding: gzip" in head and b"\r\nVary: Accept-Encoding" in head
    assert b'\r\nETag: W/"t1"' in head and b"Transfer-Encoding: chunked" in head
    assert body == TEXT
    gzipOnly = {"Accept-Encoding": "gzip, deflate"}
    r = requests.get(world.url("/text" + query), headers=gzipOnly, timeout=10)
    assert r.headers["Content-Encoding"] == "gzip" and r.content == TEXT
    raw = requests.get(world.url("/text" + query), headers=gzipOnly, stream=True,
                       timeout=10).raw.read(decode_content=False)
    assert len(raw) < len(TEXT) / 2 and gzip.decompress(raw) == TEXT
    asked = urllib.request.Request(world.url("/text" + query), headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(asked, timeout=10) as answer:  # urllib leaves the decoding to zlib
        assert answer.headers["Content-Encoding"] == "gzip"
        assert zlib.decompress(answer.read(), 16 + zlib.MAX_WBITS) == TEXT
    assert world.lb.requestEvent(r.headers["X-Request-ID"])["encoding"] == "gzip"


needsBrotli = pytest.mark.skipif(importlib.util.find_spec("brotli") is None,
                                 reason="the brotli extra is not installed")


@needsCurl
@needsBrotli
@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_a_client_that_takes_brotli_gets_it_decoded_to_the_original_bytes(world, query):
    import brotli

    out = subprocess.run(["curl", "-s", "--compressed", "-H", "Accept-Encoding: gzip, deflate, br", "-D", "-",
                          world.url("/text" + query)], capture_output=True, timeout=20)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert b"\r\nContent-Encoding: br" in head and b"\r\nVary: Accept-Encoding" in head
    assert b"Transfer-Encoding: chunked" in head and body == TEXT
    asked = {"Accept-Encoding": "br;q=1, gzip;q=0.9"}
    r = requests.get(world.url("/text" + query), headers=asked, timeout=10)
    assert r.headers["Content-Encoding"] == "br" and r.content == TEXT
    raw = requests.get(world.url("/text" + query), headers=asked, stream=True,
                       timeout=10).raw.read(decode_content=False)
    assert len(raw) < len(TEXT) / 2 and brotli.decompress(raw) == TEXT
    assert world.lb.requestEvent(r.headers["X-Request-ID"])["encoding"] == "br"
    r = requests.get(world.url("/text" + query), headers={"Accept-Encoding": "br;q=0.5, gzip"}, timeout=10)
    assert r.headers["Content-Encoding"] == "gzip" and r.content == TEXT  # gzip weighed higher


def test_without_accept_encoding_the_body_comes_as_is(world):
    r = requests.get(world.url("/text"), headers={"Accept-Encoding": "identity"}, timeout=10)
    assert "Content-Encoding" not in r.headers and r.headers["Content-Length"] == str(len(TEXT))
    assert r.content == TEXT and r.headers["Vary"] == "Accept-Encoding"


class Responses:
    """
    HTTP/1.1 responses read one by one from a kept-alive socket, framed by
    C{Content-Length} or chunked, so that a test sees whether the
    connection stays open between them.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise AssertionError("txlb closed the connection")
        self.buffer += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """C{(status, head by lower-case name, body as sent)}; a chunked body is unframed."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        raw, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        head: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            head[name.strip().lower()] = value.strip()
        status = int(lines[0].split(" ")[1])
        if method == "HEAD" or status in (204, 304):
            return status, head, b""
        if head.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line(), 16):
                body += self._take(size)
                self._take(2)
            self._take(2)
            return status, head, body
        return status, head, self._take(int(head["content-length"]))


def rawGet(port: int, path: str, method: str = "GET", extra: str = "") -> tuple[bytes, bytes]:
    """One request on a fresh connection; the head, and the body read to the Content-Length."""
    with connect(port) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n{extra}"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("path, method, extra, status, length, body", [
    ("/notransform", "GET", "", 200, len(TEXT), TEXT),
    ("/text", "HEAD", "", 200, len(TEXT), b""),
    ("/range", "GET", "Range: bytes=0-99\r\n", 206, 100, TEXT[:100]),
    ("/gz", "GET", "", 200, len(GZ), GZ),
    ("/small", "GET", "", 200, 1000, TEXT[:1000]),  # below min_size
    ("/etag", "GET", 'If-None-Match: "e1"\r\n', 304, None, b""),
])
def test_what_must_not_be_compressed_is_untouched(world, path, method, extra, status, length, body):
    head, got = rawGet(world.port, path, method, extra)
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert head.count(b"Content-Encoding") == (1 if path == "/gz" else 0)
    assert b"Transfer-Encoding" not in head
    if length is None:
        assert b"Content-Length" not in head
    else:
        assert b"\r\nContent-Length: %d\r\n" % length in head + b"\r\n"
    assert got == body
    if path == "/etag":  # the same resource, asked without the condition, is compressed
        head, got = rawGet(world.port, path)
        assert b"Content-Encoding: gzip" in head and b'ETag: W/"e1"' in head


@pytest.mark.parametrize("framing", ["", "&chunked=1"])
def test_50_mib_compressed_on_the_way_without_memory_growth_or_splicing(world, framing):
    requests.get(world.url("/text"), timeout=10)  # zlib and friends loaded
    baseline = world.lb.rss()
    peak = baseline
    total = 50 * MiB
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    digest, expected = hashlib.sha256(), hashlib.sha256()
    for _ in range(50):
        expected.update(BLOCK)
    decoded = wire = 0
    with connect(world.port, timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /stream?mib=50{framing} HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
        framed = bytearray(rest)
        reads = 0
        while True:
            chunk = s.recv(256 * 1024)
            if not chunk:
                break
            framed += chunk
            reads += 1
            # Undo the chunked framing as far as it goes.
            while True:
                end = framed.find(b"\r\n")
                if end < 0:
                    break
                size = int(framed[:end], 16)
                if len(framed) < end + 2 + size + 2:
                    break
                piece = bytes(framed[end + 2:end + 2 + size])
                del framed[:end + 2 + size + 2]
                wire += size
                out = decoder.decompress(piece)
                decoded += len(out)
                digest.update(out)
            if reads % 16 == 0:
                peak = max(peak, world.lb.rss())
    assert decoded == total and digest.digest() == expected.digest()
    assert wire < total / 3
    assert peak - baseline < 32 * MiB, f"txlb grew by {(peak - baseline) / MiB:.1f} MiB"
    rid = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    event = world.lb.requestEvent(rid.decode())  # written once the response is over, maybe after the close
    assert event["path"] == "/stream" and event["encoding"] == "gzip" and "spliced" not in event


def test_the_cache_serves_a_gzip_and_a_plain_variant_to_two_clients(world):
    before = world.app.cachedServed
    answers = []
    for _ in range(2):
        for accept in ("gzip", "identity"):
            r = requests.get(world.url("/cached", world.cachedPort), headers={"Accept-Encoding": accept},
                             stream=True, timeout=10)
            answers.append((accept, r.headers["X-Cache"], r.headers.get("Content-Encoding"),
                            r.raw.read(decode_content=False)))
    assert world.app.cachedServed - before == 2
    assert [(a, c, e) for a, c, e, _ in answers] == [
        ("gzip", "MISS", "gzip"), ("identity", "MISS", None), ("gzip", "HIT", "gzip"), ("identity", "HIT", None)]
    assert gzip.decompress(answers[0][3]) == TEXT and answers[2][3] == answers[0][3]
    assert answers[1][3] == answers[3][3] == TEXT
    out = subprocess.run(["curl", "-s", "--compressed", world.url("/cached", world.cachedPort)],
                         capture_output=True, timeout=10)
    assert out.stdout == TEXT


@needsBrotli
def test_the_cache_keeps_a_brotli_variant_beside_the_gzip_one(world):
    import brotli

    path = "/cached?v=br"  # another resource: its variants start empty
    before = world.app.cachedServed
    answers = []
    for _ in range(2):
        for accept in ("br", "gzip"):
            r = requests.get(world.url(path, world.cachedPort), headers={"Accept-Encoding": accept},
                             stream=True, timeout=10)
            answers.append((r.headers["X-Cache"], r.headers["Content-Encoding"], r.raw.read(decode_content=False)))
    assert world.app.cachedServed - before == 2
    assert [(c, e) for c, e, _ in answers] == [("MISS", "br"), ("MISS", "gzip"), ("HIT", "br"), ("HIT", "gzip")]
    assert brotli.decompress(answers[2][2]) == gzip.decompress(answers[3][2]) == TEXT


# Reload.


def postReload(port: int) -> int:
    asked = urllib.request.Request(f"http://127.0.0.1:{port}/api/reload", data=b"", method="POST")
    with urllib.request.urlopen(asked, timeout=15) as answer:
        return answer.status


def servicePolicy(world: World, name: str = "web") -> list[str]:
    """What the status page shows of a service's policy (from C{/api/stats})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{world.adminPort}/api/stats", timeout=10) as answer:
        stats = json.loads(answer.read())
    return next(s for s in stats["services"] if s["name"] == name).get("policy", [])


def test_the_status_page_shows_the_policy(world):
    with urllib.request.urlopen(f"http://127.0.0.1:{world.adminPort}/", timeout=10) as answer:
        assert b"s.policy" in answer.read()
    assert servicePolicy(world) == [
        "request headers: remove X-Debug; set X-Env, X-Who",
        "response headers: remove Server; set Strict-Transport-Security; add X-Served-By",
        f"compress: {CODINGS} level 6, text/*, application/json, from 1024 bytes",
        "routes[0] redirect 301: host new.example.com (the rest of the URL kept)",
        "routes[1] redirect 308: path_prefix /new/ (the rest of the URL kept)",
        "routes[2] redirect 302: scheme https (the rest of the URL kept)",
        "routes[3] redirect 307: scheme https, host new.example.com:8443, path_prefix /here/ (the rest of the URL kept)",
        "routes[4] request headers: set X-Env",
        "routes[4] response headers: remove X-Backend",
    ]
    assert servicePolicy(world, "cached") == [
        f"compress: {CODINGS} level 6, text/*, from 1024 bytes"]


def test_check_prints_the_policy_and_refuses_what_could_smuggle(world, tmp_path):
    good = subprocess.run(twistdCommand("-n", "txlb", "--config", str(world.lb.configPath), "--check"),
                          capture_output=True, text=True, env=sourceEnv(), timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "  routes[3] redirect 307: scheme https, host new.example.com:8443, path_prefix /here/" in good.stdout
    assert "  response headers: remove Server; set Strict-Transport-Security; add X-Served-By" in good.stdout
    assert f"  compress: {CODINGS} level 6, text/*, application/json, from 1024 bytes" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(world.config().replace(
        'headers = { request = { set = { "X-Env" = "prod"',
        'headers = { request = { set = { "X-Env" = "a\\r\\nX-Evil: 1", "X-Lf" = "a\\nb", "X-Nul" = "\\u0000", '
        '"Transfer-Encoding" = "chunked", "Keep-Alive" = "1" }, add = { "Content-Length" = "0" }, '
        'remove = ["Connection"] }, ignored = { set = { "X-Env" = "prod"'))
    out = subprocess.run(twistdCommand("-n", "txlb", "--config", str(bad), "--check"),
                         capture_output=True, text=True, env=sourceEnv(), timeout=60)
    assert out.returncode == 1
    line = 1 + next(i for i, text in enumerate(bad.read_text().splitlines()) if "X-Evil" in text)
    where = f"{bad}:{line}: services[0].headers.request"
    for problem in [
        f"{where}.set.X-Env: the value holds '\\r'",
        f"{where}.set.X-Lf: the value holds '\\n'",
        f"{where}.set.X-Nul: the value holds '\\x00'",
        f"{where}.set.Transfer-Encoding: Transfer-Encoding frames the message",
        f"{where}.set.Keep-Alive: Keep-Alive frames the message",
        f"{where}.add.Content-Length: Content-Length frames the message",
        f"{where}.remove[0]: Connection frames the message",
    ]:
        assert problem in out.stdout + out.stderr


def test_a_reload_applies_new_rules_redirects_and_compression_to_a_kept_connection(world):
    """
    One keep-alive connection, open across a SIGHUP that brings in new
    rules and an admin reload that takes them back: each request on it
    gets the rules of the moment, and the connection is never dropped
    (L{Responses} fails on an end of file).
    """

    def ask(path: str) -> tuple[int, dict[str, str], bytes]:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n".encode())
        return reader.read()

    def seenEnv() -> str:
        status, head, body = ask("/headers")
        assert status == 200 and "content-encoding" not in head  # below min_size
        return dict(json.loads(body))["X-Env"]

    reloads = len(world.lb.events("config_reloaded"))
    with connect(world.port) as s:
        reader = Responses(s)
        assert seenEnv() == "prod"
        assert ask("/gone/x?q=1")[0] == 404  # no such route yet: the backend answers
        assert ask("/text")[1]["content-encoding"] == "gzip"

        world.lb.configPath.write_text(world.config(reloaded=True))
        world.lb.process.send_signal(signal.SIGHUP)
        waitFor(lambda: len(world.lb.events("config_reloaded")) > reloads, what="config_reloaded")
        assert seenEnv() == "blue"
        status, head, _ = ask("/gone/x?q=1")
        assert (status, head["location"]) == (301, "/here/x?q=1")
        assert "routes[0] redirect 301: path_prefix /here/ (the rest of the URL kept)" in servicePolicy(world)
        status, head, body = ask("/text")
        assert "content-encoding" not in head and body == TEXT and status == 200

        world.lb.configPath.write_text(world.config())
        assert postReload(world.adminPort) == 200
        assert seenEnv() == "prod"
        assert ask("/gone/x?q=1")[0] == 404
        status, head, body = ask("/text")
        assert head["content-encoding"] == "gzip" and zlib.decompress(body, 16 + zlib.MAX_WBITS) == TEXT
    assert len(world.lb.events("config_reloaded")) == reloads + 2
