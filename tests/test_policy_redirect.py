"""
Redirect routes (L{txlb.policy.redirect}): where a request is sent, the
answer, and the proxy answering with it on a memory reactor.
"""

from __future__ import annotations

import json

import pytest

from tests.test_http_frontend import OK, Harness, head
from txlb.config import HeaderOps, HeaderRules
from txlb.http.routing import Route, Router
from txlb.policy.headers import compileRules
from txlb.policy.redirect import DEFAULT_STATUS, Redirect


@pytest.mark.parametrize("redirect, host, target, location", [
    (Redirect(host="new.example.com"), b"old.example.com", b"/a/b?x=1&y=2", b"http://new.example.com/a/b?x=1&y=2"),
    (Redirect(scheme="https"), b"shop.example:8080", b"/cart?id=7", b"https://shop.example:8080/cart?id=7"),
    (Redirect(scheme="https", host="n.example:8443"), b"o", b"/", b"https://n.example:8443/"),
    (Redirect(pathPrefix="/new/", matched="/old/"), b"a", b"/old/x/y?q", b"/new/x/y?q"),
    (Redirect(pathPrefix="/v2", matched="/v1"), b"a", b"/v1/users", b"/v2/users"),
    (Redirect(pathPrefix="/", matched="/old/"), b"a", b"/old/x", b"/x"),
    (Redirect(pathPrefix="/blog"), b"a", b"/post/1?c", b"/blog/post/1?c"),
    (Redirect(host="h.example", pathPrefix="/new/", matched="/old/"), b"a", b"/old/?", b"http://h.example/new/?"),
    (Redirect(pathPrefix="/new/", matched="/old/"), b"a", b"/old/", b"/new/"),
])
def test_location(redirect, host, target, location):
    assert redirect.location(b"http", host, target) == location


def test_a_path_alone_never_names_another_host():
    assert Redirect(pathPrefix="/", matched="/old/").location(b"http", b"a", b"/old//evil.example/x") == b"/evil.example/x"


def test_a_scheme_change_without_a_host_header_falls_back_to_a_path():
    assert Redirect(scheme="https").location(b"http", None, b"/a?b") == b"/a?b"


def test_the_answer():
    redirect = Redirect(301, host="new.example")
    data = redirect.answer(b"http", b"old", b"/p?q=1", b"GET", requestId="r-1", close=False, keepAliveHeader=False)
    line, fields = head(data)
    assert line == b"HTTP/1.1 301 Moved Permanently"
    assert fields[b"location"] == [b"http://new.example/p?q=1"]
    body = data.partition(b"\r\n\r\n")[2]
    assert int(fields[b"content-length"][0]) == len(body)
    assert json.loads(body) == {"location": "http://new.example/p?q=1", "requestId": "r-1"}
    headOnly = redirect.answer(b"http", b"old", b"/p", b"HEAD", requestId="r-1", close=True, keepAliveHeader=False)
    assert headOnly.endswith(b"\r\n\r\n") and b"Connection: close" in headOnly and b"Content-Length" in headOnly


@pytest.mark.parametrize("status, reason", [(301, b"Moved Permanently"), (302, b"Found"),
                                            (307, b"Temporary Redirect"), (308, b"Permanent Redirect")])
def test_statuses(status, reason):
    data = Redirect(status, host="n").answer(b"http", None, b"/", b"GET", requestId="r", close=False,
                                             keepAliveHeader=False)
    assert data.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason))
    assert DEFAULT_STATUS == 302


def redirecting(response=None) -> Harness:
    h = Harness(servers=1)
    rules = compileRules(HeaderRules(response=HeaderOps(set=(("X-Frame-Options", "DENY"),)))) if response else None
    h.service.update(router=Router("p", [
        Route(None, host="old.example", redirect=Redirect(308, host="new.example"), rules=rules),
        Route(None, path_prefix="/old/", redirect=Redirect(301, pathPrefix="/new/", matched="/old/")),
    ], rules=rules))
    return h


def test_the_proxy_answers_a_redirect_route_itself_and_keeps_the_connection(events):
    h = redirecting(response=True)
    frontend, client = h.accept()
    frontend.dataReceived(b"GET /a?b=1 HTTP/1.1\r\nHost: old.example\r\n\r\n")
    line, fields = head(client.value())
    assert line == b"HTTP/1.1 308 Permanent Redirect"
    assert fields[b"location"] == [b"http://new.example/a?b=1"] and fields[b"x-frame-options"] == [b"DENY"]
    assert h.connects() == 0 and not client.disconnecting
    client.clear()
    frontend.dataReceived(b"GET /old/x?y HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head(client.value())[1][b"location"] == [b"/new/x?y"]
    client.clear()
    frontend.dataReceived(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
    h.answer()[0].dataReceived(OK)
    assert client.value().startswith(b"HTTP/1.1 200 OK")
    redirects = [e for e in events if e.get("event") == "request"][:2]
    assert [(e["status"], e["pool"], e["selectedServer"], e["reason"]) for e in redirects] == [
        (308, None, None, "redirect"), (301, None, None, "redirect")]
    assert all(e["bytesSent"] > 0 for e in redirects)


def test_a_redirected_request_with_a_body_closes_the_connection():
    h = redirecting()
    frontend, client = h.accept()
    frontend.dataReceived(b"POST /old/form HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    line, fields = head(client.value())
    assert line == b"HTTP/1.1 301 Moved Permanently" and fields[b"connection"] == [b"close"]
    assert client.disconnecting and h.connects() == 0
