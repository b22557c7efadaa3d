# -*- test-case-name: tests.test_h2backend -*-
"""
What txlb says to a gRPC client when it answers a request itself.

A gRPC client reads the call's outcome from C{grpc-status} and
C{grpc-message}, not from the HTTP status or a JSON body: txlb's own errors
(no server available, none reachable, a timeout, a refusal) reach it as a
"trailers-only" answer, HTTP 200 whose only header block carries the gRPC
status (U{https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md}).
The request event and metrics keep the HTTP status txlb would have
answered (503, 502, 504, ...), so that dashboards count the failures.
"""

from __future__ import annotations

from urllib.parse import quote

#: gRPC status codes for txlb's own HTTP errors.
UNKNOWN = 2
UNAVAILABLE = 14
_CODES = {
    400: 13,  # INTERNAL: a request txlb could not forward
    403: 7,   # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    408: 4,   # DEADLINE_EXCEEDED
    413: 8,   # RESOURCE_EXHAUSTED
    429: 8,
    431: 8,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: 4,
}


def isGrpc(headers) -> bool:
    """The request is gRPC: its C{content-type} is C{application/grpc...}."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value[:16].lower() == b"application/grpc"
    return False


def wantsTrailers(headers) -> bool:
    """The client said C{TE: trailers} (or is gRPC, which always does)."""
    for name, value in headers:
        if len(name) == 2 and name.lower() == b"te" and b"trailers" in value.lower():
            return True
    return isGrpc(headers)


def grpcCode(status: int) -> int:
    """The gRPC status code for one of txlb's HTTP error statuses."""
    return _CODES.get(status, UNKNOWN)


def grpcErrorHeaders(status: int, message: str, requestId: str) -> list[tuple[bytes, bytes]]:
    """
    The one header block of a trailers-only gRPC answer for txlb's own
    error C{status}: what an HTTP/2 client side sends with END_STREAM.
    """
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % grpcCode(status)),
        (b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode("ascii")),
        (b"x-request-id", requestId.encode("ascii")),
    ]


def grpcErrorResponse(status: int, message: str, requestId: str, close: bool) -> bytes:
    """
    The same answer as HTTP/1.1 bytes, as an exchange writes to its client
    side: the status in the head and an empty body, which an HTTP/2 client
    side sends as one HEADERS frame with END_STREAM (trailers-only).
    """
    lines = [b"HTTP/1.1 200 OK"]
    lines += [name.title() + b": " + value for name, value in grpcErrorHeaders(status, message, requestId)[1:]]
    lines.append(b"Content-Length: 0")
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
