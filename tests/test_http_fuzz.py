"""
Generated malformed and ambiguous requests thrown at the HTTP proxy on a
memory reactor.

Whatever the client sends, txlb must not raise; every answer must be a
well-formed HTTP/1.1 response; every request that reaches a backend must
parse under strict parsers (h11 and httptools) into exactly the requests a
strict independent reading of the client's bytes (h11) finds, in order, with
the same method, target and body; after a refusal the connection closes and
nothing more is forwarded; and another client keeps being served.
"""

from __future__ import annotations

import re

import h11
import httptools
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.test_http_frontend import Harness

# Building requests.

TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~", min_size=1, max_size=12)
VALUE = st.binary(max_size=20).map(lambda b: bytes(c for c in b if 0x20 < c < 0x7F or c == 0x20).strip())
METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"])
TARGETS = st.sampled_from([b"/", b"/a", b"/a/b?c=d", b"/%41", b"/api/x?y=1&z", b"http://h.example/p",
                           b"HTTPS://h.example:8443?q", b"*"])


@st.composite
def body(draw) -> bytes:
    return draw(st.binary(max_size=300))


@st.composite
def chunked(draw, data: bytes) -> bytes:
    """C{data} chunked at random places, with optional extensions and trailers."""
    out = []
    rest = data
    while rest:
        n = draw(st.integers(1, max(1, len(rest))))
        ext = draw(st.sampled_from([b"", b";a=b", b";x"]))
        out.append(b"%x%s\r\n%s\r\n" % (n, ext, rest[:n]))
        rest = rest[n:]
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


@st.composite
def request(draw) -> bytes:
    method = draw(METHODS)
    target = draw(TARGETS)
    if target == b"*":
        method = b"OPTIONS"
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0"]))
    headers = [(b"Host", draw(st.sampled_from([b"a", b"shop.example", b"h:8080"])))]
    if version == b"HTTP/1.0" and draw(st.booleans()):
        headers = []
    for _ in range(draw(st.integers(0, 3))):
        headers.append((b"X-" + draw(TOKEN).encode(), draw(VALUE)))
    if draw(st.booleans()):
        headers.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"X-Foo", b"upgrade"]))))
    data = draw(body())
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length" or (framing == "none" and data and method in (b"POST", b"PUT")):
        headers.append((b"Content-Length", b"%d" % len(data)))
        raw = data
    elif framing == "chunked" and version == b"HTTP/1.1":
        headers.append((b"Transfer-Encoding", b"chunked"))
        raw = draw(chunked(data))
    else:
        raw = b""
    draw(st.randoms()).shuffle(headers)
    return method + b" " + target + b" " + version + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + raw


