# -*- test-case-name: tests.test_requestlog -*-
"""
The C{request} event: one line per HTTP request (HTTP/1.1 or an HTTP/2
stream), made from a tuple of its values in a fixed order.

Access events are on by default and come once per request, so their cost
is part of every request's: the values are taken from the exchange as
they are (bytes, seconds) and turned into text only when the line is
written, in a batch (L{txlb.observe.logs.FixedEvent}).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from txlb.observe.logs import THOUSANDTHS, FixedEvent, emitFixed, encode, learn, names, text

if TYPE_CHECKING:
    from txlb.http.exchange import Exchange


#: The fields, in the line's order; C{error}, C{spliced}, C{encoding} and
#: C{refused} follow only when they have a value.
FIELDS = ("requestId", "service", "pool", "selectedServer", "method", "path", "status", "responseTimeMs",
          "bytesSent", "client", "protocol", "cache", "reason")


def _path(target: bytes) -> str:
    query = target.find(b"?")
    return (target if query < 0 else target[:query]).decode("latin-1")


class RequestEvent(FixedEvent):
    """
    A record is C{(requestId, service, pool, server, method, target,
    status, seconds, bytesSent, client, protocol, cache, reason, extra)}:
    C{method} and C{target} as the bytes that came (the line has the path
    without its query), C{seconds} since the request began, C{extra}
    L{None} or a dict of the optional fields.
    """

    event = "request"

    def line(self, stamp: str, record: tuple, end: str) -> str:
        (requestId, service, pool, server, method, target, status, seconds, sent, client, protocol, cache,
         reason, extra) = record
        path = text(_path(target))
        micro = round(seconds * 1000000)
        if extra is not None:
            end = "," + encode(extra)[1:-1] + end
        try:
            # The request ID goes as it is: txlb makes it, or keeps a
            # client's only when it is of characters JSON writes as they
            # are (headers.requestId).
            return (f'{{"time":"{stamp}","level":"info","event":"request","requestId":"{requestId}",'
                    f'"service":{names[service]},"pool":{names[pool]},"selectedServer":{names[server]},'
                    f'"method":{names[method]},"path":{path},"status":{names[status]},'
                    f'"responseTimeMs":{micro // 1000}.{THOUSANDTHS[micro % 1000]},"bytesSent":{sent},'
                    f'"client":{names[client]},"protocol":{names[protocol]},"cache":{names[cache]},'
                    f'"reason":{names[reason]}{end}')
        except KeyError:
            learn((service, pool, server, method, status, client, protocol, cache, reason))
            return self.line(stamp, record[:-1] + (None,), end)

    def fields(self, record: tuple) -> dict[str, Any]:
        out = dict(zip(FIELDS, record))
        out["method"] = record[4].decode("latin-1")
        out["path"] = _path(record[5])
        out["responseTimeMs"] = round(record[7] * 1000, 3)
        extra = record[-1]
        if extra is not None:
            out.update(extra)
        return out


REQUEST = RequestEvent()


def logRequest(logger: Logger, exchange: Exchange, service: str, client: str) -> None:
    """Log C{exchange}'s C{request} event, now that it has ended."""
    extra = None
    if exchange.error or exchange.spliced or exchange.encoding is not None or exchange.refused is not None:
        extra = {}
        if exchange.error:
            extra["error"] = exchange.error
        if exchange.spliced:
            extra["spliced"] = exchange.spliced  # body bytes the kernel moved (txlb.http.bodysplice)
        if exchange.encoding is not None:
            extra["encoding"] = exchange.encoding  # the body was compressed (txlb.http.compress)
        if exchange.refused is not None:
            extra["refused"] = exchange.refused  # turned away by txlb.policy.admission
    pool, server = exchange.pool, exchange.server
    emitFixed(logger, REQUEST, (
        exchange.requestId, service, pool.name if pool is not None else None,
        server.name if server is not None else None, exchange.method, exchange.target, exchange.status,
        time.monotonic() - exchange.started, exchange.bytesSent, client,
        exchange.protocol or "HTTP/" + exchange.version, exchange.cacheResult, exchange.reason, extra))
