#!/usr/bin/env python3
"""
Micro-benchmarks of the HTTP and TCP hot paths, in one process, without
load generators: what each piece costs per request or per MiB.

    parse     httptools parsing a typical browser request head, with the
              callbacks txlb's frontend uses (µs per request)
    rewrite   the request head to the backend and the response head to the
              client (L{txlb.http.headers}; µs per request and response)
    event     one access event through Twisted's logger to the JSON-lines
              observer (L{txlb.observe.logs.emit}; µs per event), and straight to
              the observer in batches, as under twistd (C{direct}), and a
              request's event as its fixed-order record (C{request_event_direct},
              L{txlb.http.requestlog})
    splice    bytes moved between two loopback TCP connections by
              L{txlb.net.splice.SplicePair}, beside the same bytes copied
              through Python by a Twisted protocol pair (MiB/s, and CPU-µs
              of this process per MiB); a child process feeds and drains

Scheduler picks have their own script (C{bench/schedulers.py}).  Figures
are medians of C{--repeat} rounds; the machine is shared and noisy, so
compare figures of one run, not across runs.

    python3 bench/micro.py
    python3 bench/micro.py --only parse,rewrite --repeat 5 --json micro.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
import timeit

# bench/http.py is named like the standard library's http package: keep this
# directory off the import path, and the checkout on it.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import httptools  # noqa: E402
from twisted.logger import Logger, LogPublisher  # noqa: E402

from txlb.config import LogConfig  # noqa: E402
from txlb.http.headers import requestHead, responseHead  # noqa: E402
from txlb.http.requestlog import REQUEST  # noqa: E402
from txlb.observe.logs import accessTo, emit, emitFixed, makeObserver  # noqa: E402

_REQUEST = (
    b"GET /catalog/items?page=2&sort=price HTTP/1.1\r\n"
    b"Host: shop.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Cookie: session=8f2a9c1e; theme=dark\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
_RESPONSE_HEADERS = [
    (b"Server", b"nginx"), (b"Date", b"Thu, 26 Nov 2026 04:00:00 GMT"),
    (b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Length", b"5120"),
    (b"Connection", b"keep-alive"), (b"Cache-Control", b"max-age=60"),
]


class _Callbacks:
    """What txlb's frontend collects from the parser."""

    def __init__(self) -> None:
        self.headers: list = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        pass