#: Ways to make a request ambiguous or malformed: (pattern, replacement)
#: applied to its first match.
ATTACKS = [
    (rb"\r\n\r\n", b"\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nContent-Length: 3, 3\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nTransfer-Encoding:\x0bchunked\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nTransfer-Encoding : chunked\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-Fold: a\r\n b\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-Fold: a\r\n\tTransfer-Encoding: chunked\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-CR: a\rb\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-Nul: a\x00b\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-Ctl: a\x1bb\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nBad Name: x\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\n: empty-name\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nHost: second\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nContent-Length: -1\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nContent-Length: 1e3\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nContent-Length: 99999999999999999999\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
    (rb"\r\n\r\n", b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    (rb"\r\n", b"\n"),
    (rb"\r\n", b"\r"),
    (rb"\r\n\r\n", b"\n\n"),
    (rb"HTTP/1\.[01]", b"HTTP/1.2"),
    (rb"HTTP/1\.[01]", b"HTTP/2.0"),
    (rb"HTTP/1\.[01]", b"http/1.1"),
    (rb" /", b"  /"),
    (rb" HTTP", b"\tHTTP"),
    (rb"^[A-Z]+", b"G\x00T"),
    (rb"^[A-Z]+", b"CONNECT"),
    (rb"\r\n0\r\n", b"\r\n0x0\r\n"),
    (rb"\r\n0\r\n", b"\r\n-0\r\n"),
    (rb"\r\n0\r\n", b"\r\n0 \r\n"),
    (rb"\r\n0\r\n", b"\r\nffffffffffffffffff\r\n"),
    (rb"\r\n([0-9a-f]+)(;[^\r]*)?\r\n", b"\r\n1\nx\r\n"),
    (rb"\r\n([0-9a-f]+)(;[^\r]*)?\r\n", b"\r\nz\r\n"),
    (rb"\r\n\r\n$", b"\r\n"),
]


@st.composite
def attacked(draw) -> bytes:
    raw = draw(request())
    pattern, replacement = draw(st.sampled_from(ATTACKS))
    return re.sub(pattern, lambda m: replacement, raw, count=1)


@st.composite
def mutated(draw) -> bytes:
    """Random byte edits of a valid request."""
    raw = bytearray(draw(request()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        byte = draw(st.sampled_from(list(b"\r\n\t :;,\x00\x7f\x80\xff0aZ-")))
        if kind == "flip" and raw:
            raw[at] = byte
        elif kind == "insert":
            raw.insert(at, byte)
        elif raw:
            del raw[at]
    return bytes(raw)


@st.composite
def stream(draw) -> list[bytes]:
    """A few requests pipelined, then cut into the pieces the client sends."""
    parts = draw(st.lists(st.one_of(request(), attacked(), mutated()), min_size=1, max_size=4))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    pieces, last = [], 0
    for cut in cuts + [len(data)]:
        if cut > last:
            pieces.append(data[last:cut])
            last = cut
    return pieces


# Running them.


class FakeBackends:
    """
    Answers every backend connection the harness opens: each request that
    arrives is read with h11 (and checked with httptools) and answered with
    a small response naming it.
    """

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.conns: list[dict] = []
        self.requests: list[tuple[bytes, bytes, bytes, list]] = []

    def pump(self) -> None:
        progress = True
        while progress:
            progress = False
            while len(self.conns) < len(self.h.reactor.tcpClients):
                if self.h.reactor.connectors[len(self.conns)].stoppedConnecting:
                    self.conns.append({"transport": None, "closed": True})  # cancelled
                    continue
                backend, transport = self.h.answer(len(self.conns))
                self.conns.append({"backend": backend, "transport": transport, "seen": 0,
                                   "h11": h11.Connection(h11.SERVER), "current": None})
                progress = True
            for c in self.conns:
                progress |= self._serve(c)

    def _serve(self, c: dict) -> bool:
        if c.get("closed"):
            return False
        transport = c["transport"]
        data = transport.value()[c["seen"]:]
        if not data:
            return False
        c["seen"] += len(data)
        conn = c["h11"]
        conn.receive_data(data)
        served = False
        while True:
            event = conn.next_event()  # raises RemoteProtocolError on anything malformed
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                c["current"] = [event, bytearray()]
            elif isinstance(event, h11.Data):
                c["current"][1] += event.data
            elif isinstance(event, h11.EndOfMessage):
                req, data = c["current"]
                number = len(self.requests)
                self.requests.append((req.method, req.target, bytes(data), list(req.headers)))
                answer = b"" if req.method == b"HEAD" else b"answer %d" % number
                response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                if req.method == b"HEAD":
                    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                if conn.our_state is h11.SEND_RESPONSE:
                    conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"%d" % len(answer))]))
                    conn.send(h11.Data(data=answer)) if answer else None
                    conn.send(h11.EndOfMessage())
                c["backend"].dataReceived(response)
                served = True
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    c["closed"] = True
                    break
        return served


