# -*- test-case-name: tests.test_http_errors -*-
"""
The proxy's own answers: JSON bodies naming the error and the request id,
so a client (or the person reading its logs) can find the request in
txlb's events.
"""

from __future__ import annotations

import json

from txlb.http.headers import REASONS


def errorResponse(status: int, message: str, requestId: str, close: bool, extra: bytes = b"") -> bytes:
    """The whole response; C{extra} is more header lines, each ending in CRLF."""
    body = json.dumps({"error": message, "requestId": requestId}).encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Error")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"X-Request-ID: " + requestId.encode("ascii"),
        b"Cache-Control: no-store",
    ]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n" + body