def _perCall(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def benchParse(number: int) -> dict:
    def one() -> None:
        httptools.HttpRequestParser(_Callbacks()).feed_data(_REQUEST)

    # A keep-alive connection reuses its parser: measure that too.
    sink = _Callbacks()
    parser = httptools.HttpRequestParser(sink)

    def reused() -> None:
        sink.headers = []
        sink.url = b""
        parser.feed_data(_REQUEST)

    return {"us_per_request_new_parser": _perCall(one, number), "us_per_request": _perCall(reused, number)}


def benchRewrite(number: int) -> dict:
    sink = _Callbacks()
    httptools.HttpRequestParser(sink).feed_data(_REQUEST)
    headers = sink.headers

    def request() -> None:
        requestHead(b"GET", sink.url, headers, client="127.0.0.1", host=b"shop.example", proto=b"http",
                    requestId="5f2c-1a", framing=None)

    def response() -> None:
        responseHead(200, b"OK", _RESPONSE_HEADERS, requestId="5f2c-1a", framing=b"Content-Length: 5120",
                     close=False)

    return {"us_per_request_head": _perCall(request, number), "us_per_response_head": _perCall(response, number)}


def benchEvent(number: int) -> dict:
    out = io.StringIO()
    log = Logger(namespace="txlb.http", observer=LogPublisher(makeObserver(LogConfig(), stdout=out)))
    fields = dict(requestId="5f2c-1a", service="web", pool="shop", selectedServer="shop-1", method="GET",
                  path="/catalog/items", status=200, responseTimeMs=0.412, bytesSent=5321, client="127.0.0.1",
                  cache=None, reason="round robin")

    def viaEmit() -> None:
        emit(log, "request", dict(fields))
        out.seek(0)
        out.truncate()

    def viaInfo() -> None:
        log.info("request", event="request", **fields)
        out.seek(0)
        out.truncate()

    observer = makeObserver(LogConfig(), stdout=out)

    def direct() -> None:
        # As under twistd (txlb.observe.logs.accessTo): straight to the observer,
        # lines made at the flush, here every 100 events.
        for _ in range(100):
            emit(log, "request", dict(fields))
        observer.flush()
        out.seek(0)
        out.truncate()

    record = ("5f2c-1a", "web", "shop", "shop-1", b"GET", b"/catalog/items?page=2", 200, 0.000412, 5321,
              "127.0.0.1", "HTTP/1.1", None, "round robin", None)

    def fixed() -> None:
        # What an HTTP request logs under twistd: its record, a tuple of
        # values in a fixed order (txlb.http.requestlog), made a line by a template.
        for _ in range(100):
            emitFixed(log, REQUEST, record)
        observer.flush()
        out.seek(0)
        out.truncate()

    accessTo(observer)
    try:
        perDirect = _perCall(direct, max(1, number // 100)) / 100
        perFixed = _perCall(fixed, max(1, number // 100)) / 100
    finally:
        accessTo(None)
    return {"us_per_event": _perCall(viaEmit, number), "us_per_event_direct": perDirect,
            "us_per_request_event_direct": perFixed, "us_per_event_logger_info": _perCall(viaInfo, number)}


# The splice path: a feeder sends MiB into one connection, a sink drains the
# other, both in a child process; this process relays between them.

def _feedAndDrain(inPort: int, outPort: int, total: int) -> None:
    import threading

    feed = socket.create_connection(("127.0.0.1", inPort))
    drain = socket.create_connection(("127.0.0.1", outPort))

    def send() -> None:
        chunk = b"x" * (1 << 20)
        for _ in range(total >> 20):
            feed.sendall(chunk)
        feed.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    while drain.recv(1 << 20):
        pass
    sender.join()
    feed.close()
    drain.close()


def _relayOnce(mode: str, mib: int) -> dict:
    from twisted.internet import epollreactor

    from txlb.net.splice import SplicePair

    reactor = epollreactor.EPollReactor()
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    total = mib << 20
    child = multiprocessing.Process(target=_feedAndDrain,
                                    args=(listeners[0].getsockname()[1], listeners[1].getsockname()[1], total))
    child.start()
    src, _ = listeners[0].accept()
    dst, _ = listeners[1].accept()
    for listener in listeners:
        listener.close()
    moved = [0]

    def ended(error) -> None:
        reactor.stop()

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if mode == "splice":
        pair = SplicePair(reactor, src, dst, lambda up, down: moved.__setitem__(0, moved[0] + up + down), ended)
        reactor.callWhenRunning(pair.start)
    else:
        reactor.callWhenRunning(_copyPair, reactor, src, dst, moved, ended)
    reactor.run(installSignalHandlers=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    child.join(30)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mib_s": mib / elapsed, "cpu_us_per_mib": cpu / mib * 1e6, "moved_mib": moved[0] / (1 << 20)}


def _copyPair(reactor, src: socket.socket, dst: socket.socket, moved: list, ended) -> None:
    """Twisted's userspace relay (portforward's pattern) over the same sockets."""
    from twisted.internet.protocol import Protocol

    class Side(Protocol):
        peer = None
        eof = False

        def dataReceived(self, data: bytes) -> None:
            moved[0] += len(data)
            self.peer.transport.write(data)

        def readConnectionLost(self) -> None:
            self.eof = True
            if self.peer.eof:
                self.transport.loseConnection()
                self.peer.transport.loseConnection()
            else:
                self.peer.transport.loseWriteConnection()

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason=None) -> None:
            if self.peer.transport.connected:
                self.peer.transport.loseConnection()
            else:
                ended(None)

    a, b = Side(), Side()
    a.peer, b.peer = b, a
    ta = reactor.adoptStreamConnection(src.fileno(), socket.AF_INET, _Factory(a))
    tb = reactor.adoptStreamConnection(dst.fileno(), socket.AF_INET, _Factory(b))
    del ta, tb
    src.close()
    dst.close()
    a.transport.registerProducer(b.transport, True)
    b.transport.registerProducer(a.transport, True)


class _Factory:
    """Hands out one protocol (adoptStreamConnection wants a factory)."""

    def __init__(self, protocol) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr):
        from zope.interface import directlyProvides
        from twisted.internet.interfaces import IHalfCloseableProtocol

        directlyProvides(self.protocol, IHalfCloseableProtocol)
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def benchSplice(mib: int) -> dict:
    out = {}
    for mode in ("splice", "userspace"):
        r = _relayOnce(mode, mib)
        out[f"{mode}_mib_s"] = r["mib_s"]
        out[f"{mode}_cpu_us_per_mib"] = r["cpu_us_per_mib"]
        if abs(r["moved_mib"] - mib) > 0.01:
            raise SystemExit(f"{mode}: moved {r['moved_mib']:.2f} MiB of {mib}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="parse,rewrite,event,splice")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing")
    parser.add_argument("--mib", type=int, default=512, help="MiB relayed per splice round")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    benches = {
        "parse": lambda: benchParse(args.number),
        "rewrite": lambda: benchRewrite(args.number),
        "event": lambda: benchEvent(args.number),
        "splice": lambda: benchSplice(args.mib),
    }
    results = {}
    for name in args.only.split(","):
        rounds = [benches[name]() for _ in range(args.repeat)]
        results[name] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        print(f"## {name}")
        for key, value in results[name].items():
            print(f"  {key:32} {value:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