def strictReading(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The complete requests a strict independent parser (h11) reads from C{data}, until it objects."""
    # Two leniencies of llhttp that h11 lacks, harmless because txlb writes
    # the request line anew: runs of spaces in the request line (RFC 9112 3
    # allows it) and CR or LF bytes before one (2.2 allows empty lines).
    data = _REQUEST_LINE.sub(rb"\1 \2 \3", data)
    data = _BEFORE_REQUEST.sub(b"", data)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    found = []
    current = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return found
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return found
        if isinstance(event, h11.Request):
            current = [event, bytearray()]
        elif isinstance(event, h11.Data):
            current[1] += event.data
        elif isinstance(event, h11.EndOfMessage):
            found.append((current[0].method, current[0].target, bytes(current[1])))
            if current[0].method == b"CONNECT" or conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                return found  # the rest would be a tunnel's
            conn.send(h11.Response(status_code=200, headers=[(b"Content-Length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                rest = bytes(conn.trailing_data[0])
                if rest[:1] in (b"\r", b"\n"):
                    # The empty lines llhttp skips before the next request line.
                    conn = h11.Connection(h11.SERVER)
                    conn.receive_data(_BEFORE_REQUEST.sub(b"", rest))
            elif current[0].http_version == b"1.0" and _keepAlive10(current[0].headers):
                # h11 does not keep HTTP/1.0 connections; a server may (RFC 9112 9.3).
                rest = bytes(conn.trailing_data[0])
                conn = h11.Connection(h11.SERVER)
                if not rest:
                    return found
                conn.receive_data(rest)
            else:
                return found
        else:
            return found


_METHOD = rb"(?:GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT)"
_REQUEST_LINE = re.compile(rb"(" + _METHOD + rb") +([^ \r\n]+) +(HTTP/[0-9]\.[0-9]\r\n)")
_BEFORE_REQUEST = re.compile(rb"^[\r\n]+(?=" + _METHOD + rb" )")


def _keepAlive10(headers) -> bool:
    return any(n == b"connection" and b"keep-alive" in [t.strip().lower() for t in v.split(b",")]
               for n, v in headers)


_STATUS = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\t !-~]*")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t !-~\x80-\xff]*?)[ \t]*")


def responses(data: bytes, heads: int = 0) -> list[tuple[int, dict[bytes, list[bytes]], bytes]]:
    """Split what the client received into responses, failing on anything malformed."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"an unfinished response head: {data[:200]!r}"
        lines = data[:end].split(b"\r\n")
        status = _STATUS.fullmatch(lines[0])
        assert status, f"bad status line {lines[0]!r}"
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            assert field, f"bad header line {line!r}"
            fields.setdefault(field[1].lower(), []).append(field[2])
        code = int(status[1])
        data = data[end + 4:]
        assert b"transfer-encoding" not in fields  # every answer here has a length
        if code < 200 or code in (204, 304):
            length = 0
        else:
            [length] = fields[b"content-length"]
            length = int(length)
        assert len(data) >= length, "a body cut short"
        out.append((code, fields, data[:length]))
        data = data[length:]
        assert code >= 200 or code == 100
        assert fields.get(b"x-request-id") or code == 100
    return out


def originForm(request: tuple[bytes, bytes, bytes]) -> tuple[bytes, bytes, bytes]:
    """A request as the proxy forwards it: an absolute-form target becomes a path."""
    method, target, data = request
    match = re.fullmatch(rb"(?i)https?://[^/?#]+(.*)", target)
    if match:
        target = match[1] if match[1].startswith(b"/") else b"/" + match[1]
    return method, target, data


def checkHttptools(forwarded: bytes) -> None:
    """httptools, in strict mode, accepts what was forwarded (upgrade aside)."""

    class Sink:
        pass

    parser = httptools.HttpRequestParser(Sink())
    try:
        parser.feed_data(forwarded)
    except httptools.HttpParserUpgrade:
        pass


def run(pieces: list[bytes]) -> None:
    h = Harness(servers=2, maxHeaderBytes=8192)
    backends = FakeBackends(h)
    frontend, client = h.accept()
    for piece in pieces:
        if client.disconnecting:
            break
        if frontend.transport.producerState == "paused" and not frontend.dead:
            backends.pump()  # answers free the pipeline
        frontend.dataReceived(piece)
        backends.pump()
    backends.pump()

    # What reached the backends is what a strict reading of the client's bytes finds.
    sent = b"".join(pieces)
    strict = strictReading(sent)
    forwarded = [(m, t, b) for m, t, b, _ in backends.requests]
    for c in backends.conns:
        if c["transport"] is not None:
            checkHttptools(c["transport"].value())

    assert len(forwarded) <= len(strict), (forwarded, strict)
    assert forwarded == [originForm(r) for r in strict[: len(forwarded)]]
    assert not any(m == b"CONNECT" for m, _, _ in forwarded)
    for _, _, _, headers in backends.requests:
        names = [n for n, _ in headers]
        assert names.count(b"host") == 1
        assert names.count(b"x-request-id") == 1
        assert not {b"connection", b"keep-alive", b"te", b"trailer"} & set(names) or b"upgrade" in names

    # Every answer is well formed; an error closes the connection.
    answers = responses(client.value())
    for i, (code, fields, _) in enumerate(answers):
        if code >= 400:
            assert code in (400, 405, 408, 413, 431, 502, 503, 505)
            if code != 503 and code != 502:
                assert fields[b"connection"] == [b"close"]
                assert i == len(answers) - 1, "an answer after a refusal"
                assert client.disconnecting
    assert len([a for a in answers if a[0] == 200]) == len(forwarded)

    # Nothing is left held.
    frontend.connectionLost(None)
    assert [s.active for s in h.servers] == [0, 0]

    # And another client is served.
    other, otherClient = h.accept("10.9.9.9")
    other.dataReceived(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
    backends.pump()
    [(code, _, body)] = responses(otherClient.value())
    assert code == 200 and body.startswith(b"answer")


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(stream())
def test_generated_streams(pieces):
    run(pieces)


@FUZZ
@given(st.lists(attacked(), min_size=1, max_size=3))
def test_ambiguous_framing(parts):
    run(parts)


@FUZZ
@given(st.lists(st.one_of(request(), mutated()), min_size=1, max_size=3), st.binary(max_size=64))
def test_random_bytes_after_requests(parts, tail):
    run(parts + [tail])


@FUZZ
@given(st.lists(request(), min_size=1, max_size=5), st.integers(1, 7))
def test_valid_requests_all_arrive_whatever_the_split(parts, size):
    data = b"".join(parts)
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    h = Harness(servers=2)
    backends = FakeBackends(h)
    frontend, client = h.accept()
    for piece in pieces:
        frontend.dataReceived(piece)
        backends.pump()
    expected = strictReading(data)
    # the proxy stops after a Connection: close or an HTTP/1.0 request without keep-alive
    assert [r[:3] for r in backends.requests] == [originForm(r) for r in expected[: len(backends.requests)]]
    answers = responses(client.value())
    assert [a[0] for a in answers] == [200] * len(backends.requests)
    assert len(backends.requests) >= 1
