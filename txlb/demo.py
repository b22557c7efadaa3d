# -*- test-case-name: tests.test_demo -*-
"""
The C{[demo]} section: small HTTP backends of txlb's own, on loopback, so
that C{config/demo.toml} shows balancing with nothing else installed.

Each answers C{GET /} with JSON naming itself and C{GET /health} with
C{{"status": "healthy"}}; C{GET /big?size=N} streams N bytes, for trying
throughput by hand.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site

if TYPE_CHECKING:  # records only: the config's readers are a layer above this one
    from txlb.config import DemoServer


_MAX_BIG = 1 << 30


class DemoBackend(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.requests = 0

    def render(self, request) -> bytes:
        self.requests += 1
        path = request.path.decode("latin-1")
        if path == "/big":
            try:
                size = min(int(request.args.get(b"size", [b"1048576"])[0]), _MAX_BIG)
            except ValueError:
                size = 1 << 20
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * size
        request.setHeader(b"content-type", b"application/json")
        if path == "/health":
            body = {"status": "healthy", "server": self.name}
        else:
            body = {"server": self.name, "path": path, "requests": self.requests}
        return json.dumps(body).encode() + b"\n"


def demoService(reactor, servers: tuple[DemoServer, ...]) -> MultiService:
    parent = MultiService()
    parent.setName("demo")
    for server in servers:
        site = Site(DemoBackend(server.name))
        site.noisy = False
        site.log = lambda request: None  # the balancer's events are the interesting ones
        service = StreamServerEndpointService(serverFromString(reactor, server.listen), site)
        service._raiseSynchronously = True
        service.setServiceParent(parent)
    return parent
