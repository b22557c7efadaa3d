"""
Response bodies moved by splice(2) (L{txlb.http.bodysplice}).

Three layers: L{BodySplice} driven by hand on real loopback sockets with a
reactor stand-in that records what is watched; the backend connection's
decision on a memory reactor (which bodies are offered to the splice, and
that a body the splice cannot take still streams); and C{twistd txlb} in a
subprocess in front of a raw-socket HTTP backend, where the request events'
C{spliced} field says the kernel really moved the bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import socket
import threading
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support import Backend, Txlb, connect, freePort, httpRequests, tcpPair, waitFor
from tests.test_http_frontend import OK, Harness, head
from txlb.http import bodysplice
from txlb.http.backend import LARGE_READ
from txlb.http.bodysplice import CLOSED, MIN_SPLICE, SINK, SOURCE, BodySplice
from txlb.http.exchange import Exchange, _WhenDrained
from txlb.net import splice

MiB = 1 << 20

needsSplice = pytest.mark.skipif(not bodysplice.available, reason="no os.splice on this platform")


# BodySplice by hand.


class Watching:
    def __init__(self) -> None:
        self.readers: set = set()
        self.writers: set = set()

    def addReader(self, s) -> None:
        self.readers.add(s)

    def removeReader(self, s) -> None:
        self.readers.discard(s)

    def addWriter(self, s) -> None:
        self.writers.add(s)

    def removeWriter(self, s) -> None:
        self.writers.discard(s)


class Spliced:
    """backend -> [source | txlb | sink] -> client, C{length} bytes to move."""

    def __init__(self, length: int) -> None:
        self.backend, self.source = tcpPair()
        self.sink, self.client = tcpPair()
        self.reactor = Watching()
        self.moved: list[int] = []
        self.ended: list = []
        self.splice = BodySplice(self.reactor, self.source, self.sink, length, self.moved.append,
                                 lambda error, side: self.ended.append((error, side)))
        self.splice.start()

    def pump(self) -> None:
        """Run whatever the reactor would run now: the splice loop is its only reader."""
        assert self.reactor.readers == {self.splice.loop} and not self.reactor.writers
        self.splice.loop.doRead()

    @property
    def reading(self) -> bool:
        return bool(self.splice.source.mask & splice.WATCH_IN)

    @property
    def writing(self) -> bool:
        return bool(self.splice.sink.mask & splice.WATCH_OUT)

    @property
    def idle(self) -> bool:
        """Neither socket is in the loop's epoll set."""
        return not self.splice.source.mask and not self.splice.sink.mask and not self.splice.loop.sockets

    def close(self) -> None:
        self.splice.stop()
        for s in (self.backend, self.source, self.sink, self.client):
            s.close()
        self.splice.loop.connectionLost(None)


@pytest.fixture
def spliced():
    made: list[Spliced] = []

    def make(length: int) -> Spliced:
        made.append(Spliced(length))
        return made[-1]

    yield make
    for s in made:
        s.close()


def readSome(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4 * MiB)
    except BlockingIOError:
        return b""


@needsSplice
def test_exactly_the_body_moves_and_the_next_response_stays(spliced):
    s = spliced(300_000)
    body = random.Random(1).randbytes(300_000)
    s.backend.setblocking(True)
    s.backend.sendall(body + b"HTTP/1.1 200 OK\r\n")  # the next response follows at once
    received = b""
    for _ in range(10_000):
        if s.ended and len(received) >= len(body):
            break
        # Once the body is out, the next response's head keeps the source
        # readable: then wait for the client only.
        select.select([s.client] if s.ended else [s.source, s.client], [], [], 1.0)
        s.pump()
        received += readSome(s.client)
    assert s.ended == [(None, None)]
    assert received == body
    assert sum(s.moved) == len(body)
    assert s.idle
    assert s.splice.pipe is None
    assert s.source.recv(100) == b"HTTP/1.1 200 OK\r\n"  # left for the parser


@needsSplice
def test_a_source_that_closes_early_is_reported(spliced):
    s = spliced(100_000)
    s.backend.sendall(b"x" * 1000)
    s.backend.close()
    for _ in range(100):
        if s.ended:
            break
        select.select([s.source], [], [], 1.0)
        s.pump()
    assert s.ended == [(CLOSED, SOURCE)]
    assert sum(s.moved) == 1000
    assert s.idle


