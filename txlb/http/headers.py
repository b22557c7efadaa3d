# -*- test-case-name: tests.test_http_headers -*-
"""
Header blocks as the proxy rewrites them: pure functions over lists of
C{(name, value)} byte pairs, so they are cheap and tested without sockets.

Bodies are re-framed rather than passed through blindly: the proxy removes
every framing and hop-by-hop header it received and writes its own
(C{Content-Length} or C{Transfer-Encoding: chunked}) for what it actually
parsed, so what reaches the other side always parses the same way.
"""

from __future__ import annotations

import os
import re
from itertools import count
from typing import Optional, Sequence

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 7.6.1 and the classic list: never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
#: Headers the proxy replaces with its own value.
_REPLACED = frozenset(
    {b"content-length", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")
_prefix = os.urandom(6).hex()
_counter = count(1)

REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    202: b"Accepted", 204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
    304: b"Not Modified", 307: b"Temporary Redirect", 308: b"Permanent Redirect", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def newRequestId() -> str:
    """
    A request id unique to this process's lifetime: a random per-process
    prefix and a counter, far cheaper than a UUID per request.
    """
    return f"{_prefix}-{next(_counter):x}"


def requestId(incoming: Optional[bytes]) -> str:
    """Keep a client's X-Request-ID when it is sane; make one otherwise."""
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming.decode("ascii")
    return newRequestId()


#: What a client's TLS certificate proved, said by txlb alone
#: (L{txlb.net.tls.clientCertificateLines}): never taken from a client,
#: on any service.
CLIENT_CERT = frozenset({b"x-client-cert-subject", b"x-client-cert-verified"})
#: What never goes on as it came: made once, not per request.
_REQUEST_DROP = HOP_BY_HOP | _REPLACED | CLIENT_CERT | {b"x-forwarded-for"}
_REQUEST_DROP_FORWARDED = _REQUEST_DROP | {b"forwarded"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"x-request-id"}
#: The names of the lines txlb writes itself after the sifted fields,
#: which header rules may still take out.
_REQUEST_OWN = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
                          b"x-request-id"}) | CLIENT_CERT
_RESPONSE_OWN = frozenset({b"x-request-id"})


def _sift(headers: Sequence[tuple[bytes, bytes]], drop: frozenset[bytes]) -> tuple[list[bytes], dict]:
    """
    One pass over a header block, each name lower-cased once: the
    C{b"Name: value"} lines to forward (dropping C{drop} and whatever
    C{Connection} names), and the dropped headers' values by lower-case
    name, for the few the caller still reads.
    """
    kept: list[bytes] = []
    dropped: dict[bytes, list[bytes]] = {}
    for n, v in headers:
        lower = n.lower()
        if lower in drop:
            values = dropped.get(lower)
            if values is None:
                dropped[lower] = [v]
            else:
                values.append(v)
        else:
            kept.append(n + b": " + v)
    connection = dropped.get(b"connection")
    if connection is None:
        return kept, dropped
    tokens = {t.strip().lower() for value in connection for t in value.split(b",")} - drop
    if not tokens:
        return kept, dropped  # keep-alive, close: nothing more to drop
    # The fields Connection names go too (a second pass).
    return [n + b": " + v for n, v in headers if n.lower() not in drop and n.lower() not in tokens], dropped


def _formatForwardedFor(client: str) -> str:
    return f'"[{client}]"' if ":" in client else client


