"""
HTTP/2 from clients end to end: twistd txlb in a subprocess, HTTP/1.1
backends in threads, and real HTTP/2 clients: curl (TLS with ALPN, and
prior knowledge on plaintext), httpx with its http2 extra (many streams
on one connection), and the h2 library by hand for the attack cases.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme
from h2.errors import ErrorCodes

from tests.support import Backend, Txlb, freePort, poolToml, waitFor

_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def _readRequest(sock: socket.socket, buffer: bytes):
    """One request (head lines, body) from C{sock}; L{None} at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower().decode()] = value.strip().decode("latin-1")
    body = b""
    if "content-length" in fields:
        size = int(fields["content-length"])
        while len(buffer) < size:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return None
            buffer += chunk
        body, buffer = buffer[:size], buffer[size:]
    elif fields.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            while b"\r\n" not in buffer:
                buffer += sock.recv(1 << 20)
            line, _, buffer = buffer.partition(b"\r\n")
            size = int(line, 16)
            while len(buffer) < size + 2:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return None
                buffer += chunk
            parts.append(buffer[:size])
            buffer = buffer[size + 2:]
            if size == 0:
                break
        body = b"".join(parts)
    return lines[0].decode(), fields, body, buffer


def appBackend(name: str) -> Backend:
    """
    An HTTP/1.1 backend: C{/big/N} answers N bytes, C{/echo} its request
    body, C{/cached} with max-age, anything else a JSON account of the
    request as it arrived.
    """

    def serve(sock, backend):
        buffer = b""
        while True:
            got = _readRequest(sock, buffer)
            if got is None:
                return
            line, fields, body, buffer = got
            method, target, _ = line.split(" ")
            extra = b""
            if target.startswith("/big/"):
                answer = b"x" * int(target[5:])
            elif target == "/echo":
                answer = body
            elif target == "/text":
                answer = b"txlb over HTTP/2 " * 4096
                extra = b"Content-Type: text/plain\r\n"
            else:
                answer = json.dumps({"server": name, "method": method, "target": target, "headers": fields,
                                     "body": len(body)}).encode()
                if target.startswith("/cached"):
                    extra = b"Cache-Control: max-age=60\r\n"
            sock.sendall(b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (extra, len(answer)) + answer)

    return Backend(name, serve)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def lb(ca, tmp_path_factory):
    """One txlb: a plaintext and a TLS HTTP service, sticky, cached and routed ones."""
    directory = tmp_path_factory.mktemp("h2")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(directory / "site.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "site.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    web = [appBackend(f"w{i}") for i in range(3)]
    static = [appBackend("static")]
    ports = {name: freePort() for name in ("plain", "tls", "sticky", "cache", "off", "policy")}

    def service(name: str, extra: str = "", pool: str = "web") -> str:
        return (f'[[services]]\nname = "{name}"\nprotocol = "http"\n'
                f'listen = "tcp:{ports[name]}:interface=127.0.0.1"\npool = "{pool}"\n' + extra)

    config = (
        poolToml("web", web) + poolToml("static", static)
        + service("plain", 'limits = { max_concurrent_streams = 50, max_body = "64MiB" }\n'
                           '[[services.routes]]\npath_prefix = "/static/"\npool = "static"\n')
        + service("tls", 'tls = { certificates = [{ cert = "site.pem", key = "site.key" }] }\n'
                         'limits = { max_body = "64MiB" }\n')
        + service("sticky", 'sticky = { mode = "cookie", cookie = "LB" }\n')
        + service("cache", 'cache = { max_size = "8MiB", max_object = "1MiB" }\n')
        + service("off", "http2 = false\n")
        + service("policy", 'headers = { request = { set = { "X-Env" = "h2" } }, '
                            'response = { add = { "X-Served-By" = "${server}" } } }\n'
                            'compress = { types = ["text/*", "application/octet-stream"], min_size = "1KiB" }\n'
                            '[[services.routes]]\npath_prefix = "/old/"\nredirect = { path_prefix = "/new/", status = 308 }\n')
    )
    txlb = Txlb(config, directory).start(listening=len(ports))
    yield txlb, ports, directory
    txlb.stop()
    for b in web + static:
        b.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


@_curl
def test_curl_prior_knowledge_on_plaintext(lb):
    txlb, ports, _ = lb
    out = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", "-H", "X-Request-ID: h2-prior-1",
               f"http://127.0.0.1:{ports['plain']}/hello?x=1")
    assert out.returncode == 0, out.stderr
    body, version = out.stdout.rsplit("\n", 1)
    assert version == "2"
    answer = json.loads(body)
    assert answer["target"] == "/hello?x=1" and answer["method"] == "GET"
    assert answer["headers"]["host"] == f"127.0.0.1:{ports['plain']}"
    assert answer["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert answer["headers"]["x-forwarded-proto"] == "http"
    assert answer["headers"]["x-request-id"] == "h2-prior-1"
    event = txlb.requestEvent("h2-prior-1")
    assert event["protocol"] == "HTTP/2" and event["status"] == 200 and event["path"] == "/hello"


@_curl
def test_curl_http2_over_tls_by_alpn_and_http11_still_works(lb):
    txlb, ports, directory = lb
    url = f"https://localhost:{ports['tls']}/x"
    ca = str(directory / "ca.pem")
    out = curl("--http2", "--cacert", ca, "-w", "\n%{http_version}", "-H", "X-Request-ID: h2-alpn-1", url)
    assert out.returncode == 0, out.stderr
    body, version = out.stdout.rsplit("\n", 1)
    assert version == "2"
    assert json.loads(body)["headers"]["x-forwarded-proto"] == "https"
    assert txlb.requestEvent("h2-alpn-1")["protocol"] == "HTTP/2"
    out = curl("--http1.1", "--cacert", ca, "-w", "\n%{http_version}", "-H", "X-Request-ID: h1-alpn-1", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rsplit("\n", 1)[1] == "1.1"
    assert txlb.requestEvent("h1-alpn-1")["protocol"] == "HTTP/1.1"


@_curl
def test_http2_off_answers_http11_only(lb):
    _, ports, _ = lb
    out = curl("--http2", "-w", "\n%{http_version}", f"http://127.0.0.1:{ports['off']}/")
    assert out.returncode == 0 and out.stdout.rsplit("\n", 1)[1] == "1.1"
    out = curl("--http2-prior-knowledge", f"http://127.0.0.1:{ports['off']}/")
    assert out.returncode != 0


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_many_streams_on_one_connection_spread_across_servers(lb):
    _, ports, _ = lb

    async def go():
        async with httpx.AsyncClient(http2=True, http1=False, limits=httpx.Limits(max_connections=1)) as client:
            responses = await asyncio.gather(
                *[client.get(f"http://127.0.0.1:{ports['plain']}/n/{i}") for i in range(60)])
            return responses

    responses = _run(go())
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in responses)
    answers = [r.json() for r in responses]
    assert [a["target"] for a in answers] == [f"/n/{i}" for i in range(60)]
    servers = {a["server"] for a in answers}
    assert servers == {"w0", "w1", "w2"}


def test_routing_sticky_and_cache_over_http2(lb):
    _, ports, _ = lb
    with httpx.Client(http2=True, http1=False) as client:
        routed = client.get(f"http://127.0.0.1:{ports['plain']}/static/a.css")
        assert routed.http_version == "HTTP/2" and routed.json()["server"] == "static"
        first = client.get(f"http://127.0.0.1:{ports['sticky']}/s")
        cookie = first.cookies.get("LB")
        assert cookie
        servers = {client.get(f"http://127.0.0.1:{ports['sticky']}/s").json()["server"] for _ in range(6)}
        assert servers == {first.json()["server"]}
        one = client.get(f"http://127.0.0.1:{ports['cache']}/cached/1")
        two = client.get(f"http://127.0.0.1:{ports['cache']}/cached/1")
        assert (one.headers["x-cache"], two.headers["x-cache"]) == ("MISS", "HIT")
        assert one.content == two.content


def test_large_bodies_both_ways(lb):
    _, ports, directory = lb
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    with httpx.Client(http2=True, http1=False, timeout=60) as client:
        big = client.get(f"http://127.0.0.1:{ports['plain']}/big/{size}")
        assert big.http_version == "HTTP/2" and len(big.content) == size
        echoed = client.post(f"http://127.0.0.1:{ports['plain']}/echo", content=payload)
        assert echoed.status_code == 200 and echoed.content == payload

        def chunks():
            for i in range(0, size, 1 << 20):
                yield payload[i:i + (1 << 20)]

        # No content-length: END_STREAM ends the body, the backend gets it chunked.
        streamed = client.post(f"http://127.0.0.1:{ports['plain']}/echo", content=chunks())
        assert streamed.content == payload
    context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    with httpx.Client(http2=True, http1=False, timeout=60, verify=context) as client:
        echoed = client.post(f"https://localhost:{ports['tls']}/echo", content=payload)
        assert echoed.http_version == "HTTP/2" and echoed.content == payload


class _RawClient:
    """The h2 library over a socket: for what no polite client sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def events(self) -> list:
        """Everything until the server closes (bounded by the socket timeout)."""
        out = []
        for _ in range(10_000):
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            try:
                out += self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
        return out


def test_rapid_reset_gets_goaway_and_others_are_served(lb):
    txlb, ports, _ = lb
    attacker = _RawClient(ports["plain"])
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    # One more than the budget (max_concurrent_streams = 50: 200 resets),
    # and no more, so that txlb has read everything when it closes (a close
    # with bytes unread would be a TCP reset that can overtake the GOAWAY).
    for _ in range(201):
        sid = attacker.conn.get_next_available_stream_id()
        attacker.conn.send_headers(sid, request, end_stream=True)
        attacker.conn.reset_stream(sid, ErrorCodes.CANCEL)
    attacker.sock.sendall(attacker.conn.data_to_send())
    goaways = [e for e in attacker.events() if isinstance(e, h2.events.ConnectionTerminated)]
    assert [g.error_code for g in goaways] == [ErrorCodes.ENHANCE_YOUR_CALM]
    with httpx.Client(http2=True, http1=False) as client:
        assert client.get(f"http://127.0.0.1:{ports['plain']}/after").status_code == 200
    waitFor(lambda: any(e.get("reason") == "rapid_reset" for e in txlb.events("http2_goaway")),
            what="the goaway event (written at the log's next flush)")


def test_continuation_flood_gets_goaway_and_others_are_served(lb):
    _, ports, _ = lb
    from txlb.http.h2wire import CONTINUATION_LIMIT
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    attacker = _RawClient(ports["plain"])
    frame = HeadersFrame(1)
    frame.data = attacker.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                               (b":authority", b"a")])
    frame.flags.add("END_STREAM")
    flood = [frame.serialize()]
    # With the HEADERS frame, one fragment more than txlb's codec takes, the
    # last one: it has read everything when it closes (see the rapid reset test).
    for _ in range(CONTINUATION_LIMIT):
        more = ContinuationFrame(1)
        more.data = b"\x40\x01a\x01b" * 100  # literal headers, never ending
        flood.append(more.serialize())
    attacker.sock.sendall(b"".join(flood))
    # The client's own h2 would refuse the flood it sent back in its face:
    # read the GOAWAY frame's error code off the wire instead.
    data = b""
    for _ in range(1000):
        try:
            chunk = attacker.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    assert b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" in data  # a GOAWAY frame on stream 0
    with httpx.Client(http2=True, http1=False) as client:
        assert client.get(f"http://127.0.0.1:{ports['plain']}/after").status_code == 200


def test_header_rules_compression_and_redirects_over_http2(lb):
    _, ports, _ = lb
    base = f"http://127.0.0.1:{ports['policy']}"
    with httpx.Client(http2=True, http1=False) as client:
        seen = client.get(f"{base}/who")
        assert seen.http_version == "HTTP/2"
        assert seen.json()["headers"]["x-env"] == "h2"
        assert seen.headers["x-served-by"] == seen.json()["server"]
        text = client.get(f"{base}/text", headers={"Accept-Encoding": "gzip"})
        assert text.headers["content-encoding"] == "gzip"
        assert text.content == b"txlb over HTTP/2 " * 4096
        moved = client.get(f"{base}/old/page", follow_redirects=False)
        assert moved.status_code == 308 and moved.headers["location"].endswith("/new/page")