@needsSplice
def test_a_slow_sink_stops_reading_the_source(spliced):
    """
    The client reads nothing: once the client's buffers and the pipe are
    full, the source is no longer read; when the client reads, the rest
    comes through.
    """
    total = 64 * MiB
    s = spliced(total)
    s.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    block = b"y" * MiB
    sent = 0
    for _ in range(64):  # bounded: the buffers between are a few MiB
        try:
            sent += s.backend.send(block)
        except BlockingIOError:
            select.select([], [s.backend], [], 0.2)
        if not s.reading:
            break
        select.select([s.source], [], [], 0.2)
        s.pump()
    assert not s.reading  # backpressure: no more reading
    assert s.writing  # waiting for the client to drain
    assert s.splice.waitingForSink
    assert sent < total
    received = 0
    for _ in range(100_000):
        if received >= sent:
            break
        select.select([s.client], [], [], 1.0)
        received += len(readSome(s.client))
        s.pump()
    assert received == sent == sum(s.moved)
    assert s.reading and not s.writing
    assert s.ended == []


@needsSplice
def test_a_client_that_is_gone_is_reported(spliced):
    s = spliced(10 * MiB)
    s.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.client.close()  # a reset
    s.backend.sendall(b"z" * 100_000)
    for _ in range(100):
        if s.ended:
            break
        select.select([s.source], [s.sink], [], 1.0)
        s.pump()
    [(error, side)] = s.ended
    assert side == SINK and error
    assert s.idle


@needsSplice
def test_stop_says_nothing_and_gives_the_sockets_back(spliced):
    s = spliced(MIN_SPLICE)
    pipe = s.splice.pipe
    s.splice.stop()
    s.splice.stop()
    assert s.ended == [] and s.splice.pipe is None
    assert s.idle
    # Empty, the pipe goes back to the shared pool for the next splice.
    assert pipe in splice.pipes.free
    splice.pipes.free.remove(pipe)
    splice.pipes.discard(pipe)


@needsSplice
def test_a_socket_closed_meanwhile_is_not_taken_from_its_successor(spliced):
    """
    Twisted closed the backend's socket during the splice and a new socket
    got its number and a place in the loop's set: stopping the splice
    leaves the newcomer watched.
    """
    s = spliced(MIN_SPLICE)
    fd = s.source.fileno()
    s.source.close()
    newcomer, other = socket.socketpair()
    try:
        assert newcomer.fileno() == fd  # the lowest free number, on Linux

        class Handler:
            mask = 0

            def __init__(self, fd: int) -> None:
                self.fd = fd

        handler = Handler(fd)
        s.splice.loop.watch(handler, splice.WATCH_IN)
        s.splice.stop()
        assert s.splice.loop.sockets == {fd: handler} and handler.mask == splice.WATCH_IN
        other.send(b"!")
        assert [fd for fd, _ in s.splice.loop.epoll.poll(1)] == [fd]  # the kernel watches it too
        s.splice.loop.watch(handler, 0)
    finally:
        newcomer.close()
        other.close()


@needsSplice
def test_a_pipe_left_with_bytes_in_it_is_closed(spliced):
    s = spliced(MIN_SPLICE)
    pipe = s.splice.pipe
    os.write(pipe[1], b"stranded")
    s.splice.pending = 8  # as if the client had stopped taking them
    s.splice.stop()
    assert pipe not in splice.pipes.free
    for fd in pipe:
        with pytest.raises(OSError):
            os.fstat(fd)


# The backend connection's decision, on a memory reactor.


@pytest.fixture
def offered(monkeypatch):
    """Every C{spliceBody(left)} the backend connections offer."""
    calls: list[int] = []
    real = Exchange.spliceBody

    def record(self, left: int) -> None:
        calls.append(left)
        real(self, left)

    monkeypatch.setattr(Exchange, "spliceBody", record)
    return calls


def proxied(request: bytes, *responses: bytes):
    """A request through a harness, the backend answering in these reads."""
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(request)
    backend, server = h.answer()
    for data in responses:
        backend.dataReceived(data)
    return h, frontend, client, backend


def test_a_large_content_length_body_is_offered_the_rest(offered):
    body = b"b" * (3 * MIN_SPLICE)
    _, _, client, backend = proxied(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000],
                                    body[1000:5000], body[5000:])
    assert offered == [len(body) - 1000, len(body) - 5000]
    # A memory transport cannot be spliced: the body went the usual way.
    assert client.value().endswith(b"\r\n\r\n" + body)
    backend = backend._wrappedProtocol
    assert backend.exchange is None and backend.splice is None and backend.done


