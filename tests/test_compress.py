"""
Compression (L{txlb.http.compress}): the C{Accept-Encoding} parser (with
generated values), the streamed encoder, the decision on each response,
and the proxy compressing on a memory reactor (streaming, framing, the
cache's variants, no splicing).
"""

from __future__ import annotations

import gzip
import zlib

import h11
import pytest
from hypothesis import given, strategies as st

from tests.test_http_frontend import Harness
from txlb.config import CacheConfig
from txlb.http import compress
from txlb.http.compress import (
    DEFAULT_TYPES, BrotliEncoder, Compression, Encoder, acceptsGzip, chooseEncoding, qualities,
)
from txlb.http.routing import Route, Router

# Accept-Encoding.

CODINGS = st.sampled_from([b"gzip", b"GZIP", b"x-gzip", b"br", b"deflate", b"identity", b"*", b"zstd", b"compress"])
QS = st.one_of(st.none(), st.sampled_from([b"0", b"0.0", b"0.000", b"0.001", b"0.5", b"1", b"1.0", b"1.000"]))
SPACE = st.sampled_from([b"", b" ", b"  ", b"\t"])


def weight(q):
    return 1.0 if q is None else float(q)


@st.composite
def acceptEncoding(draw):
    """A well-formed value and what it says of each coding (the first mention counts)."""
    members = draw(st.lists(st.tuples(CODINGS, QS, SPACE, SPACE), max_size=6))
    parts = []
    said: dict[bytes, float] = {}
    for coding, q, s1, s2 in members:
        parts.append(s1 + coding + (b"" if q is None else s2 + b";" + s2 + b"q=" + q) + s2)
        said.setdefault(coding.lower(), weight(q))
    return b",".join(parts), said


@given(acceptEncoding())
def test_accept_encoding_weights(generated):
    value, said = generated
    assert qualities(value) == said
    expected = next((said[c] > 0 for c in (b"gzip", b"x-gzip", b"*") if c in said), False)
    assert acceptsGzip([(b"Accept-Encoding", value)]) == expected


@given(st.binary(max_size=60))
def test_any_accept_encoding_bytes_are_read_without_error(value):
    acceptsGzip([(b"accept-encoding", value)])


@pytest.mark.parametrize("value, accepted", [
    (b"gzip", True), (b"gzip;q=0", False), (b"gzip; q=0.001", True), (b"*", True), (b"*;q=0", False),
    (b"br, *;q=0", False), (b"*;q=0, gzip", True), (b"identity", False), (b"", False), (b"x-gzip", True),
    (b"gzip;q=2", False), (b"gzip;q=abc", False), (b"gzip;level=1;q=0.5", True), (b"deflate, gzip;q=0", False),
])
def test_accept_encoding_examples(value, accepted):
    assert acceptsGzip([(b"Accept-Encoding", value)]) is accepted


def test_several_accept_encoding_fields_are_one_list():
    assert acceptsGzip([(b"Accept-Encoding", b"br"), (b"accept-encoding", b"gzip")])
    assert not acceptsGzip([])


# The encoder.


@given(st.lists(st.binary(max_size=3000) | st.text(max_size=2000).map(str.encode), max_size=12),
       st.integers(1, 9))
def test_streamed_output_decompresses_to_the_input(pieces, level):
    encoder = Encoder(level)
    out = []
    for piece in pieces:
        out.append(encoder.compress(piece))
        out.append(encoder.flush())
    out.append(encoder.finish())
    body = b"".join(out)
    assert zlib.decompress(body, 16 + zlib.MAX_WBITS) == b"".join(pieces)
    assert gzip.decompress(body) == b"".join(pieces)


def test_each_flush_makes_what_was_given_readable():
    encoder = Encoder(6)
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for i in range(5):
        piece = b"line %d of a log\n" % i * 100
        assert reader.decompress(encoder.compress(piece) + encoder.flush()) == piece


@pytest.mark.parametrize("value, brotli, chosen", [
    (b"gzip, deflate, br", True, b"br"),  # what browsers send: equal weights, the smaller coding
    (b"gzip, deflate, br", False, b"gzip"),
    (b"br;q=0.5, gzip", True, b"gzip"),
    (b"br, gzip;q=0.8", True, b"br"),
    (b"br", True, b"br"),
    (b"br", False, None),
    (b"*", True, b"br"),
    (b"*", False, b"gzip"),
    (b"br;q=0, *", True, b"gzip"),
    (b"gzip;q=0, *;q=0.1", True, b"br"),
    (b"identity, deflate", True, None),
])
def test_the_coding_chosen(value, brotli, chosen):
    assert chooseEncoding([(b"Accept-Encoding", value)], brotli) == chosen


needsBrotli = pytest.mark.skipif(compress._brotli is None, reason="the brotli extra is not installed")