def requestHead(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client: str,
    host: Optional[bytes],
    proto: bytes,
    requestId: str,
    framing: Optional[bytes],
    forwarded: bool = False,
    upgrade: Optional[bytes] = None,
    rules=None,
    values: Sequence[bytes] = (),
    clientCert: Sequence[bytes] = (),
) -> bytes:
    """
    The header block sent to a backend, always as HTTP/1.1.

    @param framing: C{b"Content-Length: N"}, C{b"Transfer-Encoding:
        chunked"} or L{None} for no body.
    @param upgrade: the protocol asked for in C{Upgrade} (WebSocket), kept
        with C{Connection: upgrade}.
    @param rules: the operator's header rules for requests (a
        L{txlb.policy.headers.SideRules}), applied after txlb's own
        headers, with C{values} for their variables.
    @param clientCert: the C{X-Client-Cert-*} lines of the client's TLS
        connection, on a service that asks for client certificates.
    """
    drop = _REQUEST_DROP_FORWARDED if forwarded else _REQUEST_DROP
    if rules is not None:
        drop, own = rules.plan(drop, _REQUEST_OWN)
    kept, dropped = _sift(headers, drop)
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is None and (rules is None or b"host" not in rules.drop):
        lines.append(b"Host: ")  # an HTTP/1.0 client sent none; 1.1 needs one (RFC 9112 3.2)
    lines += kept
    start = len(lines)
    xff = [v for v in dropped.get(b"x-forwarded-for", ()) if v.strip(b" \t,")]
    xff.append(client.encode("ascii"))
    lines.append(b"X-Forwarded-For: " + b", ".join(xff))
    lines.append(b"X-Forwarded-Proto: " + proto)
    if host is not None:
        lines.append(b"X-Forwarded-Host: " + host)
    if forwarded:
        part = f"for={_formatForwardedFor(client)};proto={proto.decode()}"
        if host is not None:
            quoted = host.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
            part += f';host="{quoted}"'
        prior = dropped.get(b"forwarded", [])
        lines.append(b"Forwarded: " + b", ".join(prior + [part.encode("latin-1")]))
    lines.append(b"X-Request-ID: " + requestId.encode("ascii"))
    if clientCert:
        lines += clientCert
    if rules is not None:
        if own:
            lines[start:] = _without(lines[start:], own)
        lines += rules.lines(values)
    if upgrade is not None:
        lines.append(b"Connection: upgrade")
        lines.append(b"Upgrade: " + upgrade)
    if framing is not None:
        lines.append(framing)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _without(lines: Sequence[bytes], names: frozenset[bytes]) -> list[bytes]:
    """C{b"Name: value"} C{lines} but those of C{names} (lower-case)."""
    return [line for line in lines if line[:line.index(b":")].lower() not in names]


def responseHead(
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    requestId: str,
    framing: Optional[bytes],
    close: bool,
    keepAliveHeader: bool = False,
    upgrade: Optional[bytes] = None,
    extra: Sequence[bytes] = (),
    rules=None,
    values: Sequence[bytes] = (),
) -> bytes:
    """
    The header block sent to the client.

    @param framing: the body framing line for the client, or L{None} (no
        body, or a body delimited by closing the connection).
    @param keepAliveHeader: say C{Connection: keep-alive} (to an HTTP/1.0
        client that asked for it).
    @param rules: the operator's header rules for responses (a
        L{txlb.policy.headers.SideRules}), applied after txlb's own
        headers (C{X-Request-ID}, C{extra}), with C{values} for their
        variables.
    """
    lines = [b"HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, b"Unknown"))]
    lines += responseLines(headers, requestId=requestId, extra=extra, rules=rules, values=values)
    if upgrade is not None:
        lines.append(b"Connection: upgrade")
        lines.append(b"Upgrade: " + upgrade)
    elif close:
        lines.append(b"Connection: close")
    elif keepAliveHeader:
        lines.append(b"Connection: keep-alive")
    if framing is not None:
        lines.append(framing)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def responseLines(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    requestId: str,
    extra: Sequence[bytes] = (),
    rules=None,
    values: Sequence[bytes] = (),
) -> list[bytes]:
    """
    The C{b"Name: value"} lines of a response head to the client, whatever
    protocol carries them: the backend's fields without hop-by-hop and
    framing ones, C{X-Request-ID}, C{extra}, then the operator's header
    rules.  L{responseHead} frames them as HTTP/1.1; an HTTP/2 stream
    encodes them as they are (L{txlb.http.h2frontend}), so both get the
    same fields.
    """
    if rules is None:
        lines = _sift(headers, _RESPONSE_DROP)[0]
        lines.append(b"X-Request-ID: " + requestId.encode("ascii"))
        lines.extend(extra)
        return lines
    drop, own = rules.plan(_RESPONSE_DROP, _RESPONSE_OWN)
    lines = _sift(headers, drop)[0]
    if not own:
        lines.append(b"X-Request-ID: " + requestId.encode("ascii"))
    if extra:
        lines.extend(_without(extra, rules.drop) if rules.drop else extra)
    lines += rules.lines(values)
    return lines


def firstValue(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> Optional[bytes]:
    """The first value of header C{name} (lower-case), or L{None}."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None