@pytest.mark.parametrize("request_, response", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 65535\r\n\r\nabc"),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000000\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\nab"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"),
], ids=["small", "head", "304", "chunked", "close-delimited"])
def test_other_bodies_are_not_offered(offered, request_, response):
    proxied(request_, response)
    assert offered == []


def test_the_last_read_of_a_body_is_not_offered(offered):
    body = b"c" * (2 * MIN_SPLICE)
    _, _, client, backend = proxied(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body + OK)
    assert offered == []
    assert backend._wrappedProtocol.extra


class Buffering:
    """The parts of a Twisted TCP transport L{_WhenDrained} uses."""

    def __init__(self) -> None:
        self.dataBuffer, self.offset, self._tempDataBuffer = b"head", 0, [b"body"]
        self.producer = None

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None


def test_the_splice_waits_for_twisteds_buffer_to_drain():
    transport = Buffering()
    started: list[bool] = []
    transport.registerProducer(_WhenDrained(transport, lambda: started.append(True)), False)
    assert started == [] and transport.producer is not None
    transport.dataBuffer, transport.offset = b"head", 4  # written, but the list is not
    transport.producer.resumeProducing()
    assert started == []
    transport.dataBuffer, transport.offset, transport._tempDataBuffer = b"", 0, []
    transport.producer.resumeProducing()
    assert started == [True] and transport.producer is None


def test_a_large_body_that_stays_in_python_is_read_in_larger_reads():
    h = Harness(servers=1)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    backend, server = h.answer()
    server.bufferSize = 65536
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert server.bufferSize == LARGE_READ
    backend.dataReceived(b"0\r\n\r\n")
    assert server.bufferSize == 65536
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert server.bufferSize == 65536  # a small body never asks
    assert client.value().count(b"hello") == 2


# End to end: twistd txlb in front of a raw-socket backend.


BLOCK = random.Random(13).randbytes(8 * MiB)


def bodyBlocks(length: int):
    """The backends' body of C{length} bytes: L{BLOCK} over and over."""
    view = memoryview(BLOCK)
    for offset in range(0, length, MiB):
        start = offset % len(BLOCK)
        yield view[start:start + min(MiB, length - offset)]


def bodyDigest(length: int) -> str:
    digest = hashlib.sha256()
    for block in bodyBlocks(length):
        digest.update(block)
    return digest.hexdigest()