@needsBrotli
@given(st.lists(st.binary(max_size=3000), max_size=8), st.integers(1, 9))
def test_brotli_output_decompresses_to_the_input_and_each_flush_makes_it_readable(pieces, level):
    import brotli

    encoder, decoder = BrotliEncoder(level), brotli.Decompressor()
    for i, piece in enumerate(pieces):
        out = decoder.process(encoder.compress(piece) + encoder.flush())
        assert out == piece
    assert decoder.process(encoder.finish()) == b"" and decoder.is_finished()


# The decision.

BIG = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Length", b"5000"), (b"ETag", b'"v1"'),
       (b"Accept-Ranges", b"bytes")]
GZIP = [(b"Accept-Encoding", b"gzip, deflate")]


def decide(headers=BIG, request=GZIP, status=200, method=b"GET", compression=None):
    compression = compression or Compression(DEFAULT_TYPES, 1024, 6)
    out, encoder = compression.start(method, status, request, list(headers))
    return out, encoder


def test_a_compressible_response_is_rewritten_for_gzip():
    out, encoder = decide()
    assert isinstance(encoder, Encoder)
    assert out == [(b"Content-Type", b"text/html; charset=utf-8"), (b"ETag", b'W/"v1"'),
                   (b"Vary", b"Accept-Encoding"), (b"Content-Encoding", b"gzip")]


@needsBrotli
def test_a_client_that_weighs_brotli_no_lower_gets_it():
    out, encoder = decide(request=[(b"Accept-Encoding", b"gzip, br")])
    assert isinstance(encoder, BrotliEncoder) and encoder.encoding == "br"
    assert out[-2:] == [(b"Vary", b"Accept-Encoding"), (b"Content-Encoding", b"br")]


def test_without_the_brotli_package_gzip_it_is(monkeypatch):
    monkeypatch.setattr(compress, "_brotli", None)
    out, encoder = decide(request=[(b"Accept-Encoding", b"br, gzip")])
    assert isinstance(encoder, Encoder) and (b"Content-Encoding", b"gzip") in out
    assert decide(request=[(b"Accept-Encoding", b"br")]) == ([*BIG, (b"Vary", b"Accept-Encoding")], None)


def test_an_existing_vary_is_extended_once():
    out, _ = decide([*BIG, (b"Vary", b"Cookie")])
    assert (b"Vary", b"Cookie, Accept-Encoding") in out and [n for n, _ in out].count(b"Vary") == 1
    out, _ = decide([*BIG, (b"vary", b"accept-encoding")])
    assert [(n, v) for n, v in out if n.lower() == b"vary"] == [(b"vary", b"accept-encoding")]


def test_a_weak_etag_stays_as_it_is():
    out, _ = decide([(b"Content-Type", b"text/plain"), (b"ETag", b'W/"x"')])
    assert (b"ETag", b'W/"x"') in out


def test_a_client_that_does_not_accept_gzip_gets_the_body_as_is_but_told_it_varies():
    for request in ([], [(b"Accept-Encoding", b"gzip;q=0, deflate")], [(b"Accept-Encoding", b"identity")]):
        out, encoder = decide(request=request)
        assert encoder is None
        assert out == [*BIG, (b"Vary", b"Accept-Encoding")]


@pytest.mark.parametrize("headers, asked, status, method", [
    ([(b"Content-Type", b"image/png"), (b"Content-Length", b"5000")], GZIP, 200, b"GET"),
    ([(b"Content-Length", b"5000")], GZIP, 200, b"GET"),
    ([(b"Content-Type", b"text/plain"), (b"Content-Length", b"1023")], GZIP, 200, b"GET"),
    ([*BIG, (b"Content-Encoding", b"br")], GZIP, 200, b"GET"),
    ([*BIG, (b"Content-Encoding", b"gzip")], GZIP, 200, b"GET"),
    ([*BIG, (b"Cache-Control", b"public, No-Transform")], GZIP, 200, b"GET"),
    ([*BIG, (b"Content-Range", b"bytes 0-99/5000")], GZIP, 206, b"GET"),
    (BIG, [*GZIP, (b"Range", b"bytes=0-99")], 200, b"GET"),
    (BIG, GZIP, 204, b"GET"),
    (BIG, GZIP, 304, b"GET"),
    (BIG, GZIP, 200, b"HEAD"),
])
def test_what_is_never_compressed_is_left_alone(headers, asked, status, method):
    assert decide(headers, asked, status, method) == (headers, None)


def test_types_and_sizes():
    c = Compression(["text/*", "application/json"], 100, 1)
    assert c.wants(b"text/css") and c.wants(b"Application/JSON; charset=utf-8") and not c.wants(b"application/xml")
    assert not c.wants(None) and not c.wants(b"")
    assert decide([(b"Content-Type", b"text/css"), (b"Content-Length", b"100")], compression=c)[1] is not None
    assert decide([(b"Content-Type", b"text/css")], compression=c)[1] is not None  # length unknown: compressed


# Through the proxy.


