"""
Header rewriting (L{txlb.http.headers}): pure functions, tested on their
own and with generated header blocks.
"""

from __future__ import annotations

import re

import h11
from hypothesis import given, strategies as st

from txlb.http.headers import (
    HOP_BY_HOP,
    newRequestId,
    requestHead,
    requestId,
    responseHead,
)

def connectionTokens(headers) -> set[bytes]:
    """The lower-cased names listed in every C{Connection} header: the oracle."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
NAMES = st.one_of(
    st.sampled_from([b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Upgrade", b"Proxy-Connection",
                     b"Proxy-Authorization", b"Proxy-Authenticate", b"Transfer-Encoding", b"X-Forwarded-For",
                     b"X-Request-ID", b"Content-Length", b"Forwarded", b"Accept", b"X-A", b"x-b"]),
    # A second Host never reaches these functions: the frontend answers 400.
    st.text(TOKEN_CHARS, min_size=1, max_size=10).map(str.encode).filter(lambda n: n.lower() != b"host"),
)
VALUES = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ,.=;-XABK", max_size=20).map(lambda t: t.strip().encode())
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=12)
CLIENTS = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


def parse(head: bytes) -> tuple[h11.Request, dict[bytes, list[bytes]]]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    fields: dict[bytes, list[bytes]] = {}
    for n, v in request.headers:
        fields.setdefault(n, []).append(v)
    return request, fields


def forward(headers, client="10.0.0.1", host=b"a.example", **kw) -> bytes:
    args = dict(client=client, host=host, proto=b"http", requestId="rid-1", framing=None)
    args.update(kw)
    return requestHead(b"GET", b"/p?q", headers, **args)


@given(HEADERS, CLIENTS)
def test_hop_by_hop_never_survive_and_xff_ends_with_the_client(headers, client):
    headers = [(b"Host", b"a.example")] + headers
    request, fields = parse(forward(headers, client=client))
    named = connectionTokens(headers)
    for name in fields:
        assert name not in HOP_BY_HOP
        assert name not in named or name in (b"host", b"x-forwarded-for", b"x-forwarded-proto",
                                             b"x-forwarded-host", b"x-request-id")
    [xff] = fields[b"x-forwarded-for"]
    assert xff.split(b", ")[-1] == client.encode()
    sent = [v for n, v in headers if n.lower() == b"x-forwarded-for" and v.strip(b" \t,")]
    assert xff == b", ".join(sent + [client.encode()])
    assert fields[b"x-request-id"] == [b"rid-1"]
    assert fields[b"x-forwarded-proto"] == [b"http"]
    assert fields[b"x-forwarded-host"] == [b"a.example"]
    assert fields[b"host"] == [b"a.example"]
    assert request.target == b"/p?q" and request.http_version == b"1.1"


@given(HEADERS)
def test_end_to_end_headers_are_kept_in_order(headers):
    head = forward([(b"Host", b"h")] + headers)
    request, fields = parse(head)
    dropped = HOP_BY_HOP | connectionTokens(headers) | {
        b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
    kept = [(n.lower(), v) for n, v in headers if n.lower() not in dropped]
    assert [(n, v) for n, v in request.headers if n != b"host"][: len(kept)] == kept


@given(st.sampled_from([None, b"Content-Length: 12", b"Transfer-Encoding: chunked"]), HEADERS)
def test_framing_is_txlbs_own(framing, headers):
    head = forward([(b"Host", b"h")] + headers, framing=framing)
    _, fields = parse(head)
    if framing is None:
        assert b"content-length" not in fields and b"transfer-encoding" not in fields
    elif framing.startswith(b"Content"):
        assert fields[b"content-length"] == [b"12"] and b"transfer-encoding" not in fields
    else:
        assert fields[b"transfer-encoding"] == [b"chunked"] and b"content-length" not in fields


def test_connection_tokens_are_removed_whatever_their_case():
    head = forward([(b"Host", b"h"), (b"Connection", b"Close, X-Secret , x-other"), (b"x-secret", b"1"),
                    (b"X-OTHER", b"2"), (b"X-Kept", b"3")])
    _, fields = parse(head)
    assert b"x-secret" not in fields and b"x-other" not in fields and fields[b"x-kept"] == [b"3"]


def test_forwarded_is_appended_with_ipv6_quoted_and_host_escaped():
    head = forward([(b"Host", b'a"b'), (b"Forwarded", b"for=1.2.3.4")], client="2001:db8::1",
                   host=b'a"b', forwarded=True)
    _, fields = parse(head)
    assert fields[b"forwarded"] == [b'for=1.2.3.4, for="[2001:db8::1]";proto=http;host="a\\"b"']


def test_without_forwarded_an_incoming_forwarded_passes_untouched():
    _, fields = parse(forward([(b"Host", b"h"), (b"Forwarded", b"for=1.2.3.4")]))
    assert fields[b"forwarded"] == [b"for=1.2.3.4"]


def test_no_host_gets_an_empty_one_and_no_forwarded_host():
    _, fields = parse(forward([], host=None))
    assert fields[b"host"] == [b""]
    assert b"x-forwarded-host" not in fields


def test_upgrade_is_kept_when_asked():
    head = forward([(b"Host", b"h"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")], upgrade=b"websocket")
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in head


def test_empty_forwarded_for_values_are_ignored():
    _, fields = parse(forward([(b"Host", b"h"), (b"X-Forwarded-For", b""), (b"X-Forwarded-For", b"1.1.1.1")]))
    assert fields[b"x-forwarded-for"] == [b"1.1.1.1, 10.0.0.1"]


@given(st.binary(max_size=140))
def test_request_ids_are_kept_only_when_sane(incoming):
    rid = requestId(incoming)
    if re.fullmatch(rb"[A-Za-z0-9._:+/=-]{1,128}", incoming):
        assert rid == incoming.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", rid)


def test_generated_request_ids_are_unique():
    assert len({newRequestId() for _ in range(10000)}) == 10000
    assert requestId(None) != requestId(None)


@given(HEADERS, st.booleans(), st.booleans())
def test_response_head_parses_and_carries_the_request_id(headers, close, keepAlive):
    head = responseHead(200, b"OK", headers + [(b"X-Request-ID", b"theirs")], requestId="ours",
                        framing=b"Content-Length: 0", close=close, keepAliveHeader=keepAlive)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    response = conn.next_event()
    fields: dict = {}
    for n, v in response.headers:
        fields.setdefault(n, []).append(v)
    assert response.status_code == 200
    assert fields[b"x-request-id"] == [b"ours"]
    assert fields[b"content-length"] == [b"0"]
    assert b"transfer-encoding" not in fields and b"keep-alive" not in fields
    expected = [b"close"] if close else [b"keep-alive"] if keepAlive else None
    assert fields.get(b"connection") == expected


def test_response_reason_defaults_when_empty():
    assert responseHead(503, b"", [], requestId="r", framing=None, close=True).startswith(
        b"HTTP/1.1 503 Service Unavailable\r\n")


CLIENT_CERTS = st.sampled_from([
    (),
    (b"X-Client-Cert-Verified: NONE",),
    (b"X-Client-Cert-Subject: CN=alice,O=Example", b"X-Client-Cert-Verified: SUCCESS"),
])


@given(HEADERS, CLIENT_CERTS, st.sampled_from([b"X-Client-Cert-Subject", b"x-client-cert-verified",
                                               b"X-CLIENT-CERT-SUBJECT"]))
def test_client_certificate_headers_are_txlbs_alone(headers, clientCert, forgedName):
    """Whatever a client sends as X-Client-Cert-*, the backend sees only what TLS proved (or nothing)."""
    forged = [(forgedName, b"CN=admin"), (b"X-Client-Cert-Verified", b"SUCCESS")]
    _, fields = parse(forward([(b"Host", b"h")] + forged + headers, clientCert=clientCert))
    proved = {name.lower(): value for name, value in (line.split(b": ", 1) for line in clientCert)}
    for name in (b"x-client-cert-subject", b"x-client-cert-verified"):
        assert fields.get(name) == ([proved[name]] if name in proved else None)