def serve(sock: socket.socket, backend: Backend) -> None:
    """
    HTTP/1.1 with keep-alive: C{/big?bytes=N}, C{/chunked?bytes=N},
    C{/304}, C{/small}; C{/cut?bytes=N&after=M} sends M bytes of an N-byte
    body and closes; C{/hang?bytes=N&after=M} sends M and waits for txlb to
    close.
    """
    for requestHead in httpRequests(sock):
        method, target, _ = requestHead.split(b"\r\n")[0].split(b" ")
        url = urlsplit(target.decode())
        query = parse_qs(url.query)
        length = int(query.get("bytes", ["0"])[0])
        after = int(query.get("after", ["0"])[0])
        with backend.lock:
            backend.requests.append((method, url.path))
        if url.path == "/big":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            if method == b"HEAD":
                continue
            for block in bodyBlocks(length):
                sock.sendall(block)
                backend.sent += len(block)
        elif url.path == "/chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for block in bodyBlocks(length):
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            sock.sendall(b"0\r\n\r\n")
        elif url.path == "/304":
            sock.sendall(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: %d\r\n\r\n" % length)
        elif url.path in ("/cut", "/hang"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            sock.sendall(next(bodyBlocks(after)))
            if url.path == "/hang":
                sock.recv(1)  # until txlb closes
            return
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")


class Lab:
    def __init__(self) -> None:
        self.backend = Backend("big-1", serve)
        self.backend.sent = 0
        self.backend.requests = []
        self.port = {name: freePort() for name in ("web", "short")}
        config = (
            '[log]\naccess = true\n'
            f'[pools.big]\nservers = [{{ name = "big-1", address = "{self.backend.address}" }}]\n'
            f'[[services]]\nname = "web"\nprotocol = "http"\n'
            f'listen = "tcp:{self.port["web"]}:interface=127.0.0.1"\npool = "big"\n'
            f'[[services]]\nname = "short"\nprotocol = "http"\n'
            f'listen = "tcp:{self.port["short"]}:interface=127.0.0.1"\npool = "big"\n'
            'timeouts = { backend = "400ms", client = "400ms" }\n'
        )
        self.lb = Txlb(config).start(listening=2)

    def event(self, requestId: str) -> dict:
        return self.lb.requestEvent(requestId)

    def stop(self) -> None:
        self.lb.stop()
        self.backend.stop()


@pytest.fixture(scope="module")
def lab():
    if not bodysplice.available:
        pytest.skip("no os.splice on this platform")
    lab = Lab()
    yield lab
    lab.stop()


def get(path: str, rid: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: lab\r\nX-Request-ID: {rid}\r\n\r\n".encode()


def readHead(sock: socket.socket, buffered: bytearray) -> tuple[bytes, dict]:
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-head: {bytes(buffered)!r}"
        buffered += chunk
    end = buffered.index(b"\r\n\r\n") + 4
    status, fields = head(bytes(buffered[:end]))
    del buffered[:end]
    return status, fields


def readBody(sock: socket.socket, buffered: bytearray, length: int) -> str:
    """Read exactly C{length} body bytes; their SHA-256."""
    digest = hashlib.sha256()
    take = bytes(buffered[:length])
    del buffered[:length]
    digest.update(take)
    left = length - len(take)
    while left:
        chunk = sock.recv(min(left, 4 * MiB))
        assert chunk, f"closed with {left} bytes of the body to come"
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def test_50_mib_by_splice_then_keep_alive_on_both_sides(lab):
    total = 50 * MiB
    with connect(lab.port["web"], timeout=30) as s:
        buffered = bytearray()
        s.sendall(get("/small", "sp-warm"))
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
        assert readBody(s, buffered, 5)
        connections = lab.backend.connections
        s.sendall(get(f"/big?bytes={total}", "sp-50"))
        status, fields = readHead(s, buffered)
        assert status == b"HTTP/1.1 200 OK" and fields[b"content-length"] == [b"%d" % total]
        assert readBody(s, buffered, total) == bodyDigest(total)
        # The same client connection goes on, and so does the backend's.
        s.sendall(get("/small", "sp-after"))
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
        assert readBody(s, buffered, 5) == hashlib.sha256(b"small").hexdigest()
        s.sendall(get(f"/big?bytes={total}", "sp-50-again"))
        readHead(s, buffered)
        assert readBody(s, buffered, total) == bodyDigest(total)
        assert lab.backend.connections == connections
    event = lab.event("sp-50")
    assert event["status"] == 200 and "error" not in event
    assert total - 65536 <= event["spliced"] <= total  # at most one read went the usual way
    assert event["bytesSent"] > total
    assert lab.event("sp-50-again")["spliced"] >= total - 65536
    assert "spliced" not in lab.event("sp-after")


def test_pipelined_requests_around_a_spliced_response_keep_their_order(lab):
    """
    Three requests in one segment to a client that reads nothing at first:
    the second response is spliced while the third request waits, read
    but not answered, and the answers come back whole and in order.
    """
    first, second = 60_000, 20 * MiB
    bigs = lab.backend.requests.count((b"GET", "/big"))
    with connect(lab.port["web"], timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(get(f"/big?bytes={first}", "pl-1") + get(f"/big?bytes={second}", "pl-2") + get("/small", "pl-3"))
        waitFor(lambda: lab.backend.requests.count((b"GET", "/big")) >= bigs + 2,
                timeout=30, what="the second request to reach the backend")
        buffered = bytearray()
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
        assert readBody(s, buffered, first) == bodyDigest(first)
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
        assert readBody(s, buffered, second) == bodyDigest(second)
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
        assert readBody(s, buffered, 5) == hashlib.sha256(b"small").hexdigest()
    assert "spliced" not in lab.event("pl-1")
    assert lab.event("pl-2")["spliced"] >= second - 65536


@pytest.mark.parametrize("path, method, length", [
    ("/big?bytes=10485760", "HEAD", 0),
    ("/304?bytes=10485760", "GET", 0),
    ("/chunked?bytes=3145728", "GET", 3 * MiB),
    ("/big?bytes=60000", "GET", 60_000),
], ids=["head", "304", "chunked", "small"])
def test_what_cannot_or_need_not_be_spliced_goes_the_usual_way(lab, path, method, length):
    rid = f"us-{method}-{path.replace('/', '').replace('?', '-').replace('=', '')}"
    with connect(lab.port["web"], timeout=30) as s:
        s.sendall(get(path, rid, method))
        buffered = bytearray()
        status, fields = readHead(s, buffered)
        if b"transfer-encoding" in fields:
            data, buffered = buffered, bytearray()
            while not data.endswith(b"\r\n0\r\n\r\n"):
                chunk = s.recv(MiB)
                assert chunk
                data += chunk
            body, rest = bytearray(), bytes(data)
            while True:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                body += rest[:int(size, 16)]
                rest = rest[int(size, 16) + 2:]
            assert hashlib.sha256(body).hexdigest() == bodyDigest(length)
        else:
            assert readBody(s, buffered, length) == bodyDigest(length)
        s.sendall(get("/small", rid + "-next"))  # the connection is still good
        assert readHead(s, buffered)[0] == b"HTTP/1.1 200 OK"
    event = lab.event(rid)
    assert "spliced" not in event and "error" not in event


def receivedUntilCut(port: int, path: str, rid: str) -> int:
    """Body bytes a client gets before txlb cuts the connection."""
    with connect(port, timeout=30) as s:
        s.sendall(get(path, rid))
        buffered = bytearray()
        readHead(s, buffered)
        received = len(buffered)
        try:
            while True:
                chunk = s.recv(MiB)
                if not chunk:
                    break
                received += len(chunk)
        except ConnectionResetError:
            pass
    return received


def test_a_backend_that_closes_mid_body_aborts_the_client(lab):
    total = 10 * MiB
    assert receivedUntilCut(lab.port["web"], f"/cut?bytes={total}&after={MiB}", "sp-cut") < total
    event = lab.event("sp-cut")
    assert event["error"] == "big-1 closed the connection"
    assert event["spliced"] > 0


def test_a_backend_that_stalls_mid_body_times_out(lab):
    assert receivedUntilCut(lab.port["short"], f"/hang?bytes={10 * MiB}&after={MiB}", "sp-hang") < 10 * MiB
    event = lab.event("sp-hang")
    assert event["error"] == "big-1 sent nothing for 0.4s"
    assert event["spliced"] > 0


def test_a_client_that_stops_reading_times_out(lab):
    with connect(lab.port["short"], timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(get(f"/big?bytes={200 * MiB}", "sp-stuck"))
        event = lab.event("sp-stuck")  # logged while we read nothing
    assert event["error"] == "the client read nothing for 0.4s"


def stalled(counter):
    """A condition: C{counter()} stopped moving for ten polls."""
    progress = {"last": -1, "still": 0}

    def check() -> bool:
        value = counter()
        progress["still"] = progress["still"] + 1 if value == progress["last"] else 0
        progress["last"] = value
        return progress["still"] >= 10

    return check


def test_a_slow_client_holds_the_backend_back_without_memory(lab):
    total = 160 * MiB
    baseline = lab.lb.rss()
    peak = baseline
    lab.backend.sent = 0
    with connect(lab.port["web"], timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(get(f"/big?bytes={total}", "sp-slow"))
        buffered = bytearray()
        readHead(s, buffered)
        received = len(buffered)
        digest = hashlib.sha256(buffered)
        while received < total:
            waitFor(stalled(lambda: lab.backend.sent), timeout=30, what="the backend to stall")
            peak = max(peak, lab.lb.rss())
            assert lab.backend.sent < total
            assert lab.backend.sent - received < 32 * MiB, "txlb read far ahead of the client"
            target = min(total, received + 40 * MiB)
            while received < target:
                chunk = s.recv(MiB)
                assert chunk
                digest.update(chunk)
                received += len(chunk)
                if received >= total:
                    break
    assert digest.hexdigest() == bodyDigest(total)
    assert peak - baseline < 16 * MiB
    assert lab.event("sp-slow")["spliced"] >= total - 65536


def test_many_clients_at_once_each_get_their_own_body(lab):
    sizes = [MIN_SPLICE + 1, 3 * MiB + 7, 5 * MiB, 12 * MiB + 3, 200_001, 7 * MiB]
    results: dict[int, str] = {}

    def fetch(i: int, size: int) -> None:
        with connect(lab.port["web"], timeout=30) as s:
            buffered = bytearray()
            for j in range(2):
                s.sendall(get(f"/big?bytes={size}", f"sp-many-{i}-{j}"))
                readHead(s, buffered)
                results[i * 2 + j] = readBody(s, buffered, size)

    threads = [threading.Thread(target=fetch, args=(i, size)) for i, size in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, size in enumerate(sizes):
        assert results[i * 2] == results[i * 2 + 1] == bodyDigest(size)
