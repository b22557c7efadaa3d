"""
The demo backends answer as SPEC section 1 says.
"""

from __future__ import annotations

import json

from twisted.web.test.requesthelper import DummyRequest

from txlb.demo import DemoBackend


def get(resource: DemoBackend, path: bytes, args=None) -> tuple[bytes, DummyRequest]:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.path = path
    request.args = args or {}
    return resource.render(request), request


def test_root_names_the_server():
    body, request = get(DemoBackend("server-2"), b"/")
    assert json.loads(body)["server"] == "server-2"
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_health():
    body, _ = get(DemoBackend("server-1"), b"/health")
    assert json.loads(body)["status"] == "healthy"


def test_big_is_the_size_asked_for():
    body, _ = get(DemoBackend("server-1"), b"/big", {b"size": [b"12345"]})
    assert len(body) == 12345