def compressing(**settings) -> Harness:
    """A service compressing text, but not on its route for C{/raw/}."""
    h = Harness(servers=1, **settings)
    h.service.update(router=Router("p", [Route("p", path_prefix="/raw/")], compress=Compression(["text/*"], 1024, 6)))
    return h


def responseOf(data: bytes, method: str = "GET", version: bytes = b"1.1"):
    """The response in C{data} as a strict client reads it: head and the body's bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    response, body = None, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return response, dict(response.headers) if response else {}, body, event


TEXT = b"".join(b"%05d: the quick brown fox jumps over the lazy dog\n" % i for i in range(4000))


def test_a_content_length_body_is_streamed_gzip_and_chunked():
    h = compressing()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(TEXT)
                         + TEXT[:50000])
    # What one read brought is readable at the client before the rest comes.
    response, fields, body, _ = responseOf(client.value())
    assert fields[b"content-encoding"] == b"gzip" and fields[b"transfer-encoding"] == b"chunked"
    assert b"content-length" not in fields and fields[b"vary"] == b"Accept-Encoding"
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body) == TEXT[:50000]
    for at in range(50000, len(TEXT), 30000):
        backend.dataReceived(TEXT[at:at + 30000])
    response, fields, body, end = responseOf(client.value())
    assert isinstance(end, h11.EndOfMessage)
    assert gzip.decompress(body) == TEXT and len(body) < len(TEXT) / 5
    assert h.connections._idle[h.servers[0]]  # the backend connection is kept for the next request


def test_a_chunked_body_and_the_request_event(events):
    h = compressing()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\n")
    for at in range(0, len(TEXT), 8192):
        piece = TEXT[at:at + 8192]
        backend.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
    backend.dataReceived(b"0\r\n\r\n")
    _, fields, body, end = responseOf(client.value())
    assert isinstance(end, h11.EndOfMessage) and gzip.decompress(body) == TEXT
    [event] = [e for e in events if e.get("event") == "request"]
    assert event["encoding"] == "gzip" and event["bytesSent"] == len(client.value())


def test_an_http10_client_gets_the_encoded_body_until_the_connection_closes():
    h = compressing()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(TEXT), TEXT))
    data = client.value()
    headText, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in headText and b"Transfer-Encoding" not in headText
    assert b"Content-Length" not in headText and b"Connection: close" in headText
    assert gzip.decompress(body) == TEXT and client.disconnecting


def test_a_route_without_compress_compresses_nothing():
    h = compressing()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /raw/x HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(TEXT), TEXT))
    _, fields, body, _ = responseOf(client.value())
    assert body == TEXT and b"content-encoding" not in fields and b"vary" not in fields


def test_a_compressed_body_turns_nagle_off_on_the_client_connection():
    """Its pieces must not wait for the client's delayed ACKs (L{txlb.net.wire.noDelay})."""
    h = compressing()
    frontend, client = h.accept()
    calls: list[bool] = []
    client.setTcpNoDelay = calls.append
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(TEXT), TEXT)
    frontend.dataReceived(b"GET /raw/x HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend, _ = h.answer()
    backend.dataReceived(head)
    assert calls == []  # a body that goes as it came: one write, or spliced
    frontend.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n")
    backend.dataReceived(head)
    assert calls == [True] and b"Content-Encoding: gzip" in client.value()


def test_no_compression_without_accept_encoding_and_the_length_is_kept():
    h = compressing()
    frontend, client = h.accept()
    frontend.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    backend, server = h.answer()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(TEXT), TEXT))
    _, fields, body, _ = responseOf(client.value())
    assert body == TEXT and fields[b"content-length"] == b"%d" % len(TEXT) and fields[b"vary"] == b"Accept-Encoding"


CACHEABLE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=60\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(TEXT), TEXT))


def test_the_cache_keeps_a_gzip_and_a_plain_variant_apart():
    h = compressing(cacheConfig=CacheConfig(max_size=4 << 20, max_object=1 << 20))
    answers = {}
    for accept in (b"gzip", b"", b"gzip", b""):
        frontend, client = h.accept()
        extra = b"Accept-Encoding: gzip\r\n" if accept else b""
        frontend.dataReceived(b"GET /page HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")
        if not client.value():  # a miss went to the backend
            if h.connects() > len(h.backends):
                h.answer()
            h.backends[-1][0].dataReceived(CACHEABLE)
        _, fields, body, _ = responseOf(client.value())
        answers.setdefault(accept, []).append((fields[b"x-cache"], fields.get(b"content-encoding"), body))
    assert h.servers[0].total == 2  # one backend request per variant
    (miss, encoding, body), (hit, encoding2, body2) = answers[b"gzip"]
    assert (miss, hit, encoding, encoding2) == (b"MISS", b"HIT", b"gzip", b"gzip")
    assert gzip.decompress(body) == TEXT and body2 == body
    (miss, encoding, body), (hit, encoding2, body2) = answers[b""]
    assert (miss, hit, encoding, encoding2) == (b"MISS", b"HIT", None, None)
    assert body == body2 == TEXT
